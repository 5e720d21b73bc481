"""Scales refitted to GPTQ's integers (quantmill/quant/refit.py)."""

import pytest
import torch

from quantmill.config import QuantScheme
from quantmill.quant.gptq import HessianAccumulator, gptq_quantize_weight
from quantmill.quant.grid import SCALE_DTYPE, dequantize, quantize
from quantmill.quant.refit import refit_scales
from tests.unit.test_driver import calib, steps
from tests.unit.test_gptq_math import SETTINGS, correlated_inputs


def damped_error(W, Q, H, dampening):
    E = W - Q
    damp = dampening * float(torch.diag(H).mean())
    return ((E @ H) * E).sum(1) + damp * E.square().sum(1)


def gptq_case(setting, seed=0, rows=24, cols=80):
    torch.manual_seed(seed)
    X = correlated_inputs(1024, cols, seed=seed)
    W = torch.randn(rows, cols)
    acc = HessianAccumulator(cols)
    acc.add(X)
    H = acc.hessian()
    scheme = QuantScheme(**setting)
    result = gptq_quantize_weight(
        W, H, scheme, block_size=32, static_groups=setting["group_size"] is not None
    )
    return W, H, scheme, result


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_refit_lowers_every_rows_error_and_keeps_the_integers(setting):
    W, H, scheme, result = gptq_case(setting)
    refit = refit_scales(W, H, result.weight, result.scale, result.zero, scheme, result.dampening)
    before = damped_error(W, result.weight, H, result.dampening)
    after = damped_error(W, refit.weight, H, result.dampening)
    assert torch.all(after <= before * (1 + 1e-5))
    assert refit.error_after < 0.99 * refit.error_before  # it does find something
    assert refit.rows_changed > 0
    assert float(after.sum()) == pytest.approx(refit.error_after, rel=1e-4)
    # the integers the checkpoint packs are the same; the weights lie on the new grid
    codes = quantize(result.weight, result.scale, result.zero, scheme)
    assert torch.equal(quantize(refit.weight, refit.scale, result.zero, scheme), codes)
    # scales are what the checkpoint stores (float16), and positive
    assert torch.equal(refit.scale.to(SCALE_DTYPE).float(), refit.scale)
    assert torch.all(refit.scale > 0)


def test_refit_reaches_the_least_squares_scale_per_channel():
    """One group per row: the best scale for integers c is cᵀH_λw / cᵀH_λc."""
    setting = dict(bits=4, group_size=None, symmetric=True)
    W, H, scheme, result = gptq_case(setting, seed=3, rows=6, cols=40)
    refit = refit_scales(W, H, result.weight, result.scale, None, scheme, result.dampening)
    Hd = H + result.dampening * torch.diag(H).mean() * torch.eye(H.shape[0])
    c = quantize(result.weight, result.scale, None, scheme).float()
    best = ((c @ Hd) * W).sum(1) / ((c @ Hd) * c).sum(1)
    torch.testing.assert_close(refit.scale[:, 0], best, rtol=2e-3, atol=0)  # float16 steps


def test_a_group_whose_integers_are_all_zero_keeps_its_scale():
    setting = dict(bits=4, group_size=16, symmetric=True)
    W, H, scheme, result = gptq_case(setting, rows=8, cols=48)
    weight = result.weight.clone()
    weight[:, 16:32] = 0  # every integer of group 1 is zero
    refit = refit_scales(W, H, weight, result.scale, None, scheme, result.dampening)
    assert torch.equal(refit.scale[:, 1], result.scale[:, 1])
    assert torch.all(refit.weight[:, 16:32] == 0)


def test_refit_changes_nothing_it_is_given():
    setting = dict(bits=4, group_size=32, symmetric=False)
    W, H, scheme, result = gptq_case(setting)
    given = [t.clone() for t in (W, H, result.weight, result.scale, result.zero)]
    refit_scales(W, H, result.weight, result.scale, result.zero, scheme, result.dampening)
    for before, now in zip(given, (W, H, result.weight, result.scale, result.zero), strict=True):
        assert torch.equal(before, now)


def test_gptq_with_refit_lowers_the_model_output_error(tiny_model):
    """On a tiny model: each layer reports the error the refit removed, and the model's
    outputs move closer to the float model's than plain GPTQ's do."""
    from quantmill.driver import quantize_model

    ids = calib(16, 32)
    reference = tiny_model("llama")
    with torch.no_grad():
        target = reference(ids).logits
    errors, reports = {}, {}
    for refit in (False, True):
        model = tiny_model("llama")
        recipe = steps("gptq", bits=3, group_size=16)
        recipe[0] = recipe[0].model_copy(update={"refit_scales": refit})
        outcome = quantize_model(model, recipe, ids, 8, False)
        reports[refit] = outcome.reports
        with torch.no_grad():
            errors[refit] = float((model(ids).logits - target).square().mean())
    assert errors[True] < errors[False]
    gains = [r.extra["refit_gain"] for r in reports[True]]
    assert all(0 <= g < 1 for g in gains) and max(gains) > 0
    assert not any("refit_gain" in r.extra for r in reports[False])


