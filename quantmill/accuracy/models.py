"""Zero-shot accuracy of the models a run holds: the original (cached per task) and a
checkpoint loaded the way ``transformers`` loads it (the same object perplexity uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantmill.accuracy.harness import TaskRun, evaluate_tasks
from quantmill.accuracy.recovery import mean_score
from quantmill.accuracy.tasks import TaskRef, resolve_tasks
from quantmill.config import EvalSpec
from quantmill.devices import dtype_name
from quantmill.sources import ResolvedModel


def spec_tasks(spec: EvalSpec) -> list[TaskRef]:
    """The evaluation's tasks, resolved and checked (before any work); [] for none."""
    return resolve_tasks(spec.tasks, spec.task_data) if spec.tasks else []


def original_accuracy(
    resolved: ResolvedModel,
    refs: list[TaskRef],
    spec: EvalSpec,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> TaskRun | None:
    """The unquantized model's task results; loaded whole only when a task is not cached
    (per model revision, device type and dtype, as its perplexity)."""
    if not refs:
        return None
    from quantmill.models import load_model

    cache = {"model": resolved.revision, "compute": [device.type, dtype_name(dtype)]}
    return evaluate_tasks(
        lambda: load_model(resolved, dtype=dtype, device=device), refs, spec.limit,
        spec.task_batch_size, progress, cache=cache,
    )  # fmt: skip


def loaded_accuracy(net, tokenizer, refs: list[TaskRef], spec: EvalSpec, progress: bool = True):
    """Task results of a model already in memory (a loaded checkpoint); never cached."""
    if not refs:
        return None
    return evaluate_tasks(
        lambda: (net, tokenizer), refs, spec.limit, spec.task_batch_size, progress
    )


def add_tasks(result: dict[str, Any], run: TaskRun | None) -> dict[str, Any]:
    """``result`` (an evaluation's figures) with ``tasks``, ``mean_accuracy`` and the
    harness's own output (``harness``) added when tasks ran."""
    if run is not None:
        result["tasks"] = run.to_dict()
        result["mean_accuracy"] = mean_score(result["tasks"])
        result["harness"] = run.harness
    return result


def harness_outputs(original: dict | None, quantized: dict | None) -> dict[str, Any]:
    """The harness's results of both models, as ``lm_eval_results.json`` holds them."""
    return {
        name: part["harness"]
        for name, part in (("original", original), ("quantized", quantized))
        if part and part.get("harness")
    }


def without_harness(result: dict | None) -> dict | None:
    """An evaluation's figures without the harness's own output (a file of its own)."""
    return None if result is None else {k: v for k, v in result.items() if k != "harness"}


def write_harness_file(folder: Path, original: dict | None, quantized: dict | None) -> None:
    from quantmill.export.checkpoint import write_json
    from quantmill.folder import ACCURACY_FILE

    found = harness_outputs(original, quantized)
    if found:
        write_json(folder, ACCURACY_FILE, found)
