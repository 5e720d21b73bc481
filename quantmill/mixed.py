"""Choose each layer's scheme for a step with ``mixed`` (``MixedPrecision``).

One pass over the blocks (one block's weights in memory at a time, through the
driver's block store): each selected layer's Hessian-weighted rounding error
``tr(ΔW H ΔWᵀ)`` at every allowed scheme, with ``H`` from the original model's
calibration statistics; then ``quantmill.quant.budget`` picks the schemes. The
result maps full layer names to an index into ``mixed.schemes``.
"""

from __future__ import annotations

import random
from collections import defaultdict

from torch import Tensor, nn

from quantmill.arch import ArchSpec, block_linears
from quantmill.config import MethodConfig, QuantScheme
from quantmill.errors import ConfigError
from quantmill.layers import get_weight
from quantmill.quant.budget import (
    LayerChoice,
    average_bits,
    cheapest_bits,
    scheme_cost,
    solve_budget,
)
from quantmill.quant.grid import compute_qparams, fake_quantize


def hessian_error(W: Tensor, H: Tensor | None, scheme: QuantScheme) -> float:
    """``tr(ΔW H ΔWᵀ)`` of rounding ``W`` to ``scheme`` (``H`` None: ``‖ΔW‖²``)."""
    scale, zero = compute_qparams(W, scheme)
    D = W - fake_quantize(W, scale, zero, scheme)
    if H is None:
        return float(D.square().sum())
    return float(((D @ H.to(D.device, D.dtype)) * D).sum())  # no copy when already there


def measure(
    blocks: nn.ModuleList, spec: ArchSpec, store, statistics, step: MethodConfig, conv1d: bool
) -> list[LayerChoice]:
    """Each group of selected layers sharing an input (q/k/v, gate/up: what vLLM fuses
    into one layer, which must have one scheme) with its cost and error at each of
    ``step.mixed.schemes``: costs averaged over the group's weights, errors summed."""
    mixed = step.mixed
    units = []
    for index, block in enumerate(blocks):
        store.load(index, block)
        prefix = f"{spec.blocks}.{index}."
        linears = block_linears(block, spec)
        for group in spec.linear_groups:
            members = [prefix + n for n in group if step.selects(prefix + n)]
            if not members:
                continue
            weights, cost, error = 0, [0.0] * len(mixed.schemes), [0.0] * len(mixed.schemes)
            try:  # the group shares one input, so one Hessian: read it once
                H = statistics.hessian(members[0])
            except KeyError:  # an expert no calibration token reached
                H = None
            for name in members:
                W = get_weight(linears[name.removeprefix(prefix)], conv1d).detach().float()
                if H is not None:
                    H = H.to(W.device, W.dtype)  # a no-op after the first layer
                weights += W.numel()
                for i, scheme in enumerate(mixed.schemes):
                    cost[i] += W.numel() * scheme_cost(scheme, W.shape[1])
                    error[i] += hessian_error(W, H, scheme)
            costs = tuple(c / weights for c in cost)
            units.append(LayerChoice(members[0], weights, costs, tuple(error), tuple(members)))
        store.release(index, block)
    return units


def expand(units: list[LayerChoice], chosen: dict[str, int]) -> dict[str, int]:
    """Each layer's scheme from its group's."""
    return {m: chosen[u.name] for u in units for m in (u.members or (u.name,))}


def choose(layers: list[LayerChoice], step: MethodConfig) -> dict[str, int]:
    """The schemes for ``layers``: by measured error, or (``choose: random``) the same
    assignment shuffled among layers of the same size (so the same bits)."""
    mixed = step.mixed
    try:
        chosen = solve_budget(layers, mixed.target_bits_per_weight)
    except ValueError as exc:
        raise ConfigError(f"mixed.target_bits_per_weight: {exc}; raise it") from None
    if mixed.choose == "random":
        rng = random.Random(mixed.seed)
        alike: dict[tuple, list[str]] = defaultdict(list)
        for layer in layers:
            alike[(layer.weights, layer.costs)].append(layer.name)
        for names in alike.values():
            picks = [chosen[n] for n in names]
            rng.shuffle(picks)
            chosen.update(zip(names, picks, strict=True))
    return chosen


def summary(layers: list[LayerChoice], chosen: dict[str, int], step: MethodConfig) -> dict:
    """What the map amounts to: layers per scheme and the bits per weight reached."""
    counts: dict[str, int] = defaultdict(int)
    for unit in layers:
        counts[step.mixed.schemes[chosen[unit.name]].label()] += len(unit.members or (1,))
    return {
        "target_bits_per_weight": step.mixed.target_bits_per_weight,
        "bits_per_weight": round(average_bits(layers, chosen), 4),
        "layers": dict(counts),
    }


def check_budget(model: nn.Module, spec: ArchSpec, step: MethodConfig) -> None:
    """Refuse, before any work, a budget the cheapest schemes already exceed (layer
    shapes suffice: no weight is read)."""
    blocks = model.get_submodule(spec.blocks)
    layers = []
    for i, block in enumerate(blocks):
        for name, module in block_linears(block, spec).items():
            if step.selects(f"{spec.blocks}.{i}.{name}"):
                rows, cols = get_weight(module, spec.conv1d).shape
                costs = tuple(scheme_cost(s, cols) for s in step.mixed.schemes)
                layers.append(LayerChoice(name, rows * cols, costs, (0.0,) * len(costs)))
    cheapest = cheapest_bits(layers) if layers else 0.0
    if cheapest > step.mixed.target_bits_per_weight + 1e-9:
        raise ConfigError(
            f"mixed.target_bits_per_weight = {step.mixed.target_bits_per_weight} is below what "
            f"the cheapest allowed schemes take on this model's layers ({cheapest:.3f} bits "
            "per weight, scales included); raise it or allow a cheaper scheme"
        )


def given(step: MethodConfig, names: list[str]) -> dict[str, int]:
    """A saved map (``mixed.chosen``), checked to cover every selected layer."""
    chosen = step.mixed.chosen or {}
    missing = [n for n in names if n not in chosen]
    if missing:
        raise ConfigError(
            f"mixed.chosen has no scheme for {missing[0]} (and {len(missing) - 1} more layers); "
            "remove mixed.chosen to choose again"
        )
    return {n: chosen[n] for n in names}


def selected_names(blocks: nn.ModuleList, spec: ArchSpec, step: MethodConfig) -> list[str]:
    return [
        f"{spec.blocks}.{i}.{name}"
        for i in range(len(blocks))
        for name in spec.linears
        if step.selects(f"{spec.blocks}.{i}.{name}")
    ]
