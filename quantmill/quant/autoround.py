"""AutoRound's weight grid: learned rounding offsets and range factors.

Paper: Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for
the Quantization of LLMs" (2023; Intel's auto-round). Each weight rounds as
``round(w / s + v)`` with an offset ``v ∈ [−½, ½]`` (so any weight may round up
or down), and each group's range is ``[β · min W, α · max W]`` with factors
``α, β ∈ [½, 1]`` that clip it. ``v``, ``α`` and ``β`` are trained by signed
gradient descent on the block's output error; rounding is straight-through.

Shapes follow ``quantmill.quant.grid``: ``W`` and ``V`` ``[rows, cols]``, the
factors and the resulting ``scale``/``zero`` ``[rows, n_groups]``. The scale is
the float16 one the checkpoint stores, in training too, so the trained model
computes exactly what is exported; with ``v = 0`` and ``α = β = 1`` the grid is
RTN's min-max one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmill.config import QuantScheme
from quantmill.qat.ste import round_ste, ungrouped
from quantmill.quant.grid import grouped, storable_scale

OFFSET_LIMIT = 0.5
FACTOR_RANGE = (0.5, 1.0)


def autoround_grid(
    W: Tensor, alpha: Tensor, beta: Tensor, scheme: QuantScheme
) -> tuple[Tensor, Tensor | None]:
    """Scale (float16 values, straight through) and zero point (``None`` when symmetric)
    of each group's range ``[β · min, α · max]`` (which spans 0)."""
    G = grouped(W, scheme.group_size)
    wmax = G.amax(-1).clamp_min(0) * alpha
    wmin = G.amin(-1).clamp_max(0) * beta
    if scheme.symmetric:
        return _stored(torch.maximum(wmax / scheme.q_max, wmin / scheme.q_min)), None
    scale = _stored((wmax - wmin) / (scheme.q_max - scheme.q_min))
    zero = torch.clamp(scheme.q_min - round_ste(wmin / scale), scheme.q_min, scheme.q_max)
    return scale, zero


def _stored(scale: Tensor) -> Tensor:
    """The scale the checkpoint stores (float16, rounded up as ``quantmill.quant.grid``
    rounds it) forward, identity backward: at ``α = β = 1`` the grid is RTN's min-max."""
    return scale + (storable_scale(scale.detach()) - scale).detach()


def autoround_weight(
    W: Tensor, V: Tensor, alpha: Tensor, beta: Tensor, scheme: QuantScheme
) -> Tensor:
    """``W`` on its AutoRound grid, differentiable in ``V``, ``alpha`` and ``beta``."""
    scale, zero = autoround_grid(W, alpha, beta, scheme)
    s = scale[..., None]
    z = 0.0 if zero is None else zero[..., None]
    G = grouped(W, scheme.group_size)
    q = torch.clamp(
        round_ste(G / s + grouped(V, scheme.group_size)) + z, scheme.q_min, scheme.q_max
    )
    return ungrouped((q - z) * s, W.shape[1])


@torch.no_grad()
def signed_step(offsets: list[Tensor], factors: list[Tensor], lr: float, factor_lr: float) -> None:
    """One signed-gradient step: ``p −= lr · sign(∂loss/∂p)``, then each offset clipped to
    ±½ and each range factor to ``FACTOR_RANGE``."""
    for params, step, bounds in ((offsets, lr, (-OFFSET_LIMIT, OFFSET_LIMIT)),
                                 (factors, factor_lr, FACTOR_RANGE)):  # fmt: skip
        for p in params:
            if p.grad is not None:
                p.sub_(step * torch.sign(p.grad)).clamp_(*bounds)
