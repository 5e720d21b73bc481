"""GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023), Algorithm 1.

Columns are quantized one at a time in (optionally) activation order; the
error of each is spread over the columns not yet quantized through the
upper Cholesky factor of ``H^-1``, with lazy block updates of ``block_size``
columns. Notation follows the paper: ``W`` ``[rows, cols]``, ``H = 2 X Xᵀ / n``
``[cols, cols]``, ``Hinv`` the upper Cholesky factor of ``(H + λI)^-1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from quantmill.config import QuantScheme
from quantmill.quant.grid import (
    all_finite,
    compute_qparams,
    fake_quantize_column_into,
    group_count,
)

log = logging.getLogger(__name__)

# Each retry multiplies the dampening by this factor before giving up.
DAMP_GROWTH = 10.0
DAMP_TRIES = 4


class HessianNotPositiveDefinite(RuntimeError):
    """``H + λI`` stayed singular after every dampening retry."""


@dataclass
class GPTQFactor:
    """What GPTQ derives from a layer's Hessian alone, so that a later round on the same
    Hessian (the refit's rounds) skips the permuted copy and the two factorizations:
    the column order, the columns no input reached, each column's ``diag H`` (the
    imatrix observer's importance) and the upper Cholesky factor ``Hinv`` of the damped
    inverse in that order, with the settings that made them. GPTQ only reads it."""

    perm: Tensor  # [cols]: the column order (activation order, or the identity)
    dead: Tensor  # [cols] bool: diag H == 0
    energy: Tensor  # [cols]: diag H, dead columns set to 1
    Hinv: Tensor  # [cols, cols], permuted
    damp: float  # the fraction of mean(diag H) actually added
    dampening: float  # the fraction asked for
    actorder: bool


@dataclass
class GPTQResult:
    weight: Tensor  # dequantized weights [rows, cols], float32
    scale: Tensor  # [rows, n_groups]
    zero: Tensor | None  # [rows, n_groups], None when symmetric
    loss: float  # Σ (w - q)² / [H^-1]_ii² / 2, the paper's reconstruction proxy
    dampening: float  # the fraction of mean(diag H) actually added
    factor: GPTQFactor | None = None  # kept when asked (``keep_factor``)


class NoCalibrationInputs(ValueError):
    """A layer's Hessian was asked for but no calibration input reached the layer."""


class HessianAccumulator:
    """Running ``X Xᵀ`` over calibration inputs ``x`` ``[..., cols]``, in float32 on the
    device the inputs come from, whatever their dtype.

    bfloat16 inputs (a bfloat16 forward pass) are multiplied in bfloat16 — the matmul
    accumulates in float32 and rounds each batch's product once to bfloat16's 8-bit
    mantissa: relative error about 2e-3 for one 4096 × 576 product, 6e-4 after 16 of
    them are summed (random inputs; torch 2.13 has no CPU bfloat16 matmul with a float32
    output) — and the products are summed in float32: 2.4× the float32
    product's speed on CPUs with bfloat16 units. float16 inputs are widened first (their
    range cannot hold sums of squares); float32 inputs multiply in float32.
    """

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.H: Tensor | None = None
        self.count = 0
        self._scaled = False

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.H is None:
            self.H = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=x.device)
        if x.dtype == torch.bfloat16:
            self.H.add_(torch.mm(x.t(), x))  # the bfloat16 product, widened as it is added
        else:
            x = x.float()
            self.H.addmm_(x.t(), x)
        self.count += x.shape[0]

    def hessian(self) -> Tensor:
        """``2 X Xᵀ / n``, scaled in the accumulator's own buffer (adding ends here)."""
        if self.H is None or self.count == 0:
            raise NoCalibrationInputs("no calibration inputs reached this layer")
        if not self._scaled:
            self.H.mul_(2.0 / self.count)
            self._scaled = True
        return self.H

    def take(self) -> Tensor:
        """The Hessian, handed over: the accumulator lets go of it (its last user)."""
        H = self.hessian()
        self.H = None
        return H


