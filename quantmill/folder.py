"""The one owner of a checkpoint folder's layout: file names and their readers.

A quantized checkpoint is a transformers folder (``config.json``, the weight
shards and their index, the tokenizer) plus quantmill's own files: the recipe
as run, the evaluation summary, the per-layer report, the training report,
the runtime file (how each layer's input is treated) and the model card.
While a run writes ``OUT`` it works in two siblings: ``.OUT.partial`` (what
becomes ``OUT``) and ``.OUT.journal`` (the resume journal, the saved block
inputs and the lock), so a finished folder never holds run state.

Every module that writes or reads these files takes their names from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RECIPE_FILE = "quantmill_recipe.yaml"
SUMMARY_FILE = "quantmill_eval.json"
LAYERS_FILE = "quantmill_layers.json"
TRAINING_FILE = "quantmill_training.json"
RUNTIME_FILE = "quantmill_runtime.json"
SOURCE_FILE = "quantmill_source.json"  # lineage kept beside a converted preset or GGUF
SERVING_FILE = "quantmill_serving.json"  # what the serving engines did with it (verify)
ACCURACY_FILE = "lm_eval_results.json"  # lm-evaluation-harness's own results, both models
EXPERT_TOKENS_FILE = "expert_tokens.json"  # MLflow table: tokens per expert layer (MoE models)
CARD_FILE = "README.md"
JOURNAL_FILE = "journal.json"
LOCK_FILE = "lock"


def shard_name(number: int, total: int) -> str:
    """transformers' name for shard ``number`` (1-based) of ``total``."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files, as its index names them (or all of them)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


@dataclass(frozen=True)
class RunFolders:
    """Where a run into ``out`` works: ``staging`` becomes ``out``; ``journal`` holds
    the run's own state and is removed when the run ends well."""

    out: Path

    @property
    def staging(self) -> Path:
        return self.out.with_name(f".{self.out.name}.partial")

    @property
    def journal(self) -> Path:
        return self.out.with_name(f".{self.out.name}.journal")

    @property
    def replaced(self) -> Path:
        """Where an ``--overwrite``\\ n output waits while the new one moves in."""
        return self.out.with_name(f".{self.out.name}.replaced")

    def legacy(self) -> list[Path]:
        """Staging folders of older quantmill versions (``.OUT.partial-<random>``)."""
        return sorted(self.out.parent.glob(f".{self.out.name}.partial-*"))


@dataclass(frozen=True)
class Checkpoint:
    """Read access to a written checkpoint folder's quantmill files."""

    folder: Path

    def path(self, name: str) -> Path:
        return Path(self.folder) / name

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def json(self, name: str, default: Any = None) -> Any:
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else default

    def summary(self) -> dict[str, Any]:
        return self.json(SUMMARY_FILE, {})

    def layers(self) -> list[dict[str, Any]]:
        return self.json(LAYERS_FILE, [])

    def serving(self) -> dict[str, dict[str, Any]]:
        """What each serving engine did with the checkpoint (``verify``), by engine."""
        return self.json(SERVING_FILE, {})

    def write_serving(self, found: dict[str, dict[str, Any]]) -> None:
        path = self.path(SERVING_FILE)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def runtime(self) -> dict[str, dict[str, Any]]:
        return (self.json(RUNTIME_FILE) or {}).get("layers", {})

    def config(self) -> dict[str, Any]:
        return self.json(CONFIG_FILE, {})

    def files(self) -> dict[str, str]:
        """The paths a pipeline passes on (what a task returns about a checkpoint)."""
        root = Path(self.folder).resolve()
        return {
            "layers_file": str(root / LAYERS_FILE),
            "summary_file": str(root / SUMMARY_FILE),
            "recipe_file": str(root / RECIPE_FILE),
            "training_file": str(root / TRAINING_FILE),
        }
