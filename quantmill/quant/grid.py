"""The integer grid: scales, zero points, quantize and dequantize.

Convention (the one compressed-tensors stores): signed integers
``q in [-2^(b-1), 2^(b-1) - 1]`` and ``w ≈ (q - zero) * scale``, with one
scale per output row and group of ``group_size`` input columns. When the
number of columns is not a multiple of ``group_size`` the last group is
partial: it simply has fewer columns.

Shapes: ``W`` is ``[rows, cols]`` (``nn.Linear.weight``: ``[out, in]``);
``scale`` and ``zero`` are ``[rows, n_groups]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from quantmill.config import QuantScheme


@dataclass(frozen=True)
class ShrinkSearch:
    """The "mse" observer's search: per group, the range ``[wmin, wmax] · s`` for ``s``
    from 1 down to ``min_shrink`` in ``steps`` even steps, with the least
    ``Σ |Q(w) - w|^norm`` (``norm`` 2 is the squared error; a larger one weighs the
    clipped outliers' error more). A symmetric range becomes a scale by ``grid``
    (``symmetric_scale``); ``ShrinkSearch(1, 1, norm, grid)`` is min-max on that grid."""

    min_shrink: float
    steps: int
    norm: float
    grid: str = "signed"

    def shrinks(self) -> list[float]:
        return torch.linspace(1.0, self.min_shrink, self.steps).tolist()


# The shipped search: chosen by benchmarks/observer_search.py on held-out validation
# text (GPTQ's least geometric-mean perplexity over the 4-bit settings; its JSON has
# the others). Until 2026-12-06: 0.75, 26 steps, norm 2 (squared error), signed grid.
# The grid its symmetric ranges start from: benchmarks/symmetric_grid.py, chosen the
# same way over the comparison's three symmetric settings (GPTQ's geometric mean).
MSE_SEARCH = ShrinkSearch(min_shrink=0.8, steps=21, norm=2.4, grid="absmax")
# Scales are stored as float16 (half the bytes of float32: 0.25 instead of 0.5 bits
# per weight at group 64) and rounded to it as soon as they are chosen, so the
# in-memory model and the checkpoint hold the same grid. The floor is the
# smallest float16 subnormal step above zero that still divides safely.
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0**-24


def all_finite(t: Tensor, chunk: int = 1 << 22) -> bool:
    """True when no value of ``t`` is NaN or ±inf, checked a slice of about ``chunk``
    values at a time (``torch.isfinite(t).all()`` on a whole 8192² Hessian needs
    several copies' worth of temporaries)."""
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    rows = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))


