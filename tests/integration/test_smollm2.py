"""The real model, SmolLM2-135M-Instruct, end to end (slow, but every one runs in CI)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantmill.blocks import capture_block_inputs, run_block
from quantmill.config import CalibrationSpec, EvalSpec
from quantmill.data import calibration_ids, eval_ids
from quantmill.driver import quantize_model
from quantmill.evaluate import perplexity
from quantmill.models import load_model
from quantmill.recipe import parse_recipe
from quantmill.sources import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(resolve_model("smollm2-135m"))


def greedy(model, tokenizer, prompt="The capital of France is", tokens=4) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_preset_is_the_real_model_and_answers_paris(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "Paris" in greedy(model, tokenizer)


def test_original_perplexity_matches_the_published_protocol(smollm2, wiki_files):
    model, tokenizer = smollm2
    windows = eval_ids(tokenizer, EvalSpec(dataset=str(wiki_files[1]), max_windows=8))
    assert windows.shape == (8, 2048)
    # GPTQ protocol, first 8 windows of 2048 tokens, float32: 19.13
    assert perplexity(model, windows, progress=False).perplexity == pytest.approx(19.13, abs=0.02)


def block_outputs(block, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        calls = zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)
        return [block(h, *a, **k) for h, a, k in calls]


def test_gptq_reconstructs_real_blocks_better_than_rtn(smollm2_path, wiki_files):
    """3-bit, first two blocks only: GPTQ's block output error is lower than RTN's."""
    errors = {}
    for method in ("rtn", "gptq"):
        model, tokenizer = load_model(resolve_model("smollm2-135m"))
        ids = calibration_ids(
            tokenizer, CalibrationSpec(dataset=str(wiki_files[0]), num_samples=16, seq_len=256)
        )
        block = model.model.layers[1]
        inputs = capture_block_inputs(model, model.model.layers[0], ids, 8)
        run_block(model.model.layers[0], inputs, keep_outputs=True)
        reference = block_outputs(block, inputs)
        steps = parse_recipe(
            {
                "steps": [
                    {
                        "method": method,
                        "weights": {"bits": 3, "group_size": 64},
                        "targets": ["re:model\\.layers\\.[01]\\..*"],
                    }
                ]
            }
        ).steps
        quantize_model(model, steps, ids, 8, progress=False)
        out = block_outputs(block, inputs)
        errors[method] = sum(
            float((o - r).square().mean()) for o, r in zip(out, reference, strict=True)
        )
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_group_128_with_a_partial_last_group_is_written_as_floats_on_the_grid(
    smollm2_path, tmp_path
):
    """No serving engine loads a partial last group (576 = 4 × 128 + 64): the packed writer
    refuses it, and the float export reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from quantmill.errors import ExportError
    from quantmill.export.checkpoint import save_quantized

    model, tokenizer = load_model(resolve_model("smollm2-135m"))
    steps = parse_recipe(
        {"steps": [{"method": "rtn", "weights": {"bits": 4, "group_size": 128}}]}
    ).steps
    outcome = quantize_model(model, steps, None, progress=False)
    q_proj = outcome.layers["model.layers.0.self_attn.q_proj"]
    assert q_proj.scale.shape == (576, 5)
    with pytest.raises(ExportError, match="partial last group"):
        save_quantized(model, tokenizer, outcome.layers, tmp_path / "packed")
    save_quantized(model, tokenizer, outcome.layers, tmp_path / "fake", fmt="fake")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def cli(*args: str) -> dict:
    """Run ``quantmill <args> --json -q`` in a subprocess and return its JSON."""
    cmd = [sys.executable, "-m", "app", *args, "--json", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_cli_gptq_end_to_end(tmp_path, wiki_files):
    out = tmp_path / "w4g64"
    calib, test = (str(f) for f in wiki_files)
    summary = cli(
        "quantize", "--model", "smollm2-135m", "--recipe", "gptq-w4g64",
        "--out", str(out), "--calib-data", calib, "--calib-samples", "8",
        "--eval-data", test, "--eval-windows", "1", "--eval-seq-len", "512",
    )  # fmt: skip
    original, quantized = summary["original"]["perplexity"], summary["quantized"]["perplexity"]
    assert original < quantized < 1.5 * original
    assert summary["bits_per_weight"] <= 4.6
    assert summary["size_bytes"] < summary["original_size_bytes"] / 2.5
    assert summary["model"]["revision"].startswith("sha256:")
    layers = json.loads((out / "quantmill_layers.json").read_text())
    assert len(layers) == 30 * 7 and all(layer["loss"] > 0 for layer in layers)

    # (`quantmill eval` on a written checkpoint agrees with quantize's summary:
    # tests/integration/test_accuracy.py, perplexity and task figures in one process)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the checkpoint loads on its own and still knows the answer: " Paris" among its
    # five most likely next tokens (the original ranks it first)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top5 = model(ids).logits[0, -1].topk(5).indices.tolist()
    assert tokenizer.encode(" Paris", add_special_tokens=False)[0] in top5


def test_gguf_file_is_converted_once_to_what_transformers_reads(smollm2):
    """A .gguf source becomes a safetensors folder, tensor by tensor: the same weights
    transformers' own GGUF reader gives, kept in the file's float types."""
    from quantmill.sources import PRESETS, locate_preset_gguf
    from quantmill.weights import WeightFiles

    gguf = locate_preset_gguf(PRESETS["smollm2-135m"], install=False)
    resolved = resolve_model(str(gguf))
    assert resolved.kind == "gguf" and (resolved.path / "config.json").is_file()
    assert resolved.revision.startswith("sha256:")
    stamp = (resolved.path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf)).path == resolved.path  # converted once, then reused
    assert (resolved.path / "model.safetensors").stat().st_mtime_ns == stamp
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    files = WeightFiles(resolved.path)
    state = reference.state_dict()
    assert set(files.tensors) == set(state) - {"lm_head.weight"}  # tied to the embedding
    for name in files.tensors:
        assert torch.equal(files.read(name), state[name]), name
    from_gguf, _ = load_model(resolved)
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, model(ids).logits)
