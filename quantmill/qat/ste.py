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
from quantmill.quant.grid import MIN_SCALE, SCALE_DTYPE, grouped


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
    ``W`` (straight through the rounding) and in ``scale`` (LSQ).

    Works on the ``[rows, n_groups, group]`` view, where a group's scale broadcasts
    (no repeated copies of the scales, forward or backward)."""
    rows, cols = W.shape
    G = grouped(W, scheme.group_size)
    s = stored_ste(scale)[..., None]
    z = 0.0 if zero is None else zero[..., None]
    q = torch.clamp(round_ste(G / s) + z, scheme.q_min, scheme.q_max)
    return ungrouped((q - z) * s, cols)


def dequantize_grouped(offset_q: Tensor, scale: Tensor, cols: int) -> Tensor:
    """``[rows, cols]`` weights from ``q - zero`` in the grouped view ``[rows, n, group]``
    and a (trainable) ``scale`` ``[rows, n]``."""
    return ungrouped(offset_q * stored_ste(scale)[..., None], cols)


def ungrouped(G: Tensor, cols: int) -> Tensor:
    """``[rows, n_groups, group]`` → ``[rows, cols]`` (dropping a partial group's padding)."""
    return G.reshape(G.shape[0], -1)[:, :cols]
