"""Integer matrix multiplication for W8A8 layers on CPU.

``int8_linear``: per-token int8 activations times per-channel int8 weights,
accumulated in int32, then rescaled by the outer product of the two scale
vectors: ``y = (qx · qwᵀ) * sx * swᵀ + b``. The int32 products come from
``torch._int_mm`` where it is fast (GPUs; x86 CPUs with AVX-512, whose VNNI it
uses) and otherwise from float32 matrix products over chunks of at most 1024
input columns: every partial sum of such a chunk is an integer of magnitude at
most 128·128·1024 = 2²⁴, which float32 holds exactly, so the two paths give
the same integers (on an AVX2-only CPU ``_int_mm`` was 20× slower than fp32).

``mixed_int8_linear``: LLM.int8()'s decomposition (Dettmers et al., 2022):
input columns holding any activation of magnitude ≥ ``threshold`` are
multiplied in floating point (with the dequantized weights of those
columns); the rest go through ``int8_linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantmill.config import ActScheme

INT8 = ActScheme(bits=8, symmetric=True)


def quantize_rows_int8(W: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: ``W ≈ q * scale`` with ``scale`` ``[rows]``."""
    scale = (W.abs().amax(dim=1).float() / 127).clamp_min(1e-8)
    q = torch.round(W.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _quantize_tokens_int8(x: Tensor, paper: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row int8 of ``x`` ``[tokens, in]``. The default is compressed-tensors' rule
    (scale ``max/127.5``, integers in ``[-128, 127]``: what an exported W8A8 checkpoint
    computes in ``transformers`` and vLLM); ``paper`` is LLM.int8()'s (``max/127``,
    ``[-127, 127]``), which no checkpoint format describes."""
    top, low = (127.0, -127) if paper else (127.5, -128)
    scale = x.abs().amax(dim=1, keepdim=True).div_(top).clamp_min_(1e-8)
    return torch.div(x, scale).round_().clamp_(low, 127).to(torch.int8), scale


EXACT_CHUNK = 1024  # input columns per float32 product: sums stay within ±2**24


def int_mm_is_fast(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` beats float32 products on ``device``."""
    if device.type != "cpu":
        return True
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int32_matmul(qx: Tensor, qweight_t: Tensor, exact_float: bool | None = None) -> Tensor:
    """``qx`` ``[tokens, in]`` int8 times ``qweight_t`` ``[in, out]`` int8: exact int32.

    ``exact_float`` picks the float32 path (None: whichever is faster here)."""
    if exact_float is None:
        exact_float = not int_mm_is_fast(qx.device)
    if not exact_float:
        return torch._int_mm(qx, qweight_t)
    acc = None
    for start in range(0, qx.shape[1], EXACT_CHUNK):
        cols = slice(start, start + EXACT_CHUNK)
        part = (qx[:, cols].float() @ qweight_t[cols].float()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    assert acc is not None, "int32_matmul of an empty product"
    return acc


def int8_matmul(x: Tensor, qweight_t: Tensor, w_scale: Tensor, paper: bool = False) -> Tensor:
    """``x`` ``[tokens, in]`` (float) times int8 ``qweight_t`` ``[in, out]``: float32 output."""
    qx, x_scale = _quantize_tokens_int8(x.float(), paper)
    acc = int32_matmul(qx, qweight_t)
    return acc.to(torch.float32).mul_(x_scale).mul_(w_scale)


def int8_linear(x: Tensor, qweight_t: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` with per-token int8 activations and per-channel int8 weights."""
    shape = x.shape
    y = int8_matmul(x.reshape(-1, shape[-1]), qweight_t, w_scale)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def outlier_columns(x: Tensor, threshold: float) -> Tensor:
    """Boolean ``[in]``: input columns with any ``|x| ≥ threshold`` in this batch."""
    return (x.reshape(-1, x.shape[-1]).abs() >= threshold).any(dim=0)


def mixed_int8_linear(
    x: Tensor, qweight_t: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float
) -> tuple[Tensor, int]:
    """LLM.int8(): returns the output and the number of outlier columns used."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    outliers = outlier_columns(flat, threshold)
    count = int(outliers.sum())
    if count == 0:
        y = int8_matmul(flat, qweight_t, w_scale, paper=True)
    else:
        w_out = qweight_t[outliers].float() * w_scale  # [n_outliers, out], dequantized
        y = flat[:, outliers] @ w_out
        if count < flat.shape[1]:  # at a low threshold every column can be an outlier
            regular = ~outliers
            y += int8_matmul(flat[:, regular], qweight_t[regular], w_scale, paper=True)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype), count


def fake_mixed_int8(x: Tensor, threshold: float) -> Tensor:
    """What ``mixed_int8_linear`` does to its input, in floating point: outlier
    columns unchanged, the others quantized to int8 per token (over those columns)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float()
    outliers = outlier_columns(flat, threshold)
    regular = flat.masked_fill(outliers, 0.0)
    q, scale = _quantize_tokens_int8(regular, paper=True)
    out = torch.where(outliers, flat, q.float() * scale)
    return out.reshape(shape).to(x.dtype)
