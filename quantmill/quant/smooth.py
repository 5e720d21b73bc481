"""Per-channel scale migration between a layer and the linears it feeds.

SmoothQuant (Xiao et al., ICML 2023) and AWQ (Lin et al., MLSys 2024) both
divide input channel ``j`` of some linears by ``s_j`` and multiply the
matching weight columns by ``s_j``: the product is unchanged in exact
arithmetic, while the quantization difficulty moves between activations and
weights. The division is folded into whatever produced the activations
(a norm's weight, or a linear's output rows), so it costs nothing at run time.

These functions touch tensors only; ``quantmill.methods`` decides what to fold where.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MIN_SCALE = 1e-5


def smoothquant_scales(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """``s = max|X|^α / max|W|^(1-α)`` per input channel (Eq. 4 of the paper).

    ``act_max``: each channel's largest input magnitude over calibration tokens;
    ``weight_max``: each input column's largest weight magnitude over every
    balanced linear.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    a = act_max.float().clamp_min(MIN_SCALE)
    w = weight_max.float().clamp_min(MIN_SCALE)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp_min(MIN_SCALE)


def awq_scales(act_mean: Tensor, ratio: float) -> Tensor:
    """AWQ's candidate ``s = mean|X|^ratio``, normalised so ``sqrt(max · min) = 1``."""
    s = act_mean.float().clamp_min(MIN_SCALE).pow(ratio).clamp_min(MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def column_max(weights: list[Tensor]) -> Tensor:
    """Largest ``|w|`` of each input column over several ``[out, in]`` weights."""
    return torch.cat([w.abs() for w in weights], dim=0).amax(dim=0)


@torch.no_grad()
def divide_output_channels(layer: nn.Module, s: Tensor, norm_offset: float = 0.0) -> None:
    """Divide the producing layer's output channel ``j`` by ``s_j``.

    Works for norms (``weight`` and optional ``bias`` of shape ``[channels]``; a norm
    that scales by ``norm_offset + weight`` gets ``(norm_offset + weight) / s - norm_offset``)
    and for ``nn.Linear`` (rows of ``weight ``[out, in]`` and ``bias``).
    """
    weight = layer.weight
    if weight.dim() == 1:
        if norm_offset:
            weight.add_(norm_offset).div_(s.to(weight.dtype)).sub_(norm_offset)
        else:
            weight.div_(s.to(weight.dtype))
    else:
        weight.div_(s.to(weight.dtype)[:, None])
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias.div_(s.to(bias.dtype))


@torch.no_grad()
def multiply_input_columns(layer: nn.Linear, s: Tensor) -> None:
    """Multiply input column ``j`` of ``layer`` by ``s_j``."""
    layer.weight.mul_(s.to(layer.weight.dtype)[None, :])
