"""Built-in methods. Each module registers itself; this list is the whole registry."""

from quantmill.methods import (
    autoround,
    awq,
    gptq,
    l4q,
    llm_int8,
    llm_qat,
    peqa,
    rotate,
    rtn,
    smoothquant,
    zeroquant,
)
from quantmill.registry import METHODS, MethodEntry

__all__ = [
    "autoround",
    "awq",
    "get_method",
    "gptq",
    "l4q",
    "llm_int8",
    "llm_qat",
    "method_names",
    "peqa",
    "rotate",
    "rtn",
    "smoothquant",
    "zeroquant",
]


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MethodEntry:
    """The registry entry for ``name``; raises ``KeyError`` listing known names."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise KeyError(f"unknown method {name!r}; known methods: {known}") from None