def test_refit_reaches_the_least_squares_scales_per_group():
    """Several groups per row (the last one partial): the scales solve
    ``(AᵀH_λA) s = AᵀH_λ w`` with ``A`` the row's integers spread over its groups."""
    setting = dict(bits=3, group_size=16, symmetric=False)
    W, H, scheme, result = gptq_case(setting, seed=5, rows=5, cols=40)
    refit = refit_scales(W, H, result.weight, result.scale, result.zero, scheme, result.dampening)
    Hd = (H + result.dampening * torch.diag(H).mean() * torch.eye(40)).double()
    codes = quantize(result.weight, result.scale, result.zero, scheme).double()
    for r in range(5):
        A = torch.zeros(40, 3, dtype=torch.float64)
        for g in range(3):
            cols = slice(16 * g, min(40, 16 * (g + 1)))
            A[cols, g] = codes[r, cols] - result.zero[r, g]
        best = torch.linalg.solve(A.t() @ Hd @ A, A.t() @ Hd @ W[r].double())
        torch.testing.assert_close(refit.scale[r].double(), best, rtol=3e-3, atol=0)


def test_refit_in_chunks_of_rows_gives_the_same_scales(monkeypatch):
    """Large layers are refitted a few rows at a time; the rows do not interact."""
    from quantmill.quant import refit as refit_module

    setting = dict(bits=4, group_size=16, symmetric=False)
    W, H, scheme, result = gptq_case(setting, seed=7, rows=10, cols=48)
    args = (W, H, result.weight, result.scale, result.zero, scheme, result.dampening)
    whole = refit_scales(*args)
    monkeypatch.setattr(refit_module, "CHUNK_VALUES", 3 * 48)  # chunks of 3 rows
    chunked = refit_scales(*args)
    torch.testing.assert_close(chunked.scale, whole.scale, rtol=1e-3, atol=0)  # a float16 step
    assert chunked.error_after == pytest.approx(whole.error_after, rel=1e-5)


def test_gptq_on_a_given_grid_keeps_it():
    """``grid``: GPTQ chooses integers on the scales and zero points it is given."""
    setting = dict(bits=3, group_size=16, symmetric=False)
    W, H, scheme, result = gptq_case(setting, seed=2, rows=8, cols=48)
    scale, zero = result.scale * 1.1, result.zero.clone()
    again = gptq_quantize_weight(W, H, scheme, block_size=32, grid=(scale, zero))
    assert torch.equal(again.scale, scale) and torch.equal(again.zero, zero)
    codes = quantize(again.weight, scale, zero, scheme)
    torch.testing.assert_close(dequantize(codes, scale, zero, scheme), again.weight)


@pytest.mark.parametrize("observer", ["minmax", "imatrix"])
def test_a_later_round_on_the_kept_factor_matches_factorizing_again(observer):
    """The refit's rounds reuse the first round's factorization of ``H``: the same
    weights to the bit as GPTQ factorizing ``H`` again (a dead column included), without
    reading ``H``; a factor made with other settings is refused."""
    from quantmill.quant.gptq import gptq_factor

    setting = dict(bits=3, group_size=16, symmetric=False, observer=observer)
    W, H, scheme, _ = gptq_case(setting, seed=4, rows=8, cols=48)
    H[5, :] = H[:, 5] = 0  # a column no input reached
    first = gptq_quantize_weight(W, H, scheme, block_size=16, keep_factor=True)
    assert first.factor is not None and bool(first.factor.dead[5])
    grid = (first.scale * 1.05, first.zero)
    fresh = gptq_quantize_weight(W, H.clone(), scheme, block_size=16, grid=grid)
    nan = torch.full_like(H, float("nan"))  # not read when the factor is given
    reused = gptq_quantize_weight(W, nan, scheme, block_size=16, grid=grid,
                                  factor=first.factor)  # fmt: skip
    assert torch.equal(reused.weight, fresh.weight) and reused.loss == fresh.loss
    assert reused.factor is None  # not kept unless asked
    assert torch.equal(gptq_factor(H).Hinv, first.factor.Hinv)
    with pytest.raises(ValueError, match="made with dampening 0.01, actorder True"):
        gptq_quantize_weight(W, H, scheme, dampening=0.1, factor=first.factor)


def test_refit_rounds_keep_the_least_error_round(tiny_model):
    """Further rounds (GPTQ again on the refitted grid, then refit) never leave a layer
    worse than one refit, and lower some; the report says which round each kept."""
    from quantmill.driver import quantize_model
    from quantmill.methods.gptq import GPTQConfig

    ids = calib(16, 32)
    reports = {}
    for rounds in (1, 3):
        recipe = steps("gptq", bits=3, group_size=16)
        recipe[0] = recipe[0].model_copy(update={"refit_rounds": rounds})
        reports[rounds] = quantize_model(tiny_model("llama"), recipe, ids, 8, False).reports
    one = [r.extra["refit_gain"] for r in reports[1]]
    three = [r.extra["refit_gain"] for r in reports[3]]
    rounds = [r.extra["refit_round"] for r in reports[3]]
    assert "refit_round" not in reports[1][0].extra
    assert set(rounds) <= {1, 2, 3} and max(rounds) > 1
    # the first layer sees the same inputs either way: its kept error is no larger
    assert three[0] >= one[0] - 1e-9
    assert sum(three) > sum(one)
    with pytest.raises(ValueError, match="refit_rounds: 2 rounds need refit_scales: true"):
        GPTQConfig(weights={"bits": 4}, refit_rounds=2, refit_scales=False)
    # without the refit the shipped rounds mean one GPTQ, and the saved config reloads
    plain = GPTQConfig(weights={"bits": 4}, refit_scales=False)
    assert plain.refit_rounds == 1
    assert GPTQConfig.model_validate(plain.model_dump()) == plain
