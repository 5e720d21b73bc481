"""What a run records, computed from plain results: params, figures and stepped
per-layer metrics. Nothing here talks to MLflow; ``tracking.adapter`` logs these.

Per-method figures come from the methods themselves: each declares the
layer-report fields it reports (``Needs.metrics`` on its registry entry), so a
new method records its figures without a change here.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
from typing import Any, NamedTuple

PACKAGES = ("quantmill", "torch", "transformers", "compressed-tensors", "prefect", "mlflow")


class Figure(NamedTuple):
    key: str
    value: float
    step: int = 0


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": [1, 2]}}`` → ``{"a.b.0": "1", "a.b.1": "2"}``."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data:
        out = {}
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{index}."))
        return out
    return {prefix.rstrip("."): str(data)}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_params(model: dict[str, Any] | None, recipe: dict[str, Any] | None) -> dict[str, str]:
    """The model's source, the package versions and the flattened recipe."""
    params = {}
    if model is not None:
        params = {
            "model.source": str(model.get("source")),
            "model.kind": str(model.get("kind")),
            "model.revision": str(model.get("revision")),
        }
    params.update({f"versions.{k}": v for k, v in package_versions().items()})
    if recipe is not None:
        params.update(flatten(recipe, "recipe."))
    return params


def declared_metrics() -> dict[tuple[str, str], str]:
    """``(report method, field) → metric name``, as every registered method declares it."""
    from quantmill.methods import get_method, method_names

    table = {}
    for name in method_names():
        for source, metric in get_method(name).base_needs.metrics.items():
            method, _, field = source.rpartition(".")
            table[(method, field)] = metric
    return table


def method_metrics(layers: list[dict[str, Any]]) -> list[Figure]:
    """The methods' own figures from the layer reports, one step per block or layer."""
    table = declared_metrics()
    steps: dict[str, int] = {}
    figures = []
    for report in layers:
        values = {"loss": report.get("loss"), **report.get("extra", {})}
        for field, value in values.items():
            name = table.get((report.get("method"), field))
            if name is None or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            figures.append(Figure(name, float(value), steps.get(name, 0)))
            steps[name] = steps.get(name, 0) + 1
    return figures


def layer_losses(layers: list[dict[str, Any]]) -> list[Figure]:
    return [
        Figure("layer_loss", float(r["loss"]), i)
        for i, r in enumerate(layers)
        if math.isfinite(float(r["loss"]))
    ]


def training_metrics(results: list[dict[str, Any]]) -> list[Figure]:
    """Quantization-aware training: loss and learning rate per optimizer step (stepped),
    held-out loss before and after, steps, tokens and time."""
    figures = []
    for result in results:
        for h in result["history"]:
            if math.isfinite(h["loss"]):
                figures.append(Figure("train_loss", float(h["loss"]), int(h["step"])))
            figures.append(Figure("train_lr", float(h["lr"]), int(h["step"])))
        totals = {
            "train_steps": result["steps"],
            "train_tokens": result["tokens_seen"],
            "train_seconds": result["seconds"],
            "train_eval_loss_before": result.get("eval_loss_before"),
            "train_eval_loss_after": result.get("eval_loss_after"),
        }
        figures += [Figure(k, float(v)) for k, v in totals.items() if v is not None]
    return figures


def run_metrics(
    quantized: dict[str, Any] | None,
    original_eval: dict[str, Any] | None,
    quantized_eval: dict[str, Any] | None,
    timings: dict[str, float] | None,
) -> dict[str, float]:
    figures: dict[str, float] = {}
    if original_eval and original_eval.get("perplexity") is not None:
        figures["perplexity_original"] = float(original_eval["perplexity"])
    if quantized_eval and quantized_eval.get("perplexity") is not None:
        figures["perplexity"] = float(quantized_eval["perplexity"])
        figures["size_bytes"] = float(quantized_eval["size_bytes"])
        if quantized_eval.get("bits_per_weight") is not None:
            figures["bits_per_weight"] = float(quantized_eval["bits_per_weight"])
        if quantized_eval.get("outlier_column_fraction") is not None:  # LLM.int8() at run time
            figures["eval_outlier_column_fraction"] = float(
                quantized_eval["outlier_column_fraction"]
            )
    if quantized:
        figures["size_bytes"] = float(quantized["size_bytes"])
        figures["original_size_bytes"] = float(quantized["original_size_bytes"])
        figures["compression_ratio"] = quantized["original_size_bytes"] / quantized["size_bytes"]
        figures["quant_seconds"] = float(quantized["quant_seconds"])
        if quantized.get("bits_per_weight") is not None:
            figures["bits_per_weight"] = float(quantized["bits_per_weight"])
    if "perplexity" in figures and "perplexity_original" in figures:
        figures["perplexity_ratio"] = figures["perplexity"] / figures["perplexity_original"]
    figures.update(task_metrics(original_eval, quantized_eval))
    for stage, seconds in (timings or {}).items():
        figures[f"time_{stage}_s"] = float(seconds)
    return figures


def task_metrics(
    original_eval: dict[str, Any] | None, quantized_eval: dict[str, Any] | None
) -> dict[str, float]:
    """Zero-shot tasks: ``tasks.<task>.<metric>`` and ``…_stderr`` (``tasks_original.…`` for
    the original model), ``tasks.<task>.recovery``, ``tasks.<task>.seconds``, and the means
    ``accuracy_mean``, ``accuracy_mean_original``, ``accuracy_recovery``."""
    from quantmill.accuracy.recovery import accuracy_recovery, mean_score

    figures: dict[str, float] = {}
    parts = (("tasks", quantized_eval), ("tasks_original", original_eval))
    for prefix, result in parts:
        for name, task in ((result or {}).get("tasks") or {}).items():
            for metric, value in task["metrics"].items():
                figures[f"{prefix}.{name}.{metric}"] = float(value)
                err = task["stderr"].get(metric)
                if err is not None and math.isfinite(err):
                    figures[f"{prefix}.{name}.{metric}_stderr"] = float(err)
            figures[f"{prefix}.{name}.seconds"] = float(task["seconds"])
    orig = (original_eval or {}).get("tasks") or {}
    quant = (quantized_eval or {}).get("tasks") or {}
    for key, tasks in (("accuracy_mean", quant), ("accuracy_mean_original", orig)):
        if tasks:
            figures[key] = float(mean_score(tasks))
    recovery = accuracy_recovery(orig, quant)
    for name, row in recovery.get("tasks", {}).items():
        if row["recovery"] is not None:
            figures[f"tasks.{name}.recovery"] = float(row["recovery"])
    if recovery.get("mean_recovery") is not None:
        figures["accuracy_recovery"] = float(recovery["mean_recovery"])
    return figures
