"""Mixture-of-experts blocks on tiny random models: the fused experts become
per-expert layers computing the same, every expert is quantized on its own
Hessian, calibrated on every token by default, and written as vLLM loads it."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantmill.arch import arch_for, decoder_blocks
from quantmill.driver import quantize_model
from quantmill.export.checkpoint import save_quantized
from quantmill.layers import get_weight
from quantmill.moe import Experts, unfuse_experts
from quantmill.quant.grid import fake_quantize
from quantmill.recipe import parse_recipe

MOE = ["qwen3_moe", "mixtral", "qwen2_moe"]


def ids(n=8, seq=32):
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(0))


def gptq(method="gptq", **weights):
    weights = {"bits": 4, "group_size": 16, **weights}
    return parse_recipe({"steps": [{"method": method, "weights": weights}]}).steps


@pytest.mark.parametrize("model_type", MOE)
def test_per_expert_layers_compute_what_the_fused_experts_do(tiny_model, model_type):
    model = tiny_model(model_type)
    probe = ids(2, 24)
    with torch.no_grad():
        fused = model(probe).logits
    assert unfuse_experts(model, arch_for(model)) == 2
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, Experts) and len(experts) == 4
    down = experts[3].layers()[2]
    assert isinstance(down, nn.Linear) and down.out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, fused)
    assert unfuse_experts(model, arch_for(model)) == 0  # already done


@pytest.mark.parametrize("model_type,method", [(t, "gptq") for t in MOE] + [("qwen3_moe", "awq")])
def test_every_expert_is_quantized_onto_its_grid_and_reloads(
    tmp_path, tiny_model, model_type, method
):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    outcome = quantize_model(model, gptq(method), ids(), 4, False)
    spec = arch_for(model)
    stored = {"mixtral": "block_sparse_moe"}.get(model_type, "mlp")
    names = [f"model.layers.{b}.mlp.experts.{e}.{p}" for b in range(2) for e in range(4)
             for p in spec.expert_linears]  # fmt: skip
    assert set(names) <= set(outcome.layers)
    assert len(outcome.layers) == 2 * len(spec.linears)
    assert "model.layers.0.mlp.gate.weight" not in outcome.layers  # the router stays float
    assert not [r.name for r in outcome.reports if "fallback" in r.extra]  # all calibrated
    for name in names:
        quant = outcome.layers[name]
        W = get_weight(model.get_submodule(name), False).float()
        assert torch.allclose(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W, atol=1e-6)
    # float weights on the grid, named per expert: transformers merges them back
    save_quantized(model, None, outcome.layers, tmp_path / "fake", "fake")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fake", dtype=torch.float32)
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.dim() == 3  # fused again
    probe = ids(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, model(probe).logits)
    # packed: per-expert compressed tensors under the names vLLM looks up
    save_quantized(model, None, outcome.layers, tmp_path / "packed")
    index = json.loads((tmp_path / "packed" / "config.json").read_text())
    targets = {t for g in index["quantization_config"]["config_groups"].values()
               for t in g["targets"]}  # fmt: skip
    down = spec.expert_linears[2]
    assert f"model.layers.1.{stored}.experts.3.{down}" in targets
    from safetensors import safe_open

    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"model.layers.1.{stored}.experts.3.{down}.weight_packed" in keys
    assert f"model.layers.1.{stored}.gate.weight" in keys


class _Never(nn.Module):
    """The model's router, except that it never chooses expert ``banned``."""

    def __init__(self, router: nn.Module, banned: int) -> None:
        super().__init__()
        self.router, self.banned = router, banned

    def forward(self, hidden):
        hidden = hidden.reshape(-1, self.router.weight.shape[1])
        logits = nn.functional.linear(hidden, self.router.weight)
        logits[:, self.banned] = float("-inf")
        probs = logits.softmax(-1, dtype=torch.float)
        top, index = probs.topk(self.router.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), index


@pytest.mark.parametrize("all_experts", [True, False])
def test_an_expert_no_token_is_routed_to(tiny_model, all_experts, caplog):
    model = tiny_model("qwen3_moe")
    for block in decoder_blocks(model, arch_for(model)):
        block.mlp.gate = _Never(block.mlp.gate, banned=3)
    outcome = quantize_model(model, gptq(), ids(), 4, False, all_experts=all_experts)
    reports = {r.name: r for r in outcome.reports}
    silent = reports["model.layers.0.mlp.experts.3.gate_proj"]
    busy = reports["model.layers.0.mlp.experts.0.gate_proj"]
    assert silent.extra["routed_tokens"] == 0 and busy.extra["routed_tokens"] > 0
    if all_experts:  # calibrated on all 8 x 32 tokens like every other expert
        assert silent.extra["calibrated_tokens"] == busy.extra["calibrated_tokens"] == 256
        assert "fallback" not in silent.extra and silent.loss == silent.loss
    else:
        assert silent.extra["calibrated_tokens"] == 0
        assert silent.extra["fallback"] == "rtn"
        assert "round-to-nearest" in silent.extra["warning"]
        assert "mlp.experts.3" in caplog.text and "fewer than" in caplog.text
    W = model.model.layers[0].mlp.experts[3].gate_proj.weight
    quant = outcome.layers["model.layers.0.mlp.experts.3.gate_proj"]
    assert torch.allclose(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W, atol=1e-6)


