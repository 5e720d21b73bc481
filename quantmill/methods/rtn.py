"""Round-to-nearest (RTN): each weight to its nearest grid point, no calibration.

The baseline every paper in the survey compares against (e.g. Dettmers &
Zettlemoyer, "The case for 4-bit precision", ICML 2023).
"""

from __future__ import annotations

import time
from typing import Literal

from torch import nn

from quantmill.config import MethodConfig
from quantmill.methods.base import LayerQuant, LayerReport, Method, get_weight, set_weight
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.registry import register_method


class RTNConfig(MethodConfig):
    method: Literal["rtn"] = "rtn"


@register_method("rtn", config=RTNConfig)
class RTN(Method):
    needs_calibration = False

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        start = time.perf_counter()
        scheme = self.config.weights
        W = get_weight(layer, self.conv1d).float()
        scale, zero = compute_qparams(W, scheme)
        Q = fake_quantize(W, scale, zero, scheme)
        loss = float((W - Q).square().sum())  # weight-space squared error
        set_weight(layer, Q, self.conv1d)
        return LayerQuant(scheme, scale, zero), self._timed_report(name, "rtn", loss, start)
