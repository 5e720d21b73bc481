"""Which zero-shot tasks a run evaluates, resolved to what lm-evaluation-harness loads.

A task is named in ``evaluation.tasks`` in one of two ways:

- a shipped name (``SHIPPED``: ARC-Easy, ARC-Challenge, PIQA, LAMBADA-OpenAI). With a
  folder of local copies (``evaluation.task_data``, or ``$QUANTMILL_TASK_DATA``) the
  shipped definition (``definitions/<name>.yaml``: the harness's prompt and metrics)
  reads ``<folder>/<name>.jsonl``, checked against the folder's ``SHA256SUMS`` when it
  lists the file; without one, the harness's own task of that name runs on its Hub
  dataset.
- a path to a task YAML file of the user's own (the harness's task format).

Everything here is checked before any model work: an unknown name, a file that does
not parse, a missing or damaged data file are ``ConfigError``s naming the fix.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantmill.errors import ConfigError
from quantmill.hashing import file_sha256

DEFINITIONS = Path(__file__).parent / "definitions"
SHIPPED = tuple(sorted(p.stem for p in DEFINITIONS.glob("*.yaml")))
DATA_ENV = "QUANTMILL_TASK_DATA"  # folder of local copies when evaluation.task_data is unset
SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class TaskRef:
    """One task as the harness takes it: an inline config, a YAML path or a registry name."""

    name: str
    source: str  # "local" (shipped definition, local data), "hub" (the harness's), "file"
    spec: dict[str, Any] | str = field(compare=False)  # what the harness's TaskManager loads
    fingerprint: dict[str, Any] = field(default_factory=dict, compare=False)  # for cache keys

    @property
    def needs_registry(self) -> bool:
        """True when the harness's own task index must be built to load it (a Hub task)."""
        return self.source == "hub"


def is_task_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def check_task_names(entries: list[str]) -> list[str]:
    """The checks that need no file system: each entry a shipped name or a YAML path."""
    seen: set[str] = set()
    for entry in entries:
        if not is_task_file(entry) and entry not in SHIPPED:
            raise ValueError(
                f"unknown task {entry!r}: the available tasks are {', '.join(SHIPPED)}; "
                "or give the path of a task YAML file of your own (ending in .yaml)"
            )
        if entry in seen:
            raise ValueError(f"task {entry!r} is listed twice")
        seen.add(entry)
    return entries


def data_folder(task_data: str | None) -> Path | None:
    """The folder of local copies: the spec's, else ``$QUANTMILL_TASK_DATA``, else none."""
    chosen = task_data or os.environ.get(DATA_ENV) or None
    if chosen is None:
        return None
    folder = Path(chosen).expanduser()
    if not folder.is_dir():
        origin = "evaluation.task_data" if task_data else f"${DATA_ENV}"
        raise ConfigError(
            f"{origin} = {chosen!r} is not a folder; point it at the folder holding the "
            f"tasks' local copies ({', '.join(f'{n}.jsonl' for n in SHIPPED)})"
        )
    return folder


def resolve_tasks(entries: list[str], task_data: str | None = None) -> list[TaskRef]:
    """``evaluation.tasks`` resolved and checked (files present, parsed, checksums)."""
    check_task_names(entries)
    folder = data_folder(task_data)
    return [_task_file(Path(e)) if is_task_file(e) else _shipped(e, folder) for e in entries]


def _shipped(name: str, folder: Path | None) -> TaskRef:
    if folder is None:  # the harness's own definition and Hub dataset
        return TaskRef(name, "hub", name, {"task": name, "source": "hub"})
    config = yaml.safe_load((DEFINITIONS / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    fingerprint: dict[str, Any] = {"definition": copy.deepcopy(config)}
    for split, relative in files.items():
        path = folder / relative
        if not path.is_file():
            raise ConfigError(
                f"task {name}: its data file {path} does not exist; put {relative} in "
                f"{folder} (or unset evaluation.task_data to use the Hub dataset)"
            )
        digest = file_sha256(path).removeprefix("sha256:")
        _check_sum(folder, relative, digest, name)
        files[split] = str(path.resolve())
        fingerprint[relative] = digest
    return TaskRef(name, "local", config, fingerprint)


def _check_sum(folder: Path, relative: str, digest: str, name: str) -> None:
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        expected, _, listed = line.strip().partition("  ")
        if listed.strip().lstrip("*") == relative and expected.lower() != digest:
            raise ConfigError(
                f"task {name}: {folder / relative} does not match its checksum in {sums} "
                f"(sha256 {digest[:16]}…, expected {expected[:16]}…); the file is damaged "
                "or not the published set: restore it"
            )


def _task_file(path: Path) -> TaskRef:
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist")
    try:
        config = load_yaml(path, resolve_func=False)
    except (yaml.YAMLError, ValueError, OSError) as exc:
        raise ConfigError(f"task file {path} does not parse as YAML: {exc}") from None
    name = config.get("task")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"task file {path} has no 'task:' name; a task file is an lm-evaluation-harness "
            "task definition (task, dataset_path, output_type, doc_to_text, ...)"
        )
    fingerprint = {"file": str(path.resolve()), "sha256": file_sha256(path)}
    return TaskRef(name, "file", str(path.resolve()), fingerprint)
