"""AWQ's two searches, on tensors: per-channel scales and per-group clipping.

Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024. Both searches score candidates by
the error of the quantized layers' *outputs* on calibration tokens, not by
weight error: channels that carry large activations matter more.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmill.config import QuantScheme
from quantmill.quant.grid import (
    best_shrink,
    compute_qparams,
    fake_quantize,
    fake_quantize_column,
    grouped,
)
from quantmill.quant.smooth import awq_scales


@torch.no_grad()
def search_scales(
    X: Tensor, act_mean: Tensor, weights: list[Tensor], scheme: QuantScheme, grid: int
) -> tuple[Tensor, float, float, float]:
    """The ``s = mean|X|^r`` (r in ``[0, 1)`` over ``grid`` points) whose quantized layers
    best reproduce ``X Wᵀ``. Returns ``s``, the chosen ``r``, its error and the error at
    ``r = 0`` (plain round-to-nearest), so callers can report the gain."""
    reference = [X @ W.t() for W in weights]
    best: tuple[float, float, Tensor] | None = None
    plain = float("nan")
    for step in range(grid):
        ratio = step / grid
        s = awq_scales(act_mean, ratio)
        Xs = X / s
        err = 0.0
        for W, ref in zip(weights, reference, strict=True):
            Ws = W * s
            scale, zero = compute_qparams(Ws, scheme)
            err += float((Xs @ fake_quantize(Ws, scale, zero, scheme).t() - ref).square().sum())
        if step == 0:
            plain = err
        if best is None or err < best[0]:
            best = (err, ratio, s)
    assert best is not None
    err, ratio, s = best
    return s, ratio, err, plain


@torch.no_grad()
def search_clip(
    W: Tensor, X: Tensor, scheme: QuantScheme, grid: int, max_shrink: float
) -> tuple[Tensor, Tensor | None]:
    """Per (row, group) grid parameters whose range is shrunk by the factor in
    ``[1 - max_shrink, 1]`` that minimises ``Σ_tokens ((Q(W) - W) x)²`` for that group."""
    G = grouped(W.float(), scheme.group_size)  # [rows, n_groups, g]
    Xg = grouped(X.float(), scheme.group_size)  # [tokens, n_groups, g]
    wmin = G.amin(dim=2).clamp_max(0)
    wmax = G.amax(dim=2).clamp_min(0)

    def error(scale: Tensor, zero: Tensor | None) -> Tensor:
        z = None if zero is None else zero[..., None]
        delta = fake_quantize_column(G, scale[..., None], z, scheme) - G
        return torch.einsum("rgk,ngk->rgn", delta, Xg).square().sum(dim=2)

    shrinks = torch.linspace(1.0, 1.0 - max_shrink, grid).tolist()
    return best_shrink(wmin, wmax, scheme, shrinks, error)
