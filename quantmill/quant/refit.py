"""Scales refitted to GPTQ's integers: the last step of a layer's GPTQ, optional.

GPTQ chooses each weight's integer on a grid whose scales were fixed before
(from the original weights, or from the error-updated group when its first
column was reached). Once every integer is chosen the scales are free again:
with the integers ``c`` and the zero points held, each row's scales ``s``
(one per group) that minimise the layer's output error on the calibration
inputs,

    (w − Σ_g s_g c_g)ᵀ H_λ (w − Σ_g s_g c_g),   H_λ = H + λ·mean(diag H)·I,

are one ``[groups, groups]`` linear system per row (``w``: the original row,
``H_λ``: the damped Hessian GPTQ itself used). The solve works on the
multiplicative change ``t`` of each scale (``s' = s·t``) with a small pull
towards ``t = 1``; the new scales are rounded to their storage dtype and a row
keeps its old scales unless its error, measured again with the rounded ones, is
lower and every new scale is positive. So the error never grows, and the
integers (what the checkpoint packs) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quantmill.config import QuantScheme
from quantmill.quant.grid import MIN_SCALE, SCALE_DTYPE, dequantize, grouped, quantize

# The pull of each factor t towards 1, relative to its own diagonal term: keeps a row
# whose groups are nearly collinear from trading huge opposite changes.
RIDGE = 1e-4
# Rows per chunk: about this many float32 values of the layer's weights, or of the
# rows' [groups, groups] systems in float64 (a few such temporaries live at once: at an
# 8B model's down_proj, 224 groups of 64, a chunk is 41 rows and its systems 16 MB).
# At a 1B model's down_proj (2048 × 8192) chunks of 512 rows refit faster than the
# whole layer at once (smaller temporaries stay in cache) and add next to nothing to
# the layer's peak memory; SmolLM2's layers still fit in one chunk.
CHUNK_VALUES = 1 << 22


@dataclass
class RefitResult:
    weight: Tensor  # dequantized with the new scales [rows, cols], float32
    scale: Tensor  # [rows, n_groups], values of SCALE_DTYPE held in float32
    error_before: float  # Σ over rows of the damped output error, before
    error_after: float  # and after (≤ error_before)
    rows_changed: int


def refit_scales(
    W: Tensor, H: Tensor, weight: Tensor, scale: Tensor, zero: Tensor | None,
    scheme: QuantScheme, dampening: float,
) -> RefitResult:  # fmt: skip
    """New scales for the integers of ``weight`` (GPTQ's dequantized result on the
    grid ``scale``/``zero``), the original weights ``W`` ``[rows, cols]`` and the
    layer-input Hessian ``H`` ``[cols, cols]`` with ``dampening`` (the fraction of
    mean(diag H) GPTQ added). Nothing given is changed."""
    rows, cols = W.shape
    codes = quantize(weight, scale, zero, scheme)
    H = H.to(W.device, torch.float32)
    damp = dampening * float(torch.diag(H).mean())
    n_groups = scale.shape[1]
    chunk = max(1, CHUNK_VALUES // max(cols, 2 * n_groups * n_groups))
    new_scale = scale.clone()
    new_weight = torch.empty(rows, cols, device=W.device)
    before = after = 0.0
    changed = 0
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        w = W[r0:r1].detach().float()
        s = scale[r0:r1]
        z = None if zero is None else zero[r0:r1]
        B = dequantize(codes[r0:r1], s, z, scheme)  # each group's share at t = 1
        fit = _Fit(w, B, H, damp, scheme.group_size, n_groups)
        s_new = _storable(s * (1 + fit.solve()))
        ok = torch.isfinite(s_new).all(dim=1) & (s_new > 0).all(dim=1)
        s_new = torch.where(ok[:, None], s_new, s)
        e1 = fit.error(s_new / s - 1)  # the scales as stored
        keep = e1 < fit.e0
        new_scale[r0:r1] = torch.where(keep[:, None], s_new, s)
        new_weight[r0:r1] = torch.where(
            keep[:, None], dequantize(codes[r0:r1], s_new, z, scheme), B
        )
        before += float(fit.e0.sum())
        after += float(torch.where(keep, e1, fit.e0).sum())
        changed += int(keep.sum())
    return RefitResult(new_weight, new_scale, before, after, changed)


class _Fit:
    """One chunk of rows as a quadratic in ``d = t − 1`` ``[rows, G]`` (``t``: each
    scale's factor; ``B_g``: a row's dequantized weights restricted to group g):

        error(d) = e0 − 2 dᵀg + dᵀMd,   e0 = Eᵀ H_λ E,  E = w − B,
        g_g = B_gᵀ H_λ E,   M_gh = B_gᵀ H_λ B_h.

    One product with ``H`` for ``E`` and half of one for the ``B_g`` (``M`` is
    symmetric: each group against itself and the groups after it), group by group
    over all the chunk's rows (matrix products of useful shapes even for an 8B model's
    ``down_proj``); the rest is small and in float64, so the error after a change is
    exact to the rounding of that change.
    """

    def __init__(
        self, w: Tensor, B: Tensor, H: Tensor, damp: float, group_size: int | None, G: int
    ) -> None:
        R, cols = B.shape
        size = cols if group_size is None else group_size
        E = w - B
        EH = E @ H
        self.e0 = ((EH * E).sum(1) + damp * E.square().sum(1)).double()
        Bg = grouped(B, group_size)  # [R, G, g] (a partial last group padded with zeros)
        self.g = (Bg * grouped(EH.add_(E, alpha=damp), group_size)).sum(-1).double()
        del EH
        M = torch.zeros(R, G, G, dtype=torch.float64, device=B.device)
        for g in range(G):  # the upper triangle, one group's rows of H at a time
            lo, hi = g * size, min(cols, (g + 1) * size)
            part = B[:, lo:hi] @ H[lo:hi, lo:]  # [R, cols − lo]: B_g H, from group g on
            part = grouped(part, None if group_size is None else size)  # [R, G − g, g]
            M[:, g, g:] = (part * Bg[:, g:, :]).sum(-1).double()
        M.diagonal(dim1=1, dim2=2).add_(damp * Bg.square().sum(-1).double())
        self.M = M.add_(M.triu(1).transpose(1, 2))  # the lower triangle was zero

    def solve(self) -> Tensor:
        """The least-error ``d`` with a pull of ``RIDGE`` times each diagonal term to 0;
        0 for a group whose integers are all zero (its scale does nothing)."""
        A = self.M.clone()
        diag = A.diagonal(dim1=1, dim2=2)
        empty = diag <= 0
        diag.mul_(1 + RIDGE).masked_fill_(empty, 1.0)
        d, info = torch.linalg.solve_ex(A, self.g.masked_fill(empty, 0.0))
        return torch.where((info == 0)[:, None], d, torch.zeros_like(d)).float()

    def error(self, d: Tensor) -> Tensor:
        """Each row's damped output error after scaling its groups by ``1 + d``."""
        d = d.double()
        return self.e0 - 2 * (d * self.g).sum(1) + (d[:, None, :] @ self.M @ d[:, :, None])[:, 0, 0]


def _storable(scale: Tensor) -> Tensor:
    """Rounded to the storage dtype (nearest: the integers are fixed, nothing to cover)."""
    return scale.clamp(MIN_SCALE, torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE).float()
