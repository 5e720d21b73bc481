"""The ``mse`` observer's search a benchmark row was measured with.

The search is code, not recipe (``quantmill.quant.grid.MSE_SEARCH``), so a stored
row's recipe alone does not say which search produced it: rows written since the
search was chosen (``observer_search.py``) record it, and rows without the record
were measured with the earlier one. A row whose recipe uses the search (``mse`` or
``imatrix``) is current only when it was measured with the shipped search.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

# shipped until 2026-12-06: ranges down to 0.75 of min-max in 26 steps, squared error
EARLIER_MSE_SEARCH = {"min_shrink": 0.75, "steps": 26, "norm": 2.0}
SEARCHING_OBSERVERS = {"mse", "imatrix"}


def mse_search() -> dict[str, Any]:
    from quantmill.quant.grid import MSE_SEARCH

    return asdict(MSE_SEARCH)


def uses_search(recipe: Any) -> bool:
    """Whether any weight scheme of ``recipe`` (a recipe as plain data) searches."""
    if isinstance(recipe, dict):
        if recipe.get("observer") in SEARCHING_OBSERVERS:
            return True
        return any(uses_search(value) for value in recipe.values())
    if isinstance(recipe, list):
        return any(uses_search(value) for value in recipe)
    return False


def search_of(row: dict[str, Any]) -> dict[str, Any] | None:
    """The search ``row`` was measured with (None when its recipe uses none)."""
    if not uses_search(row.get("recipe")):
        return None
    return row.get("mse_search", EARLIER_MSE_SEARCH)


def recorded(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a new row of ``recipe`` records: the shipped search, when it uses one."""
    return {"mse_search": mse_search()} if uses_search(recipe) else {}


def current(row: dict[str, Any] | None, recipe: dict[str, Any]) -> bool:
    """Whether a stored ``row`` measured ``recipe`` as the code stands now."""
    if row is None or row.get("recipe") != recipe:
        return False
    return search_of(row) == (mse_search() if uses_search(recipe) else None)


def label(search: dict[str, Any] | None) -> str:
    """A search's range floor and error norm, ``≥0.8, n2.4`` ("-" for none)."""
    return "-" if search is None else f"≥{search['min_shrink']:g}, n{search['norm']:g}"
