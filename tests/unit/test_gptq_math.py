import pytest
import torch

from quantmill.config import QuantScheme
from quantmill.quant.gptq import (
    HessianAccumulator,
    HessianNotPositiveDefinite,
    gptq_quantize_weight,
    inverse_cholesky,
)
from quantmill.quant.grid import compute_qparams, expand_groups, fake_quantize


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated and unevenly scaled, like activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.logspace(0, 1.5, cols)[torch.randperm(cols, generator=g)]
    return (torch.randn(n, cols, generator=g) @ mix) * scales


def output_error(W, Q, X):
    return float((X @ (W - Q).t()).square().mean())


SETTINGS = [
    dict(bits=4, group_size=32, symmetric=True),
    dict(bits=4, group_size=32, symmetric=False),
    dict(bits=4, group_size=None, symmetric=True),
    dict(bits=3, group_size=32, symmetric=True),
    dict(bits=4, group_size=48, symmetric=True),  # 80 columns: a partial last group
]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("actorder,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_lowers_output_error_against_rtn(setting, actorder, static_groups):
    torch.manual_seed(0)
    cols = 80
    X = correlated_inputs(2048, cols)
    W = torch.randn(48, cols)
    acc = HessianAccumulator(cols)
    for chunk in X.split(512):
        acc.add(chunk)
    scheme = QuantScheme(**setting)
    result = gptq_quantize_weight(
        W, acc.hessian(), scheme, block_size=32, actorder=actorder, static_groups=static_groups
    )
    s, z = compute_qparams(W, scheme)
    rtn = fake_quantize(W, s, z, scheme)
    assert output_error(W, result.weight, X) < 0.8 * output_error(W, rtn, X)
    assert result.loss > 0


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_gptq_weights_lie_on_the_returned_grid(setting):
    torch.manual_seed(1)
    cols = 80
    X = correlated_inputs(512, cols, seed=1)
    W = torch.randn(16, cols)
    scheme = QuantScheme(**setting)
    result = gptq_quantize_weight(W, 2 * X.t() @ X / 512, scheme, actorder=True)
    # re-quantizing with the returned grid changes nothing: this is what gets packed
    assert torch.allclose(
        fake_quantize(result.weight, result.scale, result.zero, scheme), result.weight
    )
    step = expand_groups(result.scale, cols, scheme.group_size)
    assert (step > 0).all()


def test_static_groups_take_scales_from_the_original_weights():
    torch.manual_seed(2)
    X = correlated_inputs(512, 64, seed=2)
    W = torch.randn(8, 64)
    scheme = QuantScheme(bits=4, group_size=16)
    result = gptq_quantize_weight(W, X.t() @ X, scheme, actorder=True, static_groups=True)
    expected, _ = compute_qparams(W, scheme)
    assert torch.equal(result.scale, expected)


def test_hessian_accumulator_matches_direct_formula():
    X = torch.randn(3, 10, 6)
    acc = HessianAccumulator(6)
    acc.add(X[:2])
    acc.add(X[2:])
    flat = X.reshape(-1, 6)
    assert torch.allclose(acc.hessian(), 2 * flat.t() @ flat / 30, atol=1e-5)


def test_bfloat16_inputs_give_a_float32_hessian_close_to_the_exact_one():
    torch.manual_seed(0)
    X = (torch.randn(4, 512, 64) * torch.linspace(0.1, 20, 64)).bfloat16()
    acc = HessianAccumulator(64)
    for part in X:
        acc.add(part)
    H = acc.hessian()
    flat = X.reshape(-1, 64).double()
    exact = 2 * flat.t() @ flat / flat.shape[0]
    assert H.dtype == torch.float32
    rel = ((H.double() - exact).norm() / exact.norm()).item()
    assert 0 < rel < 1e-3  # rounded once per batch (not exact), far below the dampening


def test_float16_inputs_are_widened_before_their_squares_are_summed():
    X = torch.full((4096, 8), 200.0, dtype=torch.float16)  # Σx² = 1.6e8 > float16's max
    acc = HessianAccumulator(8)
    acc.add(X)
    assert torch.isfinite(acc.hessian()).all()
    assert torch.allclose(acc.hessian(), torch.full((8, 8), 2 * 200.0**2))


def test_dead_inputs_are_zeroed_and_the_rest_still_quantized():
    X = correlated_inputs(256, 32)
    X[:, 5] = 0  # a feature that never fires
    W = torch.randn(8, 32)
    result = gptq_quantize_weight(W, X.t() @ X, QuantScheme(bits=4, group_size=None))
    assert torch.all(result.weight[:, 5] == 0)
    assert torch.isfinite(result.weight).all()


def test_singular_hessian_gets_more_dampening():
    # rank-1 Hessian: singular; λ·mean(diag) makes it positive definite
    x = torch.randn(1, 16)
    U, damp = inverse_cholesky(x.t() @ x, dampening=0.01)
    assert torch.isfinite(U).all() and damp >= 0.01


def test_hessian_that_stays_indefinite_raises_a_clear_error():
    H = -torch.eye(8)  # negative definite: no dampening fraction of mean(diag) helps
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
        inverse_cholesky(H, dampening=0.01)


def test_non_finite_hessian_is_refused():
    H = torch.eye(4)
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize_weight(torch.randn(2, 4), H, QuantScheme(bits=4, group_size=None))
