"""Recording tasks: a quantization's params, figures, plots and files; a sweep's
comparison; the figures another flow run recorded. They compute what to record
with ``tracking.figures`` and write it through ``tracking.adapter``."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from quantmill import plots, report
from quantmill.accuracy.models import harness_outputs, without_harness
from quantmill.folder import ACCURACY_FILE, EXPERT_TOKENS_FILE
from quantmill.moe import token_table
from tracking import adapter
from tracking.adapter import TrackedRun
from tracking.figures import (
    Figure,
    layer_losses,
    method_metrics,
    run_metrics,
    run_params,
    training_metrics,
)

RUN_FILES = ("recipe_file", "summary_file", "layers_file", "training_file")


@task(name="record-params")
def record_params(
    run: TrackedRun, model: dict[str, Any] | None, recipe: dict[str, Any] | None
) -> None:
    """The model's source, the package versions and the flattened recipe, as params."""
    adapter.log_params(run, run_params(model, recipe))


@task(name="record-mlflow")
def record_run(
    run: TrackedRun,
    model: dict[str, Any],
    recipe: dict[str, Any] | None,
    quantized: dict[str, Any] | None = None,
    original_eval: dict[str, Any] | None = None,
    quantized_eval: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, float]:
    """Params, metrics and artifacts of one quantization (or evaluation) run."""
    adapter.log_params(run, run_params(model, recipe))
    figures = run_metrics(quantized, original_eval, quantized_eval, timings)
    layers, trained = _read(quantized, "layers_file"), _read(quantized, "training_file")
    stepped = layer_losses(layers) + method_metrics(layers) + training_metrics(trained)
    adapter.log_metrics(run, [Figure(k, v) for k, v in figures.items()] + stepped)
    if quantized:
        engine = {f"quantmill.engine.{k}": v for k, v in (quantized.get("engine") or {}).items()}
        engine["quantmill.pid"] = quantized.get("pid", os.getpid())  # the process that ran it
        adapter.set_tags(run, {k: v for k, v in engine.items() if v is not None})
        files = [quantized[k] for k in RUN_FILES if quantized.get(k)]
        adapter.log_files(run, [f for f in files if Path(f).is_file()])
    if layers or trained:
        with tempfile.TemporaryDirectory() as tmp:
            drawn = [
                plots.training(trained, Path(tmp) / "training.png"),
                plots.layer_loss(layers, Path(tmp) / "layer_loss.png") if layers else None,
                plots.distillation(layers, Path(tmp) / "distillation.png"),
                plots.outlier_columns(layers, Path(tmp) / "outlier_columns.png"),
            ]
            adapter.log_files(run, [p for p in drawn if p is not None], "plots")
    experts = token_table(layers or [])
    if experts["layer"]:  # mixture of experts: tokens routed to and calibrated on each
        adapter.log_table(run, experts, EXPERT_TOKENS_FILE)
    if quantized_eval and not quantized:
        adapter.log_dict(run, without_harness(quantized_eval), "evaluation.json")
    harness = harness_outputs(original_eval, quantized_eval)
    if harness:  # lm-evaluation-harness's own results, both models
        adapter.log_dict(run, harness, ACCURACY_FILE)
    return figures


@task(name="record-comparison")
def record_comparison(
    parent: TrackedRun, table: list[dict[str, Any]], original: dict[str, Any]
) -> str:
    """The sweep's table and size-vs-perplexity plot, as Prefect artifacts and as
    artifacts of the parent MLflow run; returns the table as markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = report.comparison_markdown(table, original)
    create_table_artifact(table, key="sweep-comparison", description="recipes side by side")
    with tempfile.TemporaryDirectory() as tmp:
        plot = plots.size_vs_perplexity(table, Path(tmp) / "size_vs_perplexity.png", original)
        encoded = base64.b64encode(plot.read_bytes()).decode()
        create_markdown_artifact(
            f"{markdown}\n\n![size vs perplexity](data:image/png;base64,{encoded})\n",
            key="sweep-plot",
            description="size on disk against perplexity, one point per recipe",
        )
        (Path(tmp) / "comparison.md").write_text(markdown + "\n")
        (Path(tmp) / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
        adapter.log_files(parent, [Path(tmp) / "comparison.md", Path(tmp) / "comparison.json"])
        adapter.log_files(parent, [plot], "plots")
    return markdown


@task(name="tag-run")
def tag_run(run: TrackedRun, tags: dict[str, Any]) -> None:
    adapter.set_tags(run, tags)


@task(name="read-recorded-figures")
def recorded_figures(flow_run_id: str) -> tuple[str, dict[str, float]] | None:
    """``(MLflow run id, metrics)`` of the run a flow run recorded, or None."""
    return adapter.find_run("prefect.flow_run_id", flow_run_id)


def _read(quantized: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    path = (quantized or {}).get(key)
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else []
