"""The recipes shipped with quantmill (package data), found by name by every command."""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent


def shipped_recipes() -> list[str]:
    """The names of the shipped recipes, sorted."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """The file of a shipped recipe's name (``gptq-w4g64``), else ``name_or_path`` as a path."""
    shipped = SHIPPED_DIR / f"{name_or_path}.yaml"
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_file():
        return shipped
    return Path(name_or_path)