def test_all_expert_calibration_keeps_the_routed_output(tiny_model):
    """Every expert sees every token, but the block returns what the router chose."""
    from quantmill.moe import calibrating_all_experts

    model = tiny_model("mixtral")
    unfuse_experts(model, arch_for(model))
    probe = ids(2, 16)
    with torch.no_grad():
        routed = model(probe).logits
        with (
            calibrating_all_experts(model.model.layers[0]),
            calibrating_all_experts(model.model.layers[1]),
        ):
            everything = model(probe).logits
    torch.testing.assert_close(everything, routed)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_the_streaming_engine_quantizes_experts_from_their_files(tmp_path, text_files, model_type):
    """bfloat16 shards named as the Hub names them (Mixtral's block_sparse_moe/w1..w3
    included), one block in memory at a time: the checkpoint has the in-memory
    driver's weights and the summary counts every expert's tokens."""
    _streamed(tmp_path, text_files, model_type)


def _streamed(tmp_path, text_files, model_type):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from quantmill.api import quantize
    from quantmill.config import EngineSpec
    from quantmill.data import calibration_ids
    from quantmill.folder import weight_files
    from quantmill.models import load_tokenizer
    from quantmill.report import summary_table
    from quantmill.sources import resolve_model
    from tests.conftest import tiny_config, tiny_recipe, tiny_tokenizer

    torch.manual_seed(0)
    source = tmp_path / "source"
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).to(torch.bfloat16)
    model.save_pretrained(source, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(source)
    recipe = tiny_recipe("gptq", *text_files)
    out = tmp_path / "out"
    summary = quantize(str(source), recipe, out, progress=False, evaluate=False,
                       engine=EngineSpec(max_shard_size="100KB"))  # fmt: skip
    line = summary_table(summary.to_dict())
    assert "experts: 24 expert layers" in line and "0 fell back" in line
    memory = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    calib = calibration_ids(load_tokenizer(resolve_model(str(source))), recipe.calibration)
    outcome = quantize_model(memory, recipe.steps, calib, recipe.calibration.batch_size, False)
    spec = arch_for(memory)
    stored = {"mixtral": "block_sparse_moe"}.get(model_type, "mlp")
    down = spec.expert_linears[2]
    name = f"model.layers.1.{stored}.experts.2.{down}.weight_scale"
    written = {}
    for file in weight_files(out):
        with safe_open(str(file), "pt") as f:
            written.update({k: f.get_tensor(k) for k in f.keys()})
    ours = outcome.layers[f"model.layers.1.mlp.experts.2.{down}"].scale
    assert torch.equal(written[name].float(), ours.to(written[name].dtype).float())
    return out, summary


def test_the_token_counts_are_an_mlflow_table(tmp_path, text_files, monkeypatch):
    import pandas  # noqa: F401  (MLflow's tables need it)

    from quantmill.api import LAYERS_FILE
    from tasks.record import record_run
    from tracking.adapter import get_client, mlflow_run

    out, summary = _streamed(tmp_path, text_files, "qwen3_moe")
    quantized = {**summary.to_dict(), "layers_file": str(out / LAYERS_FILE)}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("QUANTMILL_MLFLOW_DIR", str(tmp_path / "mlruns"))
    with mlflow_run("moe") as run:
        record_run.fn(run, None, None, quantized=quantized)
    client = get_client()
    path = client.download_artifacts(run.run_id, "expert_tokens.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert table["columns"] == ["layer", "routed_tokens", "calibrated_tokens", "fallback"]
    assert len(table["data"]) == 2 * 4 * 3  # blocks x experts x layers
    assert {row[2] for row in table["data"]} == {8 * 32}  # every expert saw every token
    assert sum(row[1] for row in table["data"]) == 2 * 3 * 8 * 32 * 2  # top-2 routing


def test_a_packed_moe_run_with_evaluation_is_refused_before_work_and_fake_evaluates(
    tmp_path, text_files
):
    from transformers import AutoModelForCausalLM

    from quantmill.api import quantize
    from quantmill.errors import ConfigError
    from tests.conftest import tiny_config, tiny_recipe, tiny_tokenizer

    source = tmp_path / "source"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    recipe = tiny_recipe("gptq", *text_files)
    with pytest.raises(ConfigError, match="--no-eval"):
        quantize(str(source), recipe, tmp_path / "packed", progress=False)
    assert not (tmp_path / "packed").exists()
    summary = quantize(str(source), recipe, tmp_path / "fake", progress=False,
                       export_format="fake")  # fmt: skip
    original, quantized = summary.original["perplexity"], summary.quantized["perplexity"]
    assert original > 1 and abs(quantized - original) < 0.5 * original  # evaluated, near
