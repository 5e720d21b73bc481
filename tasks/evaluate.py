"""Perplexity, size and bits per weight of a model or a quantized checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task

from quantmill import api
from quantmill.accuracy.models import write_harness_file
from quantmill.accuracy.recovery import accuracy_recovery
from quantmill.config import EngineSpec, EvalSpec
from quantmill.folder import SUMMARY_FILE
from quantmill.sources import ResolvedModel


@task(name="evaluate")
def evaluate_model(
    model: dict[str, Any] | str,
    evaluation: EvalSpec,
    original: bool = False,
    update_summary: bool = False,
    original_eval: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``model`` is a resolved source (dict) or a checkpoint folder.

    ``original``: the unquantized model, whose result is cached per revision
    and evaluation spec. ``update_summary``: add the result to the checkpoint
    folder's ``quantmill_eval.json`` (with ``original_eval``, the original
    model's, when given), so the summary beside it is complete.
    """
    start = time.perf_counter()
    source = ResolvedModel.from_dict(model) if isinstance(model, dict) else model
    result = api.evaluate_checkpoint(
        source,
        evaluation,
        cache=original,
        engine=EngineSpec.model_validate(engine or {}),
    )
    result["seconds"] = time.perf_counter() - start
    summary = Path(str(model)) / SUMMARY_FILE
    if update_summary and isinstance(model, str) and summary.is_file():
        data = json.loads(summary.read_text())
        keys = ("perplexity", "windows", "seq_len", "tokens", "tasks", "mean_accuracy")
        data["quantized"] = {k: result[k] for k in keys if k in result}
        if original_eval and original_eval.get("perplexity") is not None:
            data["original"] = {k: original_eval[k] for k in keys if k in original_eval}
        data["accuracy"] = accuracy_recovery(
            (data.get("original") or {}).get("tasks", {}), data["quantized"].get("tasks", {})
        )
        write_harness_file(Path(str(model)), original_eval, result)
        tmp = summary.with_suffix(".json.partial")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(summary)
    return result
