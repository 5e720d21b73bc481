"""The explicit method registry: each method module registers itself by name.

``quantmill.methods`` imports every method module by name (no package walking),
so importing it fills this table.
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


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config: type[MethodConfig]) -> Callable[[M], M]:
    """Class decorator: ``@register_method("gptq", config=GPTQConfig)``."""

    def wrap(cls: M) -> M:
        if name in _METHODS:
            raise RuntimeError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodEntry(name, config, cls)
        return cls

    return wrap


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> MethodEntry:
    """The registry entry for ``name``; raises ``KeyError`` listing known names."""
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise KeyError(f"unknown method {name!r}; known methods: {known}") from None


def _load_builtin() -> None:
    import quantmill.methods  # noqa: F401  (registers the built-in methods)
