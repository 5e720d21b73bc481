"""The explicit method registry: each method module registers itself by name,
with what it needs from the pipeline as data.

This module only holds the table, the capability record and the decorator.
``quantmill.methods`` imports every built-in method module by name (no package
walking) and offers the lookups (``get_method``, ``method_names``), so the
table is full whenever someone can look a method up. Recipes, the driver and
the pipeline read a step's needs from its entry (``MethodEntry.needs``)
without building the method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from quantmill.config import MethodConfig
    from quantmill.methods.base import Method

M = TypeVar("M", bound="type[Method]")


@dataclass(frozen=True)
class Needs:
    """What one step of a method needs from the pipeline."""

    calibration: bool = False  # calibration text
    # the original model's statistics (shareable between recipes), not the partly
    # quantized model's collected block by block
    shared_statistics: bool = False
    targets: bool = False  # the original block's outputs (block-wise distillation)
    trains: bool = False  # trains the whole model after every post-training step
    # rewrites the whole checkpoint before the other steps run (rotations): first in a
    # recipe, not run block by block
    rotates: bool = False
    # an earlier step of one of these methods must quantize this step's layers
    after: tuple[str, ...] = ()
    # layer-report figures this method reports, as stepped MLflow metrics:
    # "<report method>.<field>" → metric name
    metrics: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[MethodConfig]
    impl: type[Method]
    base_needs: Needs = Needs()
    # the needs that depend on a step's settings (GPTQ's ``sequential``), as replacements
    varies: Callable[[Any], dict[str, Any]] | None = None

    def needs(self, step: MethodConfig) -> Needs:
        """The needs of ``step`` (a config of this method)."""
        if self.varies is None:
            return self.base_needs
        return replace(self.base_needs, **self.varies(step))


METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str,
    config: type[MethodConfig],
    needs: Needs = Needs(),
    varies: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[M], M]:
    """Class decorator: ``@register_method("gptq", config=GPTQConfig, needs=Needs(...))``."""

    def wrap(cls: M) -> M:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} is registered twice")
        METHODS[name] = MethodEntry(name, config, cls, needs, varies)
        return cls

    return wrap
