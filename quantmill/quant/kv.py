"""Fake quantization of attention keys and values, as a quantized KV cache holds them.

Keys and values are ``[batch, heads, tokens, head_dim]`` (keys after the rotary
embedding, which is what a cache stores). Each token is quantized on its own, so
a cache can quantize a token the moment it is appended (the per-token layout of
KIVI, Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", here for keys as well as values):

- ``"token"``: one scale (and zero point) per ``(batch, token)`` over all heads;
- ``"head"``: one per ``(batch, head, token)`` over ``head_dim``.

The grid is quantmill/quant/grid.py's: signed integers ``q in [-2^(b-1), 2^(b-1)-1]``,
``x ≈ (q - zero) * scale``, the range widened to span 0, scales rounded up to
float16 (what a cache would store) and floored above zero, so an all-zero slice
quantizes to zeros instead of dividing by zero.
"""

from __future__ import annotations

from functools import cache

from torch import Tensor

from quantmill.config import KVCacheSpec, QuantScheme
from quantmill.quant.grid import minmax_params

# Dimensions of [batch, heads, tokens, head_dim] that share one scale.
REDUCED_DIMS = {"token": (1, 3), "head": (3,)}


@cache
def _scheme(bits: int, symmetric: bool) -> QuantScheme:
    return QuantScheme(bits=bits, group_size=None, symmetric=symmetric)


def kv_qparams(t: Tensor, spec: KVCacheSpec) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point (``None`` when symmetric) for ``t`` ``[batch, heads, tokens, dim]``.

    Shapes: ``[batch, 1, tokens, 1]`` for ``"token"``, ``[batch, heads, tokens, 1]``
    for ``"head"``; float32.
    """
    if t.dim() != 4:
        raise ValueError(
            f"keys/values must be [batch, heads, tokens, head_dim]; got shape {tuple(t.shape)}"
        )
    x = t.detach().float()
    dims = REDUCED_DIMS[spec.granularity]
    low = x.amin(dim=dims, keepdim=True).clamp_max(0)
    high = x.amax(dim=dims, keepdim=True).clamp_min(0)
    return minmax_params(low, high, _scheme(spec.bits, spec.symmetric))


def fake_quantize_kv(t: Tensor, spec: KVCacheSpec) -> Tensor:
    """``t`` ``[batch, heads, tokens, head_dim]`` quantized and dequantized, in ``t``'s dtype."""
    scale, zero = kv_qparams(t, spec)
    scheme = _scheme(spec.bits, spec.symmetric)
    offset = 0.0 if zero is None else zero
    q = (t.detach().float() / scale).round_().add_(offset).clamp_(scheme.q_min, scheme.q_max)
    deq = q.sub_(offset).mul_(scale).to(t.dtype)
    # straight-through when training (LLM-QAT): the gradient passes as if unquantized
    return t + (deq - t).detach() if t.requires_grad else deq
