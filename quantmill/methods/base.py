"""What every method provides to the sequential driver, per decoder block.

The driver calls, for each block: ``observe`` (hooks are registered for the
duration of a ``with`` block while the driver runs calibration inputs through
it; hooks are always removed), then ``quantize_layer`` for each selected
layer. Methods never walk the model themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from quantmill.blocks import StopForward
from quantmill.config import MethodConfig, QuantScheme
from quantmill.hooks import hooks_removed
from quantmill.layers import LayerQuant, LayerReport
from quantmill.registry import METHODS, Needs

if TYPE_CHECKING:
    from quantmill.arch import ArchSpec
    from quantmill.blocks import BlockInputs
    from quantmill.qat.loop import TrainContext, TrainResult


class Method:
    """Base class; subclasses register with ``@register_method``."""

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        self.config = config
        self.conv1d = conv1d
        # what this step needs from the driver: data on its registry entry
        self.needs: Needs = METHODS[config.method].needs(config)
        # mixed precision: each layer's index into ``config.mixed.schemes`` (the driver
        # fills it before the first block)
        self.chosen: dict[str, int] = {}

    def check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        """Raise ``ConfigError`` when this step cannot apply to ``model`` (before any work)."""

    def prepare_block(
        self, block: nn.Module, spec: ArchSpec, prefix: str, inputs: BlockInputs | None
    ) -> list[LayerReport]:
        """After ``observe`` and before ``quantize_layer``: rescale the block (SmoothQuant, AWQ)."""
        return []

    def finish_block(
        self,
        block: nn.Module,
        prefix: str,
        inputs: BlockInputs,
        targets: list[Tensor],
        layers: dict[str, LayerQuant],
    ) -> list[LayerReport]:
        """After every layer of the block is quantized (layer-wise distillation)."""
        return []

    def scheme_for(self, name: str) -> tuple[QuantScheme, dict[str, Any]]:
        """Layer ``name``'s weight scheme, and what its report says of the choice."""
        mixed = getattr(self.config, "mixed", None)
        if mixed is None or name not in self.chosen:
            return self.config.weights, {}
        index = self.chosen[name]
        scheme = mixed.schemes[index]
        return scheme, {"scheme": scheme.label(), "scheme_index": index}

    def layer_quant(
        self, scale: Tensor, zero: Tensor | None, scheme: QuantScheme | None = None
    ) -> LayerQuant:
        """The layer's grid, with this step's activation setting."""
        return LayerQuant(scheme or self.config.weights, scale, zero, self.config.activations)

    @contextmanager
    def observe(
        self, groups: list[list[tuple[str, nn.Module]]], stop_after_last: bool
    ) -> Iterator[None]:
        """Collect statistics from the selected layers of one block, grouped by shared input."""
        yield

    def use_statistics(self, names: list[str], statistics: Any) -> None:
        """Take statistics of the original model (``quantmill.stats``) for ``names``."""
        raise NotImplementedError(f"{type(self).__name__} collects its own statistics")

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        raise NotImplementedError

    def train(
        self, model: nn.Module, layers: dict[str, LayerQuant], context: TrainContext
    ) -> TrainResult:
        """Quantization-aware training of ``model`` in place; updates ``layers``."""
        raise NotImplementedError

    @staticmethod
    def _timed_report(name: str, method: str, loss: float, start: float, **extra) -> LayerReport:
        return LayerReport(name, method, loss, time.perf_counter() - start, dict(extra))


@contextmanager
def accumulating(
    groups: list[list[tuple[str, nn.Module]]], make, stop_after_last: bool, into: dict
) -> Iterator[None]:
    """Within: each group of layers sharing an input feeds one accumulator
    (``make(first layer)``, anything with ``add(x)``) from a hook on its first layer;
    ``into`` maps every layer's name to its group's. With ``stop_after_last`` the last
    group's hook ends the forward (nothing after it is needed)."""
    handles = []
    for index, group in enumerate(groups):
        first = group[0][1]
        acc = make(first)
        for name, _ in group:
            into[name] = acc
        stop = stop_after_last and index == len(groups) - 1
        handles.append(first.register_forward_pre_hook(_feeding(acc, stop)))
    with hooks_removed(handles):
        yield


def _feeding(acc, stop: bool):
    def hook(module: nn.Module, args: tuple) -> None:
        acc.add(args[0])
        if stop:
            raise StopForward

    return hook
