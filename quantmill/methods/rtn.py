"""Round-to-nearest (RTN): each weight to its nearest grid point, no calibration.

The baseline every paper in the survey compares against (e.g. Dettmers &
Zettlemoyer, "The case for 4-bit precision", ICML 2023). With ``activations``
set it is also the naive W8A8 / W4A8 baseline of SmoothQuant and ZeroQuant.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor, nn

from quantmill.config import MethodConfig, QuantScheme
from quantmill.layers import LayerQuant, LayerReport, get_weight, set_weight
from quantmill.methods.base import Method
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.registry import register_method


class RTNConfig(MethodConfig):
    method: Literal["rtn"] = "rtn"


def round_layer(
    layer: nn.Module, scheme: QuantScheme, conv1d: bool
) -> tuple[Tensor, Tensor | None, float]:
    """Put ``layer``'s weights on their nearest grid points; returns the grid and the
    squared weight error."""
    W = get_weight(layer, conv1d).float()
    scale, zero = compute_qparams(W, scheme)
    Q = fake_quantize(W, scale, zero, scheme)
    loss = float(torch.sub(W, Q).square_().sum())  # before W (maybe the weight itself) changes
    set_weight(layer, Q, conv1d)
    return scale, zero, loss


@register_method("rtn", config=RTNConfig)
class RTN(Method):
    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        start = time.perf_counter()
        scale, zero, loss = round_layer(layer, self.config.weights, self.conv1d)
        return self.layer_quant(scale, zero), self._timed_report(name, "rtn", loss, start)
