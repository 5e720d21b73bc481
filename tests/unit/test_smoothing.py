"""SmoothQuant and AWQ scale migration: exact in float, checked against the model."""

import pytest
import torch
from torch import nn

from quantmill.api import quantize
from quantmill.arch import Mapping, arch_for
from quantmill.config import QuantScheme
from quantmill.driver import build_methods, quantize_model
from quantmill.errors import ConfigError
from quantmill.methods.smoothquant import fold
from quantmill.quant.awq import search_clip, search_scales
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.quant.smooth import (
    column_max,
    divide_output_channels,
    multiply_input_columns,
    smoothquant_scales,
)
from quantmill.recipe import parse_recipe
from tests.conftest import tiny_recipe


def test_smoothquant_scales_follow_the_formula():
    act = torch.tensor([1.0, 8.0, 0.5])
    weight = torch.tensor([2.0, 0.5, 1.0])
    s = smoothquant_scales(act, weight, 0.75)
    assert torch.allclose(s, act**0.75 / weight**0.25)
    assert torch.allclose(smoothquant_scales(act, weight, 1.0), act)
    assert torch.allclose(smoothquant_scales(act, weight, 0.0), 1 / weight)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(act, weight, 1.5)


def test_folded_scales_are_exact():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    linears = [nn.Linear(16, 8), nn.Linear(16, 4)]
    x = torch.randn(5, 16)
    before = [lin(norm(x)) for lin in linears]
    old_weight, old_bias = norm.weight.detach().clone(), norm.bias.detach().clone()
    s = torch.rand(16) * 10 + 0.1
    divide_output_channels(norm, s)
    for lin in linears:
        multiply_input_columns(lin, s)
    assert torch.allclose(norm.weight * s, old_weight, rtol=1e-6)
    assert torch.allclose(norm.bias * s, old_bias, rtol=1e-6)
    for lin, ref in zip(linears, before, strict=True):
        assert torch.allclose(lin(norm(x)), ref, atol=1e-5)
    # the smoothed activation is x / s channel by channel
    assert torch.allclose(
        norm(x), (nn.functional.layer_norm(x, (16,)) * old_weight + old_bias) / s, atol=1e-5
    )


def test_folding_into_a_linear_keeps_the_product():
    torch.manual_seed(1)
    up, down = nn.Linear(8, 12), nn.Linear(12, 8)
    x = torch.randn(3, 8)
    ref = down(up(x))
    s = torch.rand(12) + 0.5
    divide_output_channels(up, s)
    multiply_input_columns(down, s)
    assert torch.allclose(down(up(x)), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_smoothing_alone_leaves_the_float_model_unchanged(tiny_model, method):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (8, 24))
    with torch.no_grad():
        reference = model(ids).logits
    recipe = parse_recipe({"steps": [{"method": method, "smooth_only": True}]})
    outcome = quantize_model(model, recipe.steps, ids, batch_size=4, progress=False)
    assert outcome.layers == {}  # nothing quantized: a later step would do that
    smoothed = [r for r in outcome.reports if "skipped" not in r.extra]
    assert len(smoothed) == 2 * 3  # 2 blocks × (input norm, post-attention norm, up → down)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # the scales did move
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference, atol=1e-4)


def test_grouped_query_attention_skips_v_to_o_and_says_why(tiny_model):
    model = tiny_model("llama")  # 4 heads, 2 key/value heads
    recipe = parse_recipe({"steps": [{"method": "smoothquant"}]})
    outcome = quantize_model(model, recipe.steps, torch.randint(0, 320, (4, 16)), 4, False)
    skipped = [r for r in outcome.reports if "skipped" in r.extra]
    assert [r.name.rsplit(".", 2)[-2:] for r in skipped] == [["self_attn", "v_proj"]] * 2
    assert "grouped-query" in skipped[0].extra["skipped"]


def test_alpha_search_picks_the_lowest_calibration_error(tiny_model):
    model = tiny_model("llama")
    with torch.no_grad():  # plant an outlier channel so the choice matters
        model.model.layers[0].input_layernorm.weight[3] = 40.0
    grid = [0.0, 0.5, 0.9]
    recipe = parse_recipe({"steps": [{"method": "smoothquant", "alpha_grid": grid}]})
    outcome = quantize_model(model, recipe.steps, torch.randint(0, 320, (8, 24)), 4, False)
    first = next(r for r in outcome.reports if r.name.endswith("0.input_layernorm"))
    assert first.extra["alpha"] in grid
    assert first.extra["alpha"] > 0  # α = 0 leaves the planted outlier in the activations
    assert first.extra["act_ratio_after"] < first.extra["act_ratio_before"]


