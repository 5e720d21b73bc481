"""Dynamic per-token activation quantization: one scale per token (row), from
that token's largest magnitude, computed at run time (no calibration).

The rule is compressed-tensors' (what ``transformers`` and vLLM compute for an
exported checkpoint): symmetric scale ``max|x| / ((2^b - 1) / 2)`` (127.5 at 8
bits) with integers clamped to ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric scale
``(max - min) / (2^b - 1)``.

The fake-quantized form uses a straight-through estimator, so the same
function serves evaluation and training (layer-wise distillation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmill.config import ActScheme

EPS = 1e-8


def token_qparams(x: Tensor, scheme: ActScheme) -> tuple[Tensor, Tensor | None]:
    """Scale ``[..., 1]`` (and zero point when asymmetric) per row of ``x`` ``[..., features]``."""
    x = x.detach().float()
    if scheme.symmetric:
        half_range = ((1 << scheme.bits) - 1) / 2
        return (x.abs().amax(dim=-1, keepdim=True) / half_range).clamp_min(EPS), None
    low = x.amin(dim=-1, keepdim=True).clamp_max(0)
    high = x.amax(dim=-1, keepdim=True).clamp_min(0)
    scale = ((high - low) / ((1 << scheme.bits) - 1)).clamp_min(EPS)
    zero = -(1 << (scheme.bits - 1)) - torch.round(low / scale)
    return scale, zero


def quantize_tokens(x: Tensor, scheme: ActScheme) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integers (int8) for ``x`` with their per-row scale and zero point."""
    scale, zero = token_qparams(x, scheme)
    q = torch.round(x.float() / scale)
    if zero is not None:
        q = q + zero
    q_min, q_max = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    return q.clamp_(q_min, q_max).to(torch.int8), scale, zero


def fake_quantize_tokens(x: Tensor, scheme: ActScheme) -> Tensor:
    """``dequantize(quantize(x))`` per row, in ``x``'s dtype; gradients pass straight through."""
    q, scale, zero = quantize_tokens(x, scheme)
    deq = (q.float() - (0.0 if zero is None else zero)) * scale
    deq = deq.to(x.dtype)
    return x + (deq - x).detach() if x.requires_grad else deq
