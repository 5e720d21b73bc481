"""Mixed precision under a bits budget: which scheme each layer gets.

Each layer ``l`` has ``n_l`` weights and, for each allowed scheme ``s``, a cost
``c_s`` in bits per weight as stored (packed integers, plus its share of the
group's float16 scale and, when asymmetric, zero point) and a measured error ``e_{l,s}``
(its Hessian-weighted rounding error). Choose one scheme per layer minimising
``Σ e`` subject to ``Σ n_l c_{l} ≤ target · Σ n_l``: a multiple-choice knapsack.
Solved greedily along each layer's lower convex hull of (cost, error) — the
upgrade with the most error removed per bit first, skipping any that no longer
fits — which never exceeds the budget and leaves less unspent than the
cheapest upgrade still possible (one layer's granularity).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from quantmill.config import QuantScheme

SCALE_BITS = 16  # each group's scale is float16


def scheme_cost(scheme: QuantScheme, cols: int) -> float:
    """Bits per weight of ``scheme`` on a layer of ``cols`` inputs as the packed
    checkpoint stores them: integers in int32 words of ``32 // bits`` values (3-bit
    weights take 3.2 bits: 10 to a word), plus each group's float16 scale and, when
    asymmetric, its zero point (packed the same way)."""
    group = scheme.group_size or cols
    groups = math.ceil(cols / group)
    per_word = 32 // scheme.bits
    weights = math.ceil(cols / per_word) * 32
    zeros = 0 if scheme.symmetric else groups * 32 / per_word
    return (weights + groups * SCALE_BITS + zeros) / cols


@dataclass(frozen=True)
class LayerChoice:
    name: str
    weights: int  # number of weights
    costs: tuple[float, ...]  # bits per weight of each scheme
    errors: tuple[float, ...]  # measured error of each scheme
    # the layers that take this choice together (layers a serving engine fuses)
    members: tuple[str, ...] = ()


def cheapest_bits(layers: list[LayerChoice]) -> float:
    """The least average bits per weight any assignment reaches."""
    total = sum(layer.weights for layer in layers)
    return sum(layer.weights * min(layer.costs) for layer in layers) / total


def average_bits(layers: list[LayerChoice], choice: dict[str, int]) -> float:
    total = sum(layer.weights for layer in layers)
    return sum(layer.weights * layer.costs[choice[layer.name]] for layer in layers) / total


def solve_budget(layers: list[LayerChoice], target_bits: float) -> dict[str, int]:
    """Each layer's scheme index, at most ``target_bits`` per weight on average.
    Raises ``ValueError`` when even the cheapest schemes exceed it."""
    if cheapest_bits(layers) > target_bits + 1e-9:
        raise ValueError(
            f"the cheapest allowed schemes take {cheapest_bits(layers):.3f} bits per weight, "
            f"above the target {target_bits}"
        )
    budget = target_bits * sum(layer.weights for layer in layers)
    hulls = {layer.name: _hull(layer) for layer in layers}
    at = {layer.name: 0 for layer in layers}  # position on the layer's hull
    by_name = {layer.name: layer for layer in layers}
    spent = sum(layer.weights * layer.costs[hulls[layer.name][0]] for layer in layers)
    heap: list[tuple[float, str]] = []
    for layer in layers:
        _push(heap, layer, hulls[layer.name], 0)
    while heap:
        _, name = heapq.heappop(heap)
        layer, hull, i = by_name[name], hulls[name], at[name]
        extra = layer.weights * (layer.costs[hull[i + 1]] - layer.costs[hull[i]])
        if spent + extra > budget + 1e-6:
            continue  # does not fit; a smaller upgrade of another layer may
        spent += extra
        at[name] = i + 1
        _push(heap, layer, hull, i + 1)
    return {name: hulls[name][i] for name, i in at.items()}


def _hull(layer: LayerChoice) -> list[int]:
    """Scheme indices on the lower convex hull of (cost, error), by increasing cost."""
    order = sorted(range(len(layer.costs)), key=lambda s: (layer.costs[s], layer.errors[s]))
    hull: list[int] = []
    for s in order:
        if hull and layer.errors[s] >= layer.errors[hull[-1]]:
            continue  # costs more and is no better
        while len(hull) >= 2 and _slope(layer, hull[-2], hull[-1]) >= _slope(layer, hull[-1], s):
            hull.pop()  # the middle point lies above the segment: never worth stopping at
        hull.append(s)
    return hull


def _slope(layer: LayerChoice, a: int, b: int) -> float:
    """Error removed per bit per weight going from scheme ``a`` to ``b`` (negative)."""
    return (layer.errors[b] - layer.errors[a]) / max(layer.costs[b] - layer.costs[a], 1e-12)


def _push(heap: list, layer: LayerChoice, hull: list[int], i: int) -> None:
    if i + 1 < len(hull):
        gain = (layer.errors[hull[i]] - layer.errors[hull[i + 1]]) / (
            layer.weights * (layer.costs[hull[i + 1]] - layer.costs[hull[i]])
        )
        heapq.heappush(heap, (-gain, layer.name))
