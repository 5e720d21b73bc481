"""Whether the serving engines can load what a recipe writes, known before any work.

vLLM and compressed-tensors (``group``/``channel`` strategies) need a layer's
input size to be a multiple of its group size: a partial last group has no
packed form any engine loads. Such a recipe is refused before any work unless
it opts out (``export.servable: false``); its checkpoint is then written as
float weights on the grid, and the card says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from quantmill.arch import arch_for, block_linears
from quantmill.config import MethodConfig
from quantmill.errors import ConfigError
from quantmill.layers import in_features


@dataclass(frozen=True)
class PartialGroup:
    step: int
    layer: str
    inputs: int
    group_size: int

    def describe(self) -> str:
        return f"group size {self.group_size} does not divide {self.layer}'s {self.inputs} inputs"


def selected_inputs(model: nn.Module, step: MethodConfig) -> dict[str, int]:
    """Input size of every layer ``step`` quantizes, by full name."""
    spec = arch_for(model)
    sizes = {}
    for index, block in enumerate(model.get_submodule(spec.blocks)):
        prefix = f"{spec.blocks}.{index}."
        for name, layer in block_linears(block, spec).items():
            if step.selects(prefix + name):
                sizes[prefix + name] = in_features(layer, spec.conv1d)
    return sizes


def partial_groups(model: nn.Module, steps: list[MethodConfig]) -> list[PartialGroup]:
    """Every selected layer whose input size its step's group size does not divide."""
    found = []
    for number, step in enumerate(steps):
        groups = {s.group_size for s in step.weight_schemes() if s.group_size and step.quantizes}
        for group in sorted(groups):
            for name, size in selected_inputs(model, step).items():
                if size % group:
                    found.append(PartialGroup(number, name, size, group))
    return found


def dividing_sizes(sizes: list[int], limit: int = 256) -> list[int]:
    """Group sizes (multiples of 8, up to ``limit``) that divide every one of ``sizes``."""
    common = math.gcd(*sizes)
    return [g for g in range(8, min(limit, common) + 1, 8) if common % g == 0]


def check_servable(model: nn.Module, recipe) -> list[PartialGroup]:
    """Raise ``ConfigError`` for a grid no engine loads unless the recipe opts out;
    returns the partial groups let through (empty when every grid is servable)."""
    found = partial_groups(model, recipe.steps)
    if not found or not recipe.export.servable:
        return found
    first = found[0]
    sizes = selected_inputs(model, recipe.steps[first.step])
    more = len(found) - 1
    fits = ", ".join(map(str, dividing_sizes(list(sizes.values())))) or "none"
    raise ConfigError(
        f"steps.{first.step}.weights.group_size = {first.group_size}: {first.layer} takes "
        f"{first.inputs} inputs, which {first.group_size} does not divide"
        + (f" (nor the inputs of {more} more layers)" if more else "")
        + "; no serving engine loads a partial last group. Group sizes that divide every "
        f"selected layer ({', '.join(map(str, sorted(set(sizes.values()))))} inputs): {fits}; "
        "or set export.servable: false to write it anyway, as float weights on the grid"
    )
