"""Which layers SmoothQuant and AWQ move scales between, checked against the model.

The default mappings are the architecture table's (``quantmill.arch``);
a recipe may give its own. Every mapping is checked on the first decoder
block before any work starts, so a typo is an error naming the module,
not a crash halfway through the model.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from quantmill.arch import ArchSpec, Mapping, decoder_blocks
from quantmill.config import StrictModel
from quantmill.errors import ConfigError


class MappingConfig(StrictModel):
    """``smooth`` (a norm or linear inside a decoder block) feeds every ``balance`` linear."""

    smooth: str
    balance: list[str] = Field(min_length=1)


def resolve_mappings(custom: list[MappingConfig] | None, spec: ArchSpec) -> list[Mapping]:
    if custom is None:
        return list(spec.mappings)
    return [Mapping(m.smooth, tuple(m.balance), spec.norm_offset) for m in custom]


def check_mappings(
    model: nn.Module, spec: ArchSpec, mappings: list[Mapping], field: str, custom: bool
) -> None:
    """Raise ``ConfigError`` naming ``field`` when a mapping does not fit the model."""
    model_type = getattr(model.config, "model_type", "?")
    if not mappings:
        raise ConfigError(
            f"{field}: architecture {model_type!r} has no smoothing mappings; list them "
            "in the step (mappings: [{smooth: <norm>, balance: [<linear>, ...]}]) or add "
            "them to its ArchSpec in quantmill/arch.py"
        )
    block = decoder_blocks(model, spec)[0]
    names = dict(block.named_modules())
    for index, mapping in enumerate(mappings):
        where = f"{field}.{index}"
        for name in (mapping.smooth, *mapping.balance):
            if name not in names:
                known = ", ".join(n for n, m in names.items() if n and _foldable_kind(m))
                raise ConfigError(
                    f"{where}: decoder block {type(block).__name__} ({model_type}) has no "
                    f"module {name!r}; modules that can take part: {known}"
                )
        reason = unfoldable(block, mapping)
        if reason and custom:
            raise ConfigError(f"{where}: {reason}")


def unfoldable(block: nn.Module, mapping: Mapping) -> str | None:
    """Why scales cannot move exactly along ``mapping`` in ``block``, or ``None``."""
    smooth = block.get_submodule(mapping.smooth)
    if not _foldable_kind(smooth):
        return f"{mapping.smooth} is a {type(smooth).__name__}, not a norm or nn.Linear"
    channels = smooth.weight.shape[0]
    for name in mapping.balance:
        layer = block.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            return f"{name} is a {type(layer).__name__}, not nn.Linear"
        if layer.in_features != channels:
            return (
                f"{mapping.smooth} has {channels} output channels but {name} takes "
                f"{layer.in_features} inputs (grouped-query attention?)"
            )
    return None


def _foldable_kind(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return True
    return isinstance(weight, nn.Parameter) and weight.dim() == 1  # a norm