@pytest.mark.parametrize(
    "step, field",
    [
        ({"alpha": 1.5}, "steps.0.alpha"),
        ({"alpha": -0.1}, "steps.0.alpha"),
        ({"alpha_grid": [0.5, 2.0]}, "steps.0.alpha_grid.1"),
    ],
)
def test_alpha_outside_zero_one_is_refused(step, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        parse_recipe({"steps": [{"method": "smoothquant", **step}]})
    assert "less than or equal to 1" in str(err.value) or "greater than or equal to 0" in str(
        err.value
    )


def test_mapping_that_does_not_match_the_model_fails_before_any_work(
    tmp_path, tiny_checkpoint, text_files
):
    recipe = tiny_recipe("rtn", *text_files).model_dump()
    recipe["steps"] = [
        {
            "method": "smoothquant",
            "mappings": [{"smooth": "input_norm", "balance": ["self_attn.q_proj"]}],
        }
    ]
    recipe["calibration"]["dataset"] = str(tmp_path / "no-such-file.txt")  # never read
    out = tmp_path / "out"
    with pytest.raises(
        ConfigError, match=r"steps\.0\.mappings\.0.*no module 'input_norm'.*input_layernorm"
    ):
        quantize(tiny_checkpoint("llama"), parse_recipe(recipe), out, progress=False)
    assert not out.exists()


def test_mapping_with_mismatched_shapes_is_refused(tiny_model):
    model = tiny_model("llama")
    recipe = parse_recipe(
        {
            "steps": [
                {
                    "method": "awq",
                    "mappings": [{"smooth": "self_attn.v_proj", "balance": ["self_attn.o_proj"]}],
                }
            ]
        }
    )
    with pytest.raises(
        ConfigError, match=r"steps\.0\.mappings\.0: self_attn\.v_proj has 32 output channels"
    ):
        build_methods(model, recipe.steps)


def test_architecture_without_mappings_is_refused(tiny_model):
    model = tiny_model("gpt2")
    recipe = parse_recipe({"steps": [{"method": "smoothquant"}]})
    with pytest.raises(ConfigError, match="'gpt2' has no smoothing mappings"):
        build_methods(model, recipe.steps)


def test_arch_mappings_name_real_modules(tiny_model):
    for model_type in ("llama", "opt"):
        model = tiny_model(model_type)
        names = dict(model.named_modules())
        spec = arch_for(model)
        for mapping in spec.mappings:
            for name in (mapping.smooth, *mapping.balance):
                assert f"{spec.blocks}.0.{name}" in names


def test_awq_scale_search_never_does_worse_than_round_to_nearest():
    torch.manual_seed(0)
    X = torch.randn(256, 32)
    X[:, 5] *= 30  # a salient channel
    W = torch.randn(16, 32)
    scheme = QuantScheme(bits=3, group_size=16)
    s, ratio, err, plain = search_scales(X, X.abs().mean(0), [W], scheme, grid=10)
    assert err <= plain
    assert ratio > 0 and err < 0.9 * plain  # the salient channel is worth protecting
    Ws = W * s
    scale, zero = compute_qparams(Ws, scheme)
    direct = float(
        ((X / s) @ fake_quantize(Ws, scale, zero, scheme).t() - X @ W.t()).square().sum()
    )
    assert direct == pytest.approx(err, rel=1e-5)


def test_awq_clip_search_lowers_output_error():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    W[:, 0] = 8.0  # one large weight per row stretches min-max
    X = torch.randn(128, 64)
    scheme = QuantScheme(bits=3, group_size=32)

    def error(scale, zero):
        return float((X @ (fake_quantize(W, scale, zero, scheme) - W).t()).square().sum())

    clipped = search_clip(W, X, scheme, grid=20, max_shrink=0.5)
    assert error(*clipped) < error(*compute_qparams(W, scheme))


def test_fold_is_applied_through_a_mapping(tiny_model):
    model = tiny_model("llama")
    block = model.model.layers[0]
    mapping = Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    weights = [block.get_submodule(n).weight.detach().clone() for n in mapping.balance]
    s = torch.full((64,), 2.0)
    fold(block, mapping, s)
    assert torch.allclose(block.mlp.gate_proj.weight, weights[0] * 2)
    assert torch.allclose(
        column_max([block.mlp.up_proj.weight.detach()]), column_max([weights[1]]) * 2
    )


def test_pipeline_check_reads_only_the_config(tiny_checkpoint):
    from quantmill.api import check_recipe_source

    folder = tiny_checkpoint("llama")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # the check must not need them
    check_recipe_source(str(folder), parse_recipe({"steps": [{"method": "awq"}]}))
    bad = {
        "steps": [
            {"method": "rtn"},
            {"method": "awq", "mappings": [{"smooth": "ln", "balance": ["mlp.up_proj"]}]},
        ]
    }
    with pytest.raises(ConfigError, match=r"steps\.1\.mappings\.0: .* no module 'ln'"):
        check_recipe_source(str(folder), parse_recipe(bad))
    kv = {"steps": [{"method": "rtn"}], "evaluation": {"seq_len": 64, "kv_cache": {"bits": 4}}}
    with pytest.raises(ConfigError, match="kv_cache"):
        check_recipe_source(str(tiny_checkpoint("gpt2", "g")), parse_recipe(kv))
