"""Integer kernels, the runtime file, and a planted-outlier model where naive W8A8
fails and SmoothQuant and LLM.int8() recover."""

import json

import pytest
import torch
from torch import nn

from quantmill.config import ActScheme
from quantmill.driver import quantize_model
from quantmill.export.checkpoint import save_quantized
from quantmill.folder import RUNTIME_FILE
from quantmill.quant.act import fake_quantize_tokens, quantize_tokens
from quantmill.quant.int8 import (
    fake_mixed_int8,
    int8_linear,
    int32_matmul,
    mixed_int8_linear,
    quantize_rows_int8,
)
from quantmill.recipe import parse_recipe
from quantmill.runtime import (
    Int8Linear,
    MixedInt8Linear,
    activation_hooks,
    apply_runtime,
    runtime_spec,
)


def test_int8_matmul_matches_the_dequantized_reference():
    torch.manual_seed(0)
    W = torch.randn(96, 64)
    x = torch.randn(2, 7, 64)
    bias = torch.randn(96)
    q, scale = quantize_rows_int8(W)
    y = int8_linear(x, q.t().contiguous(), scale, bias)
    # reference: the same integers, dequantized, in float
    qx, sx, _ = quantize_tokens(x, ActScheme(bits=8))
    reference = (qx.float() * sx) @ (q.float() * scale[:, None]).t() + bias
    assert y.shape == (2, 7, 96)
    assert torch.allclose(y, reference, atol=1e-4, rtol=1e-5)
    # and close to the float layer itself
    exact = x @ W.t() + bias
    assert (y - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("inner", [64, 1536, 2049])
def test_the_float32_path_gives_the_same_integers_as_int_mm(inner):
    # the worst case for exactness: every product at ±128·127 or 128·128, and inner
    # sizes past one chunk of 1024 columns (SmolLM2's down_proj takes 1536)
    torch.manual_seed(0)
    qx = torch.randint(-128, 128, (33, inner), dtype=torch.int8)
    qw = torch.randint(-128, 128, (inner, 40), dtype=torch.int8)
    qx[0], qw[:, 0] = -128, -128  # a column whose sum is 128·128·inner
    qx[1], qw[:, 1] = 127, -128
    exact = torch._int_mm(qx, qw)
    assert exact[0, 0] == 128 * 128 * inner
    assert torch.equal(int32_matmul(qx, qw, exact_float=True), exact)
    assert torch.equal(int32_matmul(qx, qw), exact)  # whichever this machine uses


def test_int8_linear_handles_a_single_token():
    W = torch.randn(32, 16)
    q, scale = quantize_rows_int8(W)
    x = torch.randn(1, 16)
    y = int8_linear(x, q.t().contiguous(), scale, None)
    assert torch.allclose(
        y, fake_quantize_tokens(x, ActScheme()) @ (q.float() * scale[:, None]).t(), atol=1e-4
    )


def test_mixed_int8_keeps_outlier_columns_in_float():
    torch.manual_seed(0)
    W = torch.randn(32, 16)
    q, scale = quantize_rows_int8(W)
    x = torch.randn(10, 16)
    x[:, 4] = 60.0  # an outlier feature
    w_deq = q.float() * scale[:, None]
    y, count = mixed_int8_linear(x, q.t().contiguous(), scale, None, threshold=6.0)
    assert count == 1
    assert torch.allclose(y, fake_mixed_int8(x, 6.0) @ w_deq.t(), atol=1e-4)
    assert torch.equal(fake_mixed_int8(x, 6.0)[:, 4], x[:, 4])  # untouched
    plain = int8_linear(x, q.t().contiguous(), scale, None)
    exact = x @ w_deq.t()
    assert (y - exact).abs().max() < 0.2 * (plain - exact).abs().max()


def test_mixed_int8_with_every_column_an_outlier_runs_all_in_float():
    # a low threshold (LLM.int8() at 2.0 on SmolLM2) can flag every input column
    torch.manual_seed(0)
    W = torch.randn(8, 6)
    q, scale = quantize_rows_int8(W)
    x = torch.full((3, 6), 5.0) * torch.randn(3, 6).sign()
    w_deq = q.float() * scale[:, None]
    bias = torch.randn(8)
    y, count = mixed_int8_linear(x, q.t().contiguous(), scale, bias, threshold=2.0)
    assert count == 6
    assert torch.allclose(y, x @ w_deq.t() + bias, atol=1e-5)
    assert torch.equal(fake_mixed_int8(x, 2.0), x)


def test_per_token_fake_quantization_passes_gradients_straight_through():
    x = torch.randn(4, 8, requires_grad=True)
    fake_quantize_tokens(x, ActScheme(bits=4)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def planted(tiny_model):
    """A tiny Llama whose normed hidden states carry a few huge channels, as real LLMs do."""
    model = tiny_model("llama")
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[[3, 17]] = 150.0
            block.post_attention_layernorm.weight[[9]] = 200.0
    return model


def logits_error(model, ids, reference, spec=None):
    with torch.no_grad(), activation_hooks(model, spec or {}):
        return float((model(ids).logits - reference).square().mean())


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(0, 320, (8, 32))


def quantized_error(tiny_model, ids, steps):
    model = planted(tiny_model)
    with torch.no_grad():
        reference = model(ids).logits
    outcome = quantize_model(model, parse_recipe({"steps": steps}).steps, ids, 4, progress=False)
    return logits_error(model, ids, reference, runtime_spec(outcome.layers)), outcome


W8A8 = {"weights": {"bits": 8, "group_size": None}, "activations": {"bits": 8}}


def test_planted_outliers_break_naive_w8a8_and_smoothquant_and_llm_int8_recover(tiny_model, ids):
    naive, _ = quantized_error(tiny_model, ids, [{"method": "rtn", **W8A8}])
    weight_only, _ = quantized_error(
        tiny_model, ids, [{"method": "rtn", "weights": W8A8["weights"]}]
    )
    smooth, _ = quantized_error(tiny_model, ids, [{"method": "smoothquant", "alpha": 0.5}])
    mixed, outcome = quantized_error(tiny_model, ids, [{"method": "llm_int8"}])
    assert naive > 5 * weight_only  # activations are what fails
    assert smooth < naive / 5
    assert mixed < naive / 5
    q_proj = next(r for r in outcome.reports if r.name.endswith("0.self_attn.q_proj"))
    assert q_proj.extra["outlier_columns"] == 2  # the two planted channels
    assert q_proj.extra["outlier_fraction"] == pytest.approx(2 / 64)


def test_w8a8_checkpoint_runs_with_integer_kernels(tmp_path, tiny_model, ids):
    from transformers import AutoModelForCausalLM

    model = planted(tiny_model)
    outcome = quantize_model(
        model,
        parse_recipe({"steps": [{"method": "smoothquant", "alpha": 0.8}]}).steps,
        ids,
        4,
        False,
    )
    save_quantized(model, None, outcome.layers, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    group = next(iter(config["config_groups"].values()))
    assert group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True
    assert group["weights"]["num_bits"] == 8
    runtime = json.loads((tmp_path / RUNTIME_FILE).read_text())["layers"]
    assert len(runtime) == 14
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    swapped = apply_runtime(loaded, tmp_path)
    assert set(swapped.values()) == {"Int8Linear"} and len(swapped) == 14
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8Linear) and layer.qweight_t.dtype == torch.int8
    with torch.no_grad():
        simulated = None
        with activation_hooks(model, runtime_spec(outcome.layers)):
            simulated = model(ids).logits
        integer = loaded(ids).logits
    assert (integer - simulated).abs().max() < 1e-2 * simulated.abs().max()


def test_a_w8a8_checkpoint_computes_what_transformers_computes_for_it(tmp_path, tiny_model, ids):
    # transformers runs compressed-tensors' own fake quantization (activation scale
    # max/127.5, integers in [-128, 127]); our integer kernels must give the same numbers
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    steps = parse_recipe({"steps": [{"method": "rtn", **W8A8}]}).steps
    outcome = quantize_model(model, steps, None, 4, False)
    save_quantized(model, None, outcome.layers, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(apply_runtime(ours, tmp_path).values()) == {"Int8Linear"}
    with torch.no_grad():
        reference, integer = plain(ids, labels=ids), ours(ids, labels=ids)
    diff = (integer.logits - reference.logits).abs()
    assert float(diff.mean()) < 1e-4 * float(reference.logits.abs().max())
    assert float(integer.loss.exp()) == pytest.approx(float(reference.loss.exp()), rel=1e-3)


def test_token_scales_follow_compressed_tensors_and_llm_int8_keeps_the_paper_rule():
    x = torch.tensor([[-127.5, 64.0, 0.25, 127.5]])
    q, scale, _ = quantize_tokens(x, ActScheme(bits=8))
    assert float(scale) == 1.0  # max / 127.5
    assert q.tolist() == [[-128, 64, 0, 127]]  # ±127.5 round to ±128; +128 is clamped
    # LLM.int8(): max/127 and ±127, the paper's absmax rule: the extremes are exact
    assert float(fake_mixed_int8(x, 1000.0)[0, 0]) == pytest.approx(-127.5)


def test_llm_int8_checkpoint_counts_outlier_columns_at_run_time(tmp_path, tiny_model, ids):
    from transformers import AutoModelForCausalLM

    model = planted(tiny_model)
    outcome = quantize_model(
        model, parse_recipe({"steps": [{"method": "llm_int8"}]}).steps, ids, 4, False
    )
    save_quantized(model, None, outcome.layers, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert all("input_activations" not in g for g in config["config_groups"].values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    apply_runtime(loaded, tmp_path)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MixedInt8Linear) and layer.threshold == 6.0
    with torch.no_grad():
        loaded(ids)
    assert layer.outlier_columns >= 2  # the planted channels, at least


def test_weight_only_checkpoint_has_no_runtime_file(tmp_path, tiny_model, ids):
    model = tiny_model("llama")
    outcome = quantize_model(
        model, parse_recipe({"steps": [{"method": "rtn"}]}).steps, None, 4, False
    )
    save_quantized(model, None, outcome.layers, tmp_path)
    assert not (tmp_path / RUNTIME_FILE).exists()
    assert apply_runtime(nn.Module(), tmp_path) == {}


def test_llm_int8_refuses_other_weight_grids():
    from quantmill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"steps\.0\.weights.*8-bit symmetric per-row"):
        parse_recipe({"steps": [{"method": "llm_int8", "weights": {"bits": 4}}]})
    with pytest.raises(ConfigError, match=r"steps\.0\.activations"):
        parse_recipe({"steps": [{"method": "llm_int8", "activations": {"bits": 8}}]})


@pytest.mark.parametrize(
    "activations", [{"bits": 8}, {"bits": 8, "symmetric": False}], ids=["sym", "asym"]
)
def test_the_reported_perplexity_is_what_transformers_gives_for_the_folder(
    tiny_checkpoint, text_files, tmp_path, activations
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmill.api import quantize
    from quantmill.data import eval_ids
    from quantmill.evaluate import perplexity
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe("rtn", *text_files)
    step = recipe.steps[0].model_copy(update={"activations": ActScheme(**activations)})
    recipe = recipe.model_copy(update={"steps": [step]})
    out = tmp_path / "out"
    summary = quantize(str(tiny_checkpoint("llama")), recipe, out, progress=False)
    assert summary.quantized["runtime_layers"] == {"CompressedTensorsLinear": 14}
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = eval_ids(AutoTokenizer.from_pretrained(out), recipe.evaluation)
    with torch.no_grad():
        plain(windows[:1, :4])  # compressed-tensors decompresses on the first forward
    expected = perplexity(plain, windows, progress=False).perplexity
    assert summary.quantized["perplexity"] == pytest.approx(expected, rel=1e-6)
