import pytest
import torch

from quantmill.config import QuantScheme
from quantmill.quant import grid
from quantmill.quant.grid import (
    ShrinkSearch,
    compute_qparams,
    dequantize,
    expand_groups,
    fake_quantize,
    group_count,
    quantize,
    storable_scale,
    symmetric_scale,
)

SCHEMES = [
    QuantScheme(bits=b, group_size=g, symmetric=s)
    for b in (2, 3, 4, 8)
    for g in (None, 16, 32)
    for s in (True, False)
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_rtn_is_exact_on_values_already_on_the_grid(scheme):
    torch.manual_seed(0)
    rows, cols = 8, 80  # 80 is not a multiple of 32: a partial last group
    n = group_count(cols, scheme.group_size)
    scale = (torch.rand(rows, n) + 0.5).half().float() / 16
    # with both ends present the range spans 0, which min-max maps to zero point 0
    zero = None if scheme.symmetric else torch.zeros(rows, n)
    q = torch.randint(scheme.q_min, scheme.q_max + 1, (rows, cols), dtype=torch.int8)
    # every group touches both ends of the grid, so min-max finds the same scale
    for start in range(0, cols, scheme.group_size or cols):
        q[:, start], q[:, start + 1] = scheme.q_min, scheme.q_max
    W = dequantize(q, scale, zero, scheme)
    s2, z2 = compute_qparams(W, scheme)
    assert torch.equal(fake_quantize(W, s2, z2, scheme), W)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_quantize_dequantize_round_trip_and_range(scheme):
    torch.manual_seed(1)
    W = torch.randn(16, 72)
    scale, zero = compute_qparams(W, scheme)
    q = quantize(W, scale, zero, scheme)
    assert q.dtype == torch.int8
    assert int(q.min()) >= scheme.q_min and int(q.max()) <= scheme.q_max
    assert torch.equal(dequantize(q, scale, zero, scheme), fake_quantize(W, scale, zero, scheme))
    # error bounded by half a step, everywhere (min-max never clips)
    step = expand_groups(scale, 72, scheme.group_size)
    assert ((fake_quantize(W, scale, zero, scheme) - W).abs() <= step * (0.5 + 1e-4)).all()


def test_partial_last_group_has_its_own_scale():
    scheme = QuantScheme(bits=4, group_size=128)
    W = torch.ones(2, 576)
    W[:, 512:] = 100.0  # the partial last group (64 columns) holds the large values
    scale, _ = compute_qparams(W, scheme)
    assert scale.shape == (2, 5)
    assert torch.all(scale[:, :4] < scale[:, 4:])
    assert torch.allclose(fake_quantize(W, scale, None, scheme), W, rtol=1e-2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_never_worse_than_minmax(symmetric):
    torch.manual_seed(2)
    W = torch.randn(64, 256) * torch.rand(64, 1)
    W[0, 0] = 25.0  # an outlier that min-max wastes its range on
    errs = {}
    for observer in ("minmax", "mse"):
        scheme = QuantScheme(bits=3, group_size=64, symmetric=symmetric, observer=observer)
        s, z = compute_qparams(W, scheme)
        errs[observer] = float((fake_quantize(W, s, z, scheme) - W).square().sum())
    assert errs["mse"] < errs["minmax"]


@pytest.mark.parametrize("norm", [2.0, 2.4, 3.0])
def test_shrink_search_minimises_its_own_norm(norm):
    torch.manual_seed(3)
    W = torch.randn(32, 128)
    W[:, 5] *= 8  # one column of outliers, as the attention/MLP inputs have
    scheme = QuantScheme(bits=4, group_size=None, observer="mse")
    search = ShrinkSearch(min_shrink=0.7, steps=31, norm=norm)
    s, z = compute_qparams(W, scheme, search=search)
    found = (fake_quantize(W, s, z, scheme) - W).abs().pow(norm).sum(dim=1)
    for shrink in search.shrinks():  # no shrink tried beats the one chosen, row by row
        t = storable_scale_for(W * shrink, scheme)
        other = (fake_quantize(W, t, None, scheme) - W).abs().pow(norm).sum(dim=1)
        assert torch.all(found <= other * (1 + 1e-5))


def test_a_larger_norm_clips_outliers_less():
    torch.manual_seed(4)
    W = torch.randn(64, 256) * 0.1
    W[:, 0] = 2.0  # one heavy weight per row: clipping it costs one large error
    scales = {}
    for norm in (2.0, 3.0):
        search = ShrinkSearch(min_shrink=0.5, steps=51, norm=norm)
        scheme = QuantScheme(bits=4, group_size=None, observer="mse")
        scales[norm], _ = compute_qparams(W, scheme, search=search)
    assert torch.all(scales[3.0] >= scales[2.0])
    assert torch.any(scales[3.0] > scales[2.0])
    assert ShrinkSearch(0.8, 21, 2.4).shrinks()[-1] == pytest.approx(0.8)


def storable_scale_for(W, scheme):
    minmax = scheme.model_copy(update={"observer": "minmax"})
    scale, _ = compute_qparams(W, minmax)
    return scale


def test_symmetric_grid_uses_the_negative_end():
    scheme = QuantScheme(bits=4, group_size=None, symmetric=True)
    W = torch.tensor([[-8.0, 0.0, 7.0]])
    s, _ = compute_qparams(W, scheme)
    assert float(s) == 1.0
    assert quantize(W, s, None, scheme).tolist() == [[-8, 0, 7]]


@pytest.mark.parametrize("name", ["signed", "absmax", "half-step"])
@pytest.mark.parametrize("bits", [3, 4])
def test_each_symmetric_grid_errs_at_most_half_a_step(name, bits):
    torch.manual_seed(5)
    W = torch.randn(32, 128) * torch.rand(32, 1)
    W[:4] = W[:4].abs()  # rows with no negative end, and rows with no positive one
    W[4:8] = -W[4:8].abs()
    scheme = QuantScheme(bits=bits, group_size=32, symmetric=True)
    G = W.reshape(32, 4, 32)
    scale = storable_scale(
        symmetric_scale(G.amin(2).clamp_max(0), G.amax(2).clamp_min(0), scheme, name)
    )
    step = expand_groups(scale, 128, 32)
    assert ((fake_quantize(W, scale, None, scheme) - W).abs() <= step * (0.5 + 1e-4)).all()


def test_half_step_grid_is_the_finest():
    scheme = QuantScheme(bits=3, group_size=None, symmetric=True)
    wmin, wmax = torch.tensor([-4.0, -1.0, -3.5]), torch.tensor([1.0, 3.0, 3.5])
    scales = {n: symmetric_scale(wmin, wmax, scheme, n) for n in ("signed", "absmax", "half-step")}
    assert torch.all(scales["half-step"] <= scales["signed"])
    assert torch.all(scales["half-step"] <= scales["absmax"])
    assert scales["absmax"].tolist() == pytest.approx([4 / 3.5, 3 / 3.5, 1.0])
    assert scales["half-step"].tolist() == pytest.approx([4 / 4.5, 3 / 3.5, 1.0])
    with pytest.raises(ValueError, match="half-step"):
        symmetric_scale(wmin, wmax, scheme, "nearest")


def test_the_search_starts_from_its_grid_and_min_max_keeps_signed(monkeypatch):
    W = torch.tensor([[-8.0, 0.0, 7.0]])
    minmax = QuantScheme(bits=4, group_size=None, symmetric=True)
    mse = minmax.model_copy(update={"observer": "mse"})
    one = ShrinkSearch(1.0, 1, 2.0, grid="half-step")  # no shrinking: min-max on that grid
    assert float(compute_qparams(W, mse, search=one)[0]) == pytest.approx(8 / 8.5, rel=1e-3)
    monkeypatch.setattr(grid, "MSE_SEARCH", one)  # read at the call
    assert float(compute_qparams(W, mse)[0]) == pytest.approx(8 / 8.5, rel=1e-3)
    assert float(compute_qparams(W, minmax)[0]) == 1.0
