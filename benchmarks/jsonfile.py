"""Results files written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(out: Path, data: dict[str, Any]) -> None:
    """``data`` into ``out`` atomically (a killed run leaves the previous file intact)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)
