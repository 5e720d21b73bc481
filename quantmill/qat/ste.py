"""Fake quantization that trains: the straight-through estimator (STE).

Rounding has zero gradient almost everywhere, so training through it uses
the STE of Bengio et al. (2013): the forward pass rounds, the backward pass
treats rounding as the identity. Clamping keeps its true gradient, so weights
outside the grid's range get none (as in LSQ, Esser et al. 2020, "Learned
Step Size Quantization"), and the scale receives LSQ's gradient through
``(clamp(round(w / s)) - z) * s``.

Shapes follow ``quantmill.quant.grid``: ``W`` ``[rows, cols]``, ``scale`` and
``zero`` ``[rows, n_groups]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmill.config import QuantScheme
from quantmill.quant.grid import MIN_SCALE, SCALE_DTYPE, expand_groups


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def stored_ste(scale: Tensor) -> Tensor:
    """``scale`` as the checkpoint stores it (float16) forward, identity backward,
    so a trained model computes with exactly the scales its export holds."""
    scale = scale.clamp_min(MIN_SCALE)
    return scale + (scale.to(SCALE_DTYPE).float() - scale).detach()


def fake_quantize_ste(W: Tensor, scale: Tensor, zero: Tensor | None, scheme: QuantScheme) -> Tensor:
    """``dequantize(quantize(W))`` on the grid ``scale``/``zero``, differentiable in
    ``W`` (straight through the rounding) and in ``scale`` (LSQ)."""
    cols = W.shape[1]
    s = expand_groups(stored_ste(scale), cols, scheme.group_size)
    z = 0.0 if zero is None else expand_groups(zero, cols, scheme.group_size)
    q = torch.clamp(round_ste(W / s) + z, scheme.q_min, scheme.q_max)
    return (q - z) * s
