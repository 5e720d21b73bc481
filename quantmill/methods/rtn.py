"""Round-to-nearest (RTN): each weight to its nearest grid point, no calibration.

The baseline every paper in the survey compares against (e.g. Dettmers &
Zettlemoyer, "The case for 4-bit precision", ICML 2023). With ``activations``
set it is also the naive W8A8 / W4A8 baseline of SmoothQuant and ZeroQuant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from quantmill.config import MethodConfig, MixedPrecision, QuantScheme
from quantmill.layers import LayerQuant, LayerReport, get_weight, set_weight
from quantmill.methods.base import Method, accumulating
from quantmill.quant.gptq import NoCalibrationInputs
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.registry import register_method


class RTNConfig(MethodConfig):
    takes_importance = True  # collected from calibration text when the observer asks
    method: Literal["rtn"] = "rtn"
    # per-layer schemes under a size budget (``weights`` is then unused)
    mixed: MixedPrecision | None = None


def round_layer(
    layer: nn.Module, scheme: QuantScheme, conv1d: bool, importance: Tensor | None = None
) -> tuple[Tensor, Tensor | None, float]:
    """Put ``layer``'s weights on their nearest grid points; returns the grid and the
    squared weight error (``importance``: the imatrix observer's column energies)."""
    W = get_weight(layer, conv1d).float()
    scale, zero = compute_qparams(W, scheme, importance)
    Q = fake_quantize(W, scale, zero, scheme)
    loss = float(torch.sub(W, Q).square_().sum())  # before W (maybe the weight itself) changes
    set_weight(layer, Q, conv1d)
    return scale, zero, loss


@register_method(
    "rtn",
    config=RTNConfig,
    # the imatrix observer reads calibration text: each input column's mean x²
    # (and mixed precision measures each layer's error on the calibration statistics)
    varies=lambda step: {
        "calibration": step.weights.observer == "imatrix"
        or (step.mixed is not None and step.mixed.chosen is None)
    },
)
class RTN(Method):
    def __init__(self, config, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._energy: dict[str, ColumnEnergy] = {}

    @contextmanager
    def observe(
        self, groups: list[list[tuple[str, nn.Module]]], stop_after_last: bool
    ) -> Iterator[None]:
        self._energy = {}  # layers sharing an input share its energies
        with accumulating(groups, lambda first: ColumnEnergy(), stop_after_last, self._energy):
            yield

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        start = time.perf_counter()
        scheme, extra = self.scheme_for(name)
        energy = self._energy.pop(name, None)
        importance = None
        if scheme.observer == "imatrix":
            try:
                importance = energy.mean() if energy is not None else ColumnEnergy().mean()
            except NoCalibrationInputs:  # an expert no token reached: every column alike
                weight = get_weight(layer, self.conv1d)
                importance = torch.ones(weight.shape[1], device=weight.device)
                extra |= {"fallback": "mse", "fallback_reason": "no calibration inputs"}
        scale, zero, loss = round_layer(layer, scheme, self.conv1d, importance)
        quant = self.layer_quant(scale, zero, scheme)
        return quant, self._timed_report(name, "rtn", loss, start, **extra)


class ColumnEnergy:
    """Running mean of ``x²`` per input column over calibration tokens."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sums = x.square().sum(dim=0)
        self.total = sums if self.total is None else self.total.add_(sums)
        self.count += x.shape[0]

    def mean(self) -> Tensor:
        if self.total is None or self.count == 0:
            raise NoCalibrationInputs("no calibration inputs reached this layer")
        return self.total / self.count
