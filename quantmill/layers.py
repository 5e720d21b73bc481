"""What the methods produce per layer, and how a layer's weight is read and written.

Kept apart from the methods and the driver so that export, runtime, statistics
and the engine can all use these types without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from quantmill.config import ActScheme, QuantScheme


@dataclass
class LayerQuant:
    """The grid a layer's weights now lie on: ``w = (q - zero) * scale``."""

    scheme: QuantScheme
    scale: Tensor  # [out, n_groups]
    zero: Tensor | None
    # How the layer's input is quantized at run time (None: floating point).
    activations: ActScheme | None = None
    # LLM.int8(): input columns with any |x| at or above this stay in floating point.
    outlier_threshold: float | None = None


@dataclass
class LayerReport:
    name: str
    method: str
    loss: float  # the method's own error measure for this layer
    seconds: float
    extra: dict[str, float | str] = field(default_factory=dict)


def get_weight(layer: nn.Module, conv1d: bool) -> Tensor:
    """The layer's weight as ``[out, in]`` (Conv1D stores ``[in, out]``)."""
    weight = layer.weight.data
    return weight.t() if conv1d else weight


def set_weight(layer: nn.Module, W: Tensor, conv1d: bool) -> None:
    """Write ``W`` ``[out, in]`` into the layer in place (keeping its dtype and device)."""
    layer.weight.data.copy_(W.t() if conv1d else W)


def in_features(layer: nn.Module, conv1d: bool) -> int:
    return layer.weight.shape[0] if conv1d else layer.weight.shape[1]
