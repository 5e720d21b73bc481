"""Packed checkpoints: transformers loads them and computes the same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantmill.api import LAYERS_FILE, RECIPE_FILE, SUMMARY_FILE, quantize
from quantmill.driver import quantize_model
from quantmill.evaluate import bits_per_weight
from quantmill.export.checkpoint import save_quantized
from quantmill.recipe import load_recipe, parse_recipe
from tests.conftest import tiny_recipe, tiny_tokenizer

SCHEMES = [
    dict(bits=4, group_size=16, symmetric=True),
    dict(bits=4, group_size=16, symmetric=False),
    dict(bits=4, group_size=None, symmetric=True),
    dict(bits=4, group_size=None, symmetric=False),
    dict(bits=3, group_size=32, symmetric=True),
    dict(bits=2, group_size=32, symmetric=False),
    dict(bits=8, group_size=None, symmetric=True),
]


@pytest.mark.parametrize("weights", SCHEMES, ids=str)
def test_packed_checkpoint_reloads_with_identical_logits(tmp_path, tiny_model, weights):
    model = tiny_model("llama")
    steps = parse_recipe({"steps": [{"method": "rtn", "weights": weights}]}).steps
    outcome = quantize_model(model, steps, None, 4, False)
    save_quantized(model, None, outcome.layers, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # what the serving engines know: group and channel
    strategy = "channel" if weights["group_size"] is None else "group"
    written = {
        g["weights"]["strategy"] for g in config["quantization_config"]["config_groups"].values()
    }
    assert written == {strategy}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # integers packed 32 // bits to an int32 (3 bits: 10 per word, 2 bits wasted), a
    # float16 scale and a zero point (packed the same way, down the rows) per group,
    # and weight_shape (two int64)
    bits = weights["bits"]
    per_word = 32 // bits

    def packed(count: int) -> int:
        return -(-count // per_word) * 32  # weight-only: packed, 8 bits too

    stored, total = 0, 0
    for name in outcome.layers:
        rows, cols = model.get_submodule(name).weight.shape
        groups = -(-cols // (weights["group_size"] or cols))
        stored += rows * packed(cols)
        stored += rows * groups * 16 + (0 if weights["symmetric"] else groups * packed(rows))
        stored += 128  # the packed layer's weight_shape
        total += rows * cols
    expected = stored / total
    assert bits_per_weight(tmp_path) == pytest.approx(expected, rel=1e-9)


def test_bits_per_weight_counts_scales_and_zero_points(tmp_path, tiny_model):
    model = tiny_model("llama")
    steps = parse_recipe(
        {"steps": [{"method": "rtn", "weights": {"bits": 4, "group_size": 16}}]}
    ).steps
    save_quantized(model, None, quantize_model(model, steps, None, 4, False).layers, tmp_path)
    # 4 bits + one float16 scale per 16 weights = 5.0, plus 16 bytes of weight_shape
    # per layer (64x64 or 64x128 weights here), well under 0.05
    assert 5.0 < bits_per_weight(tmp_path) < 5.05


def test_gpt2_conv1d_is_packed_and_fake_export_works(tmp_path, tiny_model):
    model = tiny_model("gpt2")
    steps = parse_recipe({"steps": [{"method": "rtn"}]}).steps
    layers = quantize_model(model, steps, None, 4, False).layers
    save_quantized(model, None, layers, tmp_path / "packed")  # layout: test_architectures
    assert 4 < bits_per_weight(tmp_path / "packed") < 5
    (tmp_path / "fake").mkdir()
    save_quantized(model, None, layers, tmp_path / "fake", fmt="fake")
    assert bits_per_weight(tmp_path / "fake") is None


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_api_writes_checkpoint_recipe_and_summary(tiny_checkpoint, text_files, tmp_path, method):
    src = tiny_checkpoint("llama")
    recipe = tiny_recipe(method, *text_files)
    out = tmp_path / "out"
    summary = quantize(str(src), recipe, out, progress=False)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        RECIPE_FILE,
        SUMMARY_FILE,
        LAYERS_FILE,
    ):
        assert (out / name).is_file(), name
    assert load_recipe(out / RECIPE_FILE) == recipe
    saved = json.loads((out / SUMMARY_FILE).read_text())
    assert saved["quantized"]["perplexity"] == pytest.approx(summary.quantized["perplexity"])
    assert saved["original"]["windows"] == 4 and saved["model"]["kind"] == "local"
    assert 4.0 < saved["bits_per_weight"] < 5.1
    assert len(json.loads((out / LAYERS_FILE).read_text())) == 2 * 7
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_asymmetric_group_checkpoints_of_other_tools_load(tmp_path, tiny_model):
    """llmcompressor-style asymmetric ``group`` checkpoints pack zero points into int32;
    transformers loads them (with compressed-tensors < 0.18), and so does ``load_model``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from quantmill.export.compressed import quantization_config
    from quantmill.models import load_model
    from quantmill.sources import resolve_model

    model = tiny_model("llama")
    steps = parse_recipe(
        {"steps": [{"method": "rtn", "weights": {"bits": 4, "group_size": 16, "symmetric": False}}]}
    ).steps
    layers = quantize_model(model, steps, None, 4, False).layers
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=16, symmetric=False)
    scheme = QuantizationScheme(targets=list(layers), weights=args, format="pack-quantized")
    state = dict(model.state_dict())
    for name, quant in layers.items():
        local = {
            "weight": state.pop(f"{name}.weight"),
            "weight_scale": quant.scale,  # float32, as llmcompressor stores it here
            "weight_zero_point": quant.zero.to(torch.int8),
        }
        compressed = BaseCompressor.get_value_from_registry("pack-quantized").compress(
            local, scheme
        )
        assert compressed["weight_zero_point"].dtype == torch.int32  # packed
        state.update({f"{name}.{k}": v for k, v in compressed.items()})
    model.config.quantization_config = quantization_config({"group_0": scheme})
    model.save_pretrained(tmp_path, state_dict=state)
    tiny_tokenizer().save_pretrained(tmp_path)
    del model.config.quantization_config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded, _ = load_model(resolve_model(str(tmp_path)))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
