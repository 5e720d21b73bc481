"""ZeroQuant: group-wise weights, per-token activations, layer-wise distillation."""

import pytest
import torch

from quantmill.api import quantize
from quantmill.driver import quantize_model
from quantmill.errors import ConfigError
from quantmill.quant.grid import quantize as to_integers
from quantmill.recipe import parse_recipe
from tests.conftest import tiny_recipe


def zeroquant(**fields):
    step = {"method": "zeroquant", "weights": {"bits": 4, "group_size": 16}, **fields}
    return parse_recipe({"steps": [step]}).steps


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 320, (8, 32))


def test_distillation_lowers_each_blocks_loss_and_keeps_the_grid(tiny_model, ids):
    model = tiny_model("llama")
    outcome = quantize_model(model, zeroquant(lkd_steps=30, lkd_lr=3e-5), ids, 4, False)
    blocks = [r for r in outcome.reports if r.method == "zeroquant-lkd"]
    assert len(blocks) == 2
    for report in blocks:
        assert report.loss < 0.8 * report.extra["initial_loss"]
        assert report.extra["steps"] == 30
        assert report.extra["kept"] == "distilled"
    # the distilled weights still lie exactly on the grid found before distillation
    name = "model.layers.1.mlp.down_proj"
    quant = outcome.layers[name]
    W = model.get_submodule(name).weight.detach()
    q = to_integers(W, quant.scale, quant.zero, quant.scheme)
    from quantmill.quant.grid import dequantize

    assert torch.allclose(dequantize(q, quant.scale, quant.zero, quant.scheme), W, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # training state restored


def test_distillation_brings_logits_closer_than_rounding_alone(tiny_model, ids):
    def error(steps):
        model = tiny_model("llama")
        with torch.no_grad():
            reference = model(ids).logits
        quantize_model(model, zeroquant(**steps), ids, 4, False)
        with torch.no_grad():
            return float((model(ids).logits - reference).square().mean())

    assert error({"lkd_steps": 40, "lkd_lr": 3e-5}) < error({"lkd_steps": 0})


def test_a_block_that_distillation_makes_worse_keeps_its_rounded_weights(tiny_model, ids):
    rounded = tiny_model("llama")
    quantize_model(rounded, zeroquant(lkd_steps=0), None, 4, False)
    model = tiny_model("llama")
    outcome = quantize_model(model, zeroquant(lkd_steps=30, lkd_lr=1e-3), ids, 4, False)
    blocks = [r for r in outcome.reports if r.method == "zeroquant-lkd"]
    assert "rounded" in [r.extra["kept"] for r in blocks]  # lr too large for these weights
    for report in blocks:
        assert report.loss <= report.extra["initial_loss"]
    first = "model.layers.0.self_attn.q_proj"
    if blocks[0].extra["kept"] == "rounded":
        assert torch.equal(model.get_submodule(first).weight, rounded.get_submodule(first).weight)


def test_no_distillation_needs_no_calibration(tiny_model):
    outcome = quantize_model(tiny_model("llama"), zeroquant(lkd_steps=0), None, 4, False)
    assert not [r for r in outcome.reports if r.method == "zeroquant-lkd"]
    assert all(q.activations is not None for q in outcome.layers.values())


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"lkd_steps": -1}, "lkd_steps"),
        ({"lkd_lr": 0}, "lkd_lr"),
        ({"lkd_batch_size": 0}, "lkd_batch_size"),
    ],
)
def test_bad_distillation_settings_are_refused(fields, field):
    with pytest.raises(ConfigError, match=rf"steps\.0\.{field}"):
        zeroquant(**fields)


def test_kv_cache_on_an_unsupported_attention_layout_fails_before_work(
    tmp_path, tiny_checkpoint, text_files
):
    data = tiny_recipe("rtn", *text_files).model_dump()
    data["evaluation"]["kv_cache"] = {"bits": 8}
    data["evaluation"]["dataset"] = str(tmp_path / "never-read.txt")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="kv_cache.*gpt2"):
        quantize(tiny_checkpoint("gpt2"), parse_recipe(data), out, progress=False)
    assert not out.exists()


def test_kv_cache_quantization_is_measured_in_the_evaluation(tmp_path, tiny_checkpoint, text_files):
    data = tiny_recipe("rtn", *text_files).model_dump()
    data["steps"][0]["weights"] = {"bits": 8, "group_size": None}
    plain = quantize(
        tiny_checkpoint("llama"), parse_recipe(data), tmp_path / "out-a", progress=False
    )
    data["evaluation"]["kv_cache"] = {"bits": 4, "granularity": "token"}
    kv4 = quantize(
        tiny_checkpoint("llama", "b"), parse_recipe(data), tmp_path / "out-b", progress=False
    )
    assert kv4.quantized["kv_cache"] == "kv4t"
    assert "kv_cache" not in plain.quantized
    assert kv4.quantized["perplexity"] != plain.quantized["perplexity"]
    assert kv4.original["perplexity"] == plain.original["perplexity"]  # baseline untouched