def inverse_cholesky(
    H: Tensor, dampening: float, perm: Tensor | None = None, dead: Tensor | None = None
) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(P + λ·mean(diag P)·I)^-1`` and the λ used, where
    ``P`` is ``H`` with rows and columns in the order ``perm`` (all of ``H`` by default)
    and a diagonal of 1 at the ``dead`` columns (``dead``: ``[cols]`` bool, in ``H``'s
    order; their rows and columns are zero).

    When ``P + λI`` is not positive definite, λ grows tenfold up to
    ``DAMP_TRIES`` times before ``HessianNotPositiveDefinite`` is raised.
    ``H`` is left as it was. ``P`` is written straight into the one other matrix the
    work happens in, a few rows at a time, in place and in column-major order (what
    LAPACK works on, so it makes no copy of its own): two ``[cols, cols]`` matrices at
    most, ``H`` included (0.5 GB at 8192 columns). The factor comes back in that order
    (a transposed view); callers may copy it.
    """
    n = H.shape[0]
    work = torch.empty(n, n, dtype=H.dtype, device=H.device).t()  # column-major
    info = torch.empty((), dtype=torch.int32, device=H.device)
    damp = dampening
    _fill_permuted(work, H, perm, dead)
    mean_diag = torch.diag(work).mean()
    for attempt in range(DAMP_TRIES):
        if attempt:
            _fill_permuted(work, H, perm, dead)  # the last try's factorization overwrote it
        work.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info.item() == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info.item() == 0 and all_finite(work):
                return work, damp
        log.warning("Hessian not positive definite with dampening %.3g; retrying", damp)
        damp *= DAMP_GROWTH
    raise HessianNotPositiveDefinite(
        f"H + λI is not positive definite even with λ = {damp / DAMP_GROWTH:.3g}·mean(diag H)"
    )


# Rows of the permuted Hessian gathered at a time: two such [rows, cols] temporaries
# (8 MB each at 8192 columns) instead of a whole permuted copy.
FILL_ROWS = 256


def _fill_permuted(work: Tensor, H: Tensor, perm: Tensor | None, dead: Tensor | None) -> None:
    """``work`` ← ``H[perm][:, perm]`` (dead columns' diagonal 1), ``FILL_ROWS`` rows of
    it at a time (``work`` may be column-major: each write is a short run per column)."""
    if perm is None:
        work.copy_(H)
    else:
        for r0 in range(0, H.shape[0], FILL_ROWS):
            rows = perm[r0 : r0 + FILL_ROWS]
            work[r0 : r0 + rows.numel()].copy_(H.index_select(0, rows).index_select(1, perm))
    if dead is not None and bool(dead.any()):
        diagonal = work.diagonal()
        diagonal[dead if perm is None else dead[perm]] = 1


def gptq_factor(
    H: Tensor, dampening: float = 0.01, actorder: bool = True,
    device: torch.device | str | None = None,
) -> GPTQFactor:  # fmt: skip
    """``H``'s part of GPTQ (``GPTQFactor``), made on ``device`` (``H``'s by default) in
    float32; ``H`` is left as it was, and no permuted copy of it is made."""
    if not all_finite(H):
        raise ValueError("the Hessian holds NaN or inf: calibration activations are not finite")
    H = H.detach().to(device or H.device, torch.float32)  # read only, never changed
    energy = torch.diag(H)  # a copy
    dead = energy == 0
    energy[dead] = 1
    if actorder:
        perm = torch.argsort(energy, descending=True)
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    Hinv, damp = inverse_cholesky(H, dampening, perm if actorder else None, dead)
    return GPTQFactor(perm, dead, energy, Hinv, damp, dampening, actorder)


def gptq_quantize_weight(
    W: Tensor,
    H: Tensor,
    scheme: QuantScheme,
    block_size: int = 128,
    dampening: float = 0.01,
    actorder: bool = True,
    static_groups: bool = False,
    grid: tuple[Tensor, Tensor | None] | None = None,
    factor: GPTQFactor | None = None,
    keep_factor: bool = False,
) -> GPTQResult:
    """Quantize ``W`` ``[rows, cols]`` given the layer-input Hessian ``H`` ``[cols, cols]``.

    Every tensor is made on ``W``'s device; ``H`` is moved there in float32 and only
    read.

    Groups are always contiguous runs of ``group_size`` input columns in the
    original order (what compressed-tensors stores; the last may be partial).
    With ``static_groups`` their parameters come from the original weights;
    otherwise from the error-updated weights when the group's first column
    is reached, which in activation order may be any of its columns. A given
    ``grid`` (``scale``, ``zero``: ``[rows, n_groups]``, zero None when symmetric)
    is used as it is, for every group.

    ``factor``: ``H``'s part from an earlier call on the same ``H`` with the same
    ``dampening`` and ``actorder`` (``H`` is then not read; the result is the one
    recomputing it gives); ``keep_factor`` returns this call's in the result.
    """
    rows, cols = W.shape
    device = W.device
    if factor is None:
        factor = gptq_factor(H, dampening, actorder, device)
    elif (factor.dampening, factor.actorder, factor.perm.numel()) != (dampening, actorder, cols):
        raise ValueError(
            f"the given GPTQ factor was made with dampening {factor.dampening}, actorder "
            f"{factor.actorder} for {factor.perm.numel()} columns, not {dampening}, "
            f"{actorder} for {cols}: pass none to compute this layer's"
        )
    Wt = W.detach().float().t().contiguous()  # [cols, rows]: a column of W is a row here
    Wt[factor.dead, :] = 0

    n_groups = group_count(cols, scheme.group_size)
    scale = torch.empty(rows, n_groups, device=device)
    zero = None if scheme.symmetric else torch.empty(rows, n_groups, device=device)
    ready = [False] * n_groups
    # the imatrix observer's column importance: the Hessian's diagonal, 2·mean(x²)
    energy = factor.energy if scheme.observer == "imatrix" else None
    if grid is not None:
        scale.copy_(grid[0])
        if zero is not None:
            zero.copy_(grid[1])
        ready = [True] * n_groups
    elif static_groups or scheme.group_size is None:
        s, z = compute_qparams(Wt.t(), scheme, energy)
        scale.copy_(s)
        if zero is not None and z is not None:
            zero.copy_(z)
        ready = [True] * n_groups

    perm, Hinv = factor.perm, factor.Hinv
    Wt = Wt[perm]
    group_at = (perm // (scheme.group_size or cols)).tolist()  # group of each permuted column
    members: dict[int, list[int]] = {}
    for position, group in enumerate(group_at):
        members.setdefault(group, []).append(position)

    Qt = torch.empty_like(Wt)
    losses = torch.zeros(rows, device=device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2]  # a view: updates land in Wt, so later groups see them
        Err1 = torch.empty(i2 - i1, rows, device=device)
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()  # rows read one by one below
        for i in range(i2 - i1):
            g = group_at[i1 + i]
            if not ready[g]:
                group_energy = None if energy is None else energy[perm[members[g]]]
                _set_group_params(Wt[members[g]].t(), scheme, scale, zero, g, group_energy)
                ready[g] = True
            w, q, err = W1[i], Qt[i1 + i], Err1[i]
            fake_quantize_column_into(
                q, w, scale[:, g], None if zero is None else zero[:, g], scheme
            )
            torch.sub(w, q, out=err).div_(Hinv1[i, i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
        losses.add_(Err1.square().sum(dim=0), alpha=0.5)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)

    Wt = W1 = w = None  # let go of the updated weights (views included) before the output
    weight = torch.empty(rows, cols, device=device)
    weight.t().index_copy_(0, perm, Qt)  # column perm[i] of the result is Qt[i]: no copies
    kept = factor if keep_factor else None
    return GPTQResult(weight, scale, zero, float(losses.sum()), factor.damp, kept)


def _set_group_params(
    Wg: Tensor, scheme: QuantScheme, scale: Tensor, zero: Tensor | None, g: int,
    energy: Tensor | None = None,
) -> None:  # fmt: skip
    """Parameters of one group from its current columns ``Wg`` ``[rows, ≤group_size]``
    (``energy``: those columns' importance, for the imatrix observer)."""
    per_group = scheme.model_copy(update={"group_size": None})
    s, z = compute_qparams(Wg, per_group, energy)
    scale[:, g] = s[:, 0]
    if zero is not None and z is not None:
        zero[:, g] = z[:, 0]
