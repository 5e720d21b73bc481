"""The ``mse`` observer's search a benchmark row was measured with.

The search is code, not recipe (``quantmill.quant.grid.MSE_SEARCH``), so a stored
row's recipe alone does not say which search produced it: rows written since the
search was chosen (``observer_search.py``) record it, and rows without the record
were measured with the earlier one. A row whose recipe uses the search (``mse`` or
``imatrix``) is current only when it was measured with the shipped search. The grid a
symmetric range starts from (``ShrinkSearch.grid``) counts only where a searching
scheme is symmetric; rows from before it was recorded started from ``signed``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

# shipped until 2026-12-06: ranges down to 0.75 of min-max in 26 steps, squared error
EARLIER_MSE_SEARCH = {"min_shrink": 0.75, "steps": 26, "norm": 2.0}
EARLIER_GRID = "signed"  # the symmetric grid every search started from until 2026-12-06
SEARCHING_OBSERVERS = {"mse", "imatrix"}


def mse_search(symmetric: bool = True) -> dict[str, Any]:
    """The shipped search; its grid only where a symmetric scheme uses it."""
    from quantmill.quant.grid import MSE_SEARCH

    return normal(asdict(MSE_SEARCH), symmetric)


def normal(search: dict[str, Any], symmetric: bool) -> dict[str, Any]:
    """``search`` with the grid it started from where that counts, and without elsewhere."""
    if not symmetric:
        return {k: v for k, v in search.items() if k != "grid"}
    return {**search, "grid": search.get("grid", EARLIER_GRID)}


def searching_schemes(recipe: Any) -> list[dict[str, Any]]:
    """The weight schemes of ``recipe`` (a recipe as plain data) that search."""
    if isinstance(recipe, dict):
        if recipe.get("observer") in SEARCHING_OBSERVERS:
            return [recipe]
        return [s for value in recipe.values() for s in searching_schemes(value)]
    if isinstance(recipe, list):
        return [s for value in recipe for s in searching_schemes(value)]
    return []


def uses_search(recipe: Any) -> bool:
    """Whether any weight scheme of ``recipe`` (a recipe as plain data) searches."""
    return bool(searching_schemes(recipe))


def symmetric_search(recipe: Any) -> bool:
    """Whether a searching scheme of ``recipe`` is symmetric (the schemes' default)."""
    return any(s.get("symmetric", True) for s in searching_schemes(recipe))


def search_of(row: dict[str, Any]) -> dict[str, Any] | None:
    """The search ``row`` was measured with (None when its recipe uses none)."""
    recipe = row.get("recipe")
    if not uses_search(recipe):
        return None
    return normal(row.get("mse_search", EARLIER_MSE_SEARCH), symmetric_search(recipe))


def recorded(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a new row of ``recipe`` records: the shipped search, when it uses one."""
    return {"mse_search": mse_search(symmetric_search(recipe))} if uses_search(recipe) else {}


def current(row: dict[str, Any] | None, recipe: dict[str, Any]) -> bool:
    """Whether a stored ``row`` measured ``recipe`` as the code stands now."""
    if row is None or row.get("recipe") != recipe:
        return False
    shipped = mse_search(symmetric_search(recipe)) if uses_search(recipe) else None
    return search_of(row) == shipped


def label(search: dict[str, Any] | None) -> str:
    """A search's range floor, error norm and symmetric grid when it has one,
    ``≥0.8, n2.4, absmax`` ("-" for none)."""
    if search is None:
        return "-"
    grid = f", {search['grid']}" if "grid" in search else ""
    return f"≥{search['min_shrink']:g}, n{search['norm']:g}{grid}"