def group_count(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(cols / group_size)


def expand_groups(t: Tensor, cols: int, group_size: int | None) -> Tensor:
    """``[rows, n_groups]`` → ``[rows, cols]``, repeating each group's value over its columns."""
    if group_size is None:
        return t.expand(t.shape[0], cols)
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def grouped(W: Tensor, group_size: int | None) -> Tensor:
    """``[rows, cols]`` → ``[rows, n_groups, g]``; a partial last group is padded with zeros.

    Zeros never change a group's min/max (the range always spans 0) and are
    represented exactly, so padding does not change the parameters found.
    """
    rows, cols = W.shape
    size = cols if group_size is None else group_size
    n = group_count(cols, group_size)
    if n * size != cols:
        W = torch.nn.functional.pad(W, (0, n * size - cols))
    return W.reshape(rows, n, size)


def symmetric_scale(wmin: Tensor, wmax: Tensor, scheme: QuantScheme, grid: str) -> Tensor:
    """The symmetric scale for ``[wmin, wmax]`` (spanning 0) by the convention ``grid``:

    - ``signed``: the whole signed range covers both ends exactly,
      ``max(wmax / q_max, wmin / q_min)``;
    - ``absmax``: compressed-tensors' (and so llmcompressor's), ``max(|wmin|, wmax)``
      over half the range ``(q_max - q_min) / 2``;
    - ``half-step``: the finest grid on which clamping costs no more than rounding
      does, each end at most half a step past the grid's last value,
      ``max(wmax / (q_max + ½), wmin / (q_min - ½))``.
    """
    if grid == "signed":
        return torch.maximum(wmax / scheme.q_max, wmin / scheme.q_min)
    if grid == "absmax":
        return torch.maximum(wmax, -wmin) / ((scheme.q_max - scheme.q_min) / 2)
    if grid == "half-step":
        return torch.maximum(wmax / (scheme.q_max + 0.5), wmin / (scheme.q_min - 0.5))
    raise ValueError(f"unknown symmetric grid {grid!r}: signed, absmax or half-step")


def minmax_params(
    wmin: Tensor, wmax: Tensor, scheme: QuantScheme, grid: str = "signed"
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point) covering ``[wmin, wmax]``, which must span 0; a symmetric
    one by ``grid`` (``symmetric_scale``; the min-max observer's is ``signed``)."""
    if scheme.symmetric:
        return storable_scale(symmetric_scale(wmin, wmax, scheme, grid)), None
    scale = storable_scale((wmax - wmin) / (scheme.q_max - scheme.q_min))
    zero = (scheme.q_min - torch.round(wmin / scale)).clamp(scheme.q_min, scheme.q_max)
    return scale, zero


def storable_scale(scale: Tensor) -> Tensor:
    """``scale`` rounded *up* to the storage dtype, so the grid still spans the range."""
    scale = scale.clamp(MIN_SCALE, torch.finfo(SCALE_DTYPE).max)
    stored = scale.to(SCALE_DTYPE)
    low = stored.float() < scale
    # one float16 step up: the relative spacing is 2^-10, nearest rounding lands there
    stored[low] = (stored[low].float() * (1 + 2.0**-10)).to(SCALE_DTYPE)
    return stored.float()


def compute_qparams(
    W: Tensor, scheme: QuantScheme, importance: Tensor | None = None,
    search: ShrinkSearch | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Per-group scale ``[rows, n_groups]`` and zero point (``None`` when symmetric).

    ``importance`` ``[cols]``: each input column's activation energy, which the
    ``imatrix`` observer weights the rounding error by (the ``mse`` search otherwise);
    ``search``: the shrink search of both (default ``MSE_SEARCH``, read at the call)."""
    search = search or MSE_SEARCH
    G = grouped(W.float(), scheme.group_size)
    wmin = G.amin(dim=2).clamp_max(0)
    wmax = G.amax(dim=2).clamp_min(0)
    if scheme.observer == "minmax":
        return minmax_params(wmin, wmax, scheme)
    weight = None
    if scheme.observer == "imatrix":
        if importance is None:
            raise ValueError("the imatrix observer needs each input column's importance")
        weight = importance_weights(importance.to(G.device), scheme.group_size)
    work = torch.empty_like(G)  # one buffer for every candidate: no per-step allocations

    def error(scale: Tensor, zero: Tensor | None) -> Tensor:
        return _error(G, scale[..., None], _z(zero), scheme, work, weight, search.norm)

    return best_shrink(wmin, wmax, scheme, search.shrinks(), error, search.grid)


def importance_weights(importance: Tensor, group_size: int | None) -> Tensor:
    """``[1, n_groups, g]`` weights from per-column activation energies; a floor of
    1e-6 of the mean keeps columns no token reached in the sum."""
    energy = importance.float().clamp_min(0)
    energy = energy + 1e-6 * energy.mean().clamp_min(1e-30)
    return grouped(energy[None, :], group_size)


def best_shrink(
    wmin: Tensor, wmax: Tensor, scheme: QuantScheme, shrinks: list[float], error,
    grid: str = "signed",
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Per group, the parameters of the range ``[wmin, wmax] · shrink`` (on ``grid``) with
    the least ``error(scale, zero)`` (a ``[rows, n_groups]`` tensor) over ``shrinks``."""
    best_err = torch.full_like(wmin, float("inf"))
    best_scale = torch.empty_like(wmin)
    best_zero = None if scheme.symmetric else torch.empty_like(wmin)
    for shrink in shrinks:
        scale, zero = minmax_params(wmin * shrink, wmax * shrink, scheme, grid)
        err = error(scale, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if best_zero is not None and zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _error(
    G: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme, work: Tensor,
    weight: Tensor | None = None, norm: float = 2.0,
) -> Tensor:  # fmt: skip
    """Σ over the last dim of ``|fake_quantize(G) - G|^norm`` (times ``weight``), in ``work``."""
    err = fake_quantize_column_into(work, G, scale, zero, scheme).sub_(G)
    err = err.pow_(2) if norm == 2 else err.abs_().pow_(norm)
    return (err if weight is None else err.mul_(weight)).sum(dim=2)


def _z(zero: Tensor | None) -> Tensor | None:
    return None if zero is None else zero[..., None]


def _fake(x: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Quantize-dequantize with parameters already broadcastable to ``x``."""
    offset = 0.0 if zero is None else zero
    q = torch.clamp(torch.round(x / scale) + offset, scheme.q_min, scheme.q_max)
    return (q - offset) * scale


def quantize(W: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Integers ``[rows, cols]`` (int8) for ``W`` on the given grid."""
    cols = W.shape[1]
    s = expand_groups(scale, cols, scheme.group_size)
    offset = 0.0 if zero is None else expand_groups(zero, cols, scheme.group_size)
    q = torch.clamp(torch.round(W.float() / s) + offset, scheme.q_min, scheme.q_max)
    return q.to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """Float weights ``[rows, cols]`` from integers and their grid."""
    cols = q.shape[1]
    s = expand_groups(scale, cols, scheme.group_size)
    offset = 0.0 if zero is None else expand_groups(zero, cols, scheme.group_size)
    return (q.float() - offset) * s


def fake_quantize(W: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """``dequantize(quantize(W))`` in one pass, in float32.

    Works on the ``[rows, n_groups, group]`` view with the group parameters
    broadcast, in place on one new tensor: a layer costs one copy of its weights
    (not four), which is what bounds an 8B model's peak memory under RTN.
    """
    rows, cols = W.shape
    G = grouped(W.float(), scheme.group_size)
    q = torch.div(G, scale[..., None])
    q.round_()
    if zero is not None:
        q.add_(zero[..., None])
    q.clamp_(scheme.q_min, scheme.q_max)
    if zero is not None:
        q.sub_(zero[..., None])
    q.mul_(scale[..., None])
    q = q.reshape(rows, -1)
    return q if q.shape[1] == cols else q[:, :cols].contiguous()


def fake_quantize_column(
    w: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme
) -> Tensor:
    """One column ``[rows]`` with its group's ``scale``/``zero`` ``[rows]``."""
    return _fake(w, scale, zero, scheme)


def fake_quantize_column_into(
    out: Tensor, w: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme
) -> Tensor:
    """``fake_quantize_column`` written into ``out`` (no new tensor: GPTQ's column loop
    calls it once per column, where each allocation and operation shows)."""
    torch.div(w, scale, out=out).round_()
    if zero is not None:
        out.add_(zero)
    out.clamp_(scheme.q_min, scheme.q_max)
    if zero is not None:
        out.sub_(zero)
    return out.mul_(scale)
