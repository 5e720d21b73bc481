"""The imatrix observer: the per-group range search weighted by each input column's
activation energy, for RTN (which then reads calibration text) and GPTQ."""

import pytest
import torch

from quantmill.config import QuantScheme
from quantmill.driver import quantize_model
from quantmill.errors import ConfigError
from quantmill.layers import get_weight
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.recipe import parse_recipe


def scheme(observer, **kw):
    return QuantScheme(bits=3, group_size=16, observer=observer, **kw)


@pytest.mark.parametrize("symmetric", [True, False])
def test_equal_importance_is_the_mse_search(symmetric):
    W = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))  # a partial group
    mse = compute_qparams(W, scheme("mse", symmetric=symmetric))
    flat = compute_qparams(W, scheme("imatrix", symmetric=symmetric), torch.full((40,), 3.0))
    assert torch.equal(mse[0], flat[0])
    assert (mse[1] is None and flat[1] is None) or torch.equal(mse[1], flat[1])


def test_it_trades_error_on_quiet_columns_for_the_loud_ones():
    """Inputs whose energy sits in a few columns: weighting by it gives the lower
    output error, though the plain weight error is higher."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 64, generator=g)
    loud = torch.ones(64)
    loud[::9] = 40.0
    X = torch.randn(2048, 64, generator=g) * loud.sqrt()
    energy = X.square().mean(dim=0)
    out = {}
    for observer in ("mse", "imatrix"):
        s = scheme(observer)
        scale, zero = compute_qparams(W, s, energy if observer == "imatrix" else None)
        Q = fake_quantize(W, scale, zero, s)
        out[observer] = (float((X @ (Q - W).t()).square().mean()), float((Q - W).square().sum()))
    assert out["imatrix"][0] < out["mse"][0]
    assert out["imatrix"][1] > out["mse"][1]


def test_only_the_methods_that_collect_it_take_it():
    for method in ("rtn", "gptq"):
        parse_recipe({"steps": [{"method": method, "weights": {"observer": "imatrix"}}]})
    with pytest.raises(ConfigError, match="steps.0.weights.observer: imatrix needs"):
        parse_recipe({"steps": [{"method": "awq", "weights": {"observer": "imatrix"}}]})


def test_rtn_with_imatrix_reads_calibration_and_uses_it(tiny_model):
    rtn = parse_recipe({"steps": [{"method": "rtn", "weights": {"observer": "imatrix"}}]})
    assert rtn.needs_calibration()
    assert not parse_recipe({"steps": [{"method": "rtn"}]}).needs_calibration()
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    weights = {"bits": 3, "group_size": 16}
    grids = {}
    for observer in ("mse", "imatrix"):
        model = tiny_model("llama")
        steps = parse_recipe(
            {"steps": [{"method": "rtn", "weights": {**weights, "observer": observer}}]}
        ).steps
        outcome = quantize_model(model, steps, ids, 4, False)
        for name, quant in outcome.layers.items():
            W = get_weight(model.get_submodule(name), False).float()
            assert torch.equal(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W)
        grids[observer] = outcome.layers
    differ = [n for n in grids["mse"] if not torch.equal(grids["mse"][n].scale,
                                                          grids["imatrix"][n].scale)]  # fmt: skip
    assert len(differ) == len(grids["mse"])  # the energies moved every layer's ranges


def test_gptq_with_imatrix_runs_static_and_in_activation_order(tiny_model):
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    for static in (True, False):
        model = tiny_model("llama")
        steps = parse_recipe({"steps": [{
            "method": "gptq", "static_groups": static, "actorder": True,
            "weights": {"bits": 3, "group_size": 16, "observer": "imatrix"},
        }]}).steps  # fmt: skip
        outcome = quantize_model(model, steps, ids, 4, False)
        for name, quant in outcome.layers.items():
            W = get_weight(model.get_submodule(name), False).float()
            assert torch.equal(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W)


def test_an_expert_no_token_reached_falls_back_to_equal_weights(tiny_model):
    from tests.unit.test_moe import _Never

    model = tiny_model("qwen3_moe")
    for block in model.model.layers:
        block.mlp.gate = _Never(block.mlp.gate, banned=3)
    steps = parse_recipe(
        {"steps": [{"method": "rtn", "weights": {"group_size": 16, "observer": "imatrix"}}]}
    ).steps
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    outcome = quantize_model(model, steps, ids, 4, False, all_experts=False)
    reports = {r.name: r for r in outcome.reports}
    assert reports["model.layers.0.mlp.experts.3.up_proj"].extra["fallback"] == "mse"
    assert "fallback" not in reports["model.layers.0.mlp.experts.0.up_proj"].extra
