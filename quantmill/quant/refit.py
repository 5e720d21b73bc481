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

# The pull of each t towards 1, relative to its own diagonal term: keeps a row whose
# groups are nearly collinear from trading huge opposite changes.
RIDGE = 1e-4
# Temporaries of about this many float32 values per chunk of rows.
CHUNK_VALUES = 1 << 24


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
    chunk = max(1, CHUNK_VALUES // max(1, n_groups * cols))
    new_scale = scale.clone()
    new_weight = weight.detach().float().clone()
    before = after = 0.0
    changed = 0
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        w = W[r0:r1].detach().float()
        s = scale[r0:r1]
        z = None if zero is None else zero[r0:r1]
        B = dequantize(codes[r0:r1], s, z, scheme)  # each group's share at t = 1
        t = _solve(w, B, H, damp, scheme.group_size, n_groups)
        s_new = _storable(s * t)
        ok = torch.isfinite(s_new).all(dim=1) & (s_new > 0).all(dim=1)
        s_new = torch.where(ok[:, None], s_new, s)
        B_new = dequantize(codes[r0:r1], s_new, z, scheme)
        e0, e1 = _error(w - B, H, damp), _error(w - B_new, H, damp)
        keep = e1 < e0
        new_scale[r0:r1] = torch.where(keep[:, None], s_new, s)
        new_weight[r0:r1] = torch.where(keep[:, None], B_new, B)
        before += float(e0.sum())
        after += float(torch.where(keep, e1, e0).sum())
        changed += int(keep.sum())
    return RefitResult(new_weight, new_scale, before, after, changed)


def _solve(
    w: Tensor, B: Tensor, H: Tensor, damp: float, group_size: int | None, n_groups: int
) -> Tensor:
    """Per row, the ``t`` ``[rows, n_groups]`` minimising ``(w − Σ_g t_g B_g)ᵀ H_λ (…)``
    plus the ridge; ``B_g``: the row's dequantized weights restricted to group g."""
    R, cols = B.shape
    Bg = grouped(B, group_size)  # [R, G, g] (a partial last group padded with zeros)
    size = Bg.shape[2]
    Hp = torch.nn.functional.pad(H, (0, n_groups * size - cols, 0, n_groups * size - cols))
    # P[g, r, :] = B_g Hᵀ restricted to group g's rows of H: Σ_{i∈g} B_ri H_i·
    P = torch.bmm(Bg.transpose(0, 1), Hp.reshape(n_groups, size, -1))  # [G, R, G·g]
    # M[r, g, h] = Σ_{i∈g, j∈h} B_ri H_ij B_rj
    M = (P.reshape(n_groups, R, n_groups, size) * Bg[None]).sum(-1).permute(1, 0, 2)
    energy = Bg.square().sum(-1)  # [R, G]: Σ_{i∈g} B_ri², the damping's diagonal
    wp = grouped(w, group_size)
    # rhs[r, g] = Σ_{i∈g} B_ri (H w_r)_i + λ Σ_{i∈g} B_ri w_ri
    Hw = grouped(w @ H, group_size)
    rhs = (Bg * Hw).sum(-1) + damp * (Bg * wp).sum(-1)
    M = M.double()
    M.diagonal(dim1=1, dim2=2).add_(damp * energy.double())
    diag = M.diagonal(dim1=1, dim2=2)
    empty = diag <= 0  # a group whose integers are all zero: its scale does nothing
    ridge = RIDGE * diag.clamp_min(0)
    rhs = rhs.double() + ridge
    diag.add_(ridge)
    diag.masked_fill_(empty, 1.0)
    rhs = rhs.masked_fill(empty, 1.0)
    t, info = torch.linalg.solve_ex(M, rhs)
    t = torch.where((info == 0)[:, None], t, torch.ones_like(t))
    return t.float()


def _error(E: Tensor, H: Tensor, damp: float) -> Tensor:
    """Each row's ``eᵀ H_λ e`` ``[rows]``."""
    return ((E @ H) * E).sum(1) + damp * E.square().sum(1)


def _storable(scale: Tensor) -> Tensor:
    """Rounded to the storage dtype (nearest: the integers are fixed, nothing to cover)."""
    return scale.clamp(MIN_SCALE, torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE).float()
