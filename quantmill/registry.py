"""The explicit method registry: each method module registers itself by name.

This module only holds the table and the decorator. ``quantmill.methods``
imports every built-in method module by name (no package walking) and offers
the lookups (``get_method``, ``method_names``), so the table is full whenever
someone can look a method up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from quantmill.config import MethodConfig
    from quantmill.methods.base import Method

M = TypeVar("M", bound="type[Method]")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[MethodConfig]
    impl: type[Method]


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config: type[MethodConfig]) -> Callable[[M], M]:
    """Class decorator: ``@register_method("gptq", config=GPTQConfig)``."""

    def wrap(cls: M) -> M:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} is registered twice")
        METHODS[name] = MethodEntry(name, config, cls)
        return cls

    return wrap
