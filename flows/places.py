"""Where a flow run's parameters may point. A run started from the Prefect UI or API
takes its parameters from whoever filled the form, so its outputs go under one output
root, and the files it reads lie under the data roots or under the output root (a
checkpoint the pipeline wrote is a legitimate input). Paths are checked as real paths
(symlinks followed) and the job keeps the real path, so a run writes and reads exactly
what was checked.

- ``$QUANTMILL_OUTPUT_ROOT``: the output root (default ``outputs`` in the working folder)
- ``$QUANTMILL_DATA_ROOTS``: the data roots, separated by ``os.pathsep`` (default:
  ``$QUANTMILL_DATA_DIR`` when set, and ``data`` in the working folder)

``flows.params`` applies these rules to every job but the command line's own, which
it validates with the context ``FREE``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath

from quantmill import defaults

OUTPUT_ENV = "QUANTMILL_OUTPUT_ROOT"
DATA_ENV = "QUANTMILL_DATA_ROOTS"
DATA_DIR_ENV = "QUANTMILL_DATA_DIR"
FREE = {"free_paths": True}  # the validation context of the jobs the command line builds
# a Hub repo id as quantmill.sources reads one (importing that module loads torch)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def output_root() -> Path:
    return _real(os.environ.get(OUTPUT_ENV) or defaults.OUTPUT_ROOT)


def data_roots() -> list[Path]:
    listed = os.environ.get(DATA_ENV)
    if listed:
        names = listed.split(os.pathsep)
    else:
        names = [os.environ.get(DATA_DIR_ENV, ""), *defaults.DATA_ROOTS]
    return [_real(name) for name in names if name]


def output_path(field: str, value: str) -> str:
    """``value``, a folder the run writes, as its real path inside the output root: a
    relative path is placed under the root, an absolute one must lie in it already."""
    root = output_root()
    if ".." in PurePath(value).parts:
        raise ValueError(
            f"{field} {value!r} contains '..': name a folder under the output root {root} "
            "without it (a relative path is placed there)"
        )
    real = _real(root / Path(value).expanduser())
    if real == root or not real.is_relative_to(root):
        raise ValueError(
            f"{field} {value!r} is outside the output root {root}: name a folder under it "
            f"(a relative path is placed there), or set {OUTPUT_ENV} on the worker"
        )
    return str(real)


def input_path(field: str, value: str) -> str:
    """``value``, a file or folder the run reads, as its real path under a data root or
    the output root."""
    roots = [*data_roots(), output_root()]
    real = _real(value)
    if not any(real.is_relative_to(root) for root in roots):
        raise ValueError(
            f"{field} {value!r} is outside the data roots and the output root "
            f"({', '.join(map(str, roots))}): put it under one of them, or set {DATA_ENV} / "
            f"{OUTPUT_ENV} on the worker"
        )
    return str(real)


def is_path(value: str) -> bool:
    """True when ``value`` names a file or folder; else it is a name (a dataset, a Hub id
    that is not on disk)."""
    if os.path.isabs(value) or value.startswith((".", "~")):
        return True
    if os.path.lexists(os.path.expanduser(value)):
        return True
    return os.sep in value and not HUB_ID.match(value)


def is_model_path(value: str) -> bool:
    """True when ``value`` is a local model folder or file: not a preset (a preset wins
    over a file of its name, as quantmill.sources resolves models)."""
    if not is_path(value):
        return False
    from quantmill.sources import PRESETS

    return value not in PRESETS


def task_files(field: str, value: str) -> str:
    """``tasks`` (comma-separated) with each task YAML file in its place."""
    entries = [entry.strip() for entry in value.split(",")]
    return ",".join(
        input_path(field, e) if e.endswith((".yaml", ".yml")) or os.sep in e else e for e in entries
    )


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))
