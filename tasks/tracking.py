"""MLflow tracking: one run per flow run, child runs per recipe in a sweep.

Everything goes through ``MlflowClient`` with explicit run ids (never the
fluent API's global active run), so concurrent recipes cannot mix their
records. With ``MLFLOW_TRACKING_URI`` unset, runs go to a SQLite store in a
local folder (``QUANTMILL_MLFLOW_DIR``, default ``./mlruns``): no server.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from quantmill import plots
from quantmill.storage import S3Settings, remote_store

DEFAULT_EXPERIMENT = "quantmill"
PACKAGES = ("quantmill", "torch", "transformers", "compressed-tensors", "prefect", "mlflow")


def local_dir() -> Path:
    return Path(os.environ.get("QUANTMILL_MLFLOW_DIR", "mlruns")).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store under ``local_dir()``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    local_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local_dir() / 'mlflow.db'}"


def registry_uri() -> str:
    """``MLFLOW_REGISTRY_URI`` when set, else the tracking store."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri()


def get_client() -> MlflowClient:
    return MlflowClient(tracking_uri(), registry_uri())


def artifact_location() -> str | None:
    """Where a new experiment keeps artifacts: the S3 bucket when configured, a folder
    beside a local store, or (None) the tracking server's own choice."""
    settings = S3Settings.from_env()
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    if settings is not None:
        remote_store().ensure_bucket()  # type: ignore[union-attr]
        return settings.uri("mlflow")
    return (local_dir() / "artifacts").as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created on first use (artifacts beside a local store)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location())
    except MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


@dataclass
class TrackedRun:
    run_id: str
    experiment_id: str
    tracking_uri: str

    def where(self) -> str:
        """Where a person finds this run."""
        if self.tracking_uri.startswith(("http://", "https://")):
            base = self.tracking_uri.rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return (
            f"MLflow run {self.run_id} in {self.tracking_uri} "
            f"(browse: mlflow ui --backend-store-uri {self.tracking_uri})"
        )


def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run's id, name and URL, when inside one."""
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "prefect.flow_name": str(flow_run.flow_name),
    }
    # The UI's page for the run, else its API URL (a temporary local API has no UI);
    # a setting that is unset reads as "None/flow-runs/..." and is skipped.
    candidates = (
        lambda: flow_run.ui_url,
        lambda: flow_run.api_url,
        lambda: _client_run_url(str(flow_run.id)),
    )
    for candidate in candidates:
        url = candidate()
        if url and str(url).startswith(("http://", "https://")):
            tags["prefect.flow_run_url"] = str(url)
            break
    return tags


def _client_run_url(flow_run_id: str) -> str | None:
    """The run's REST URL on the API the client talks to (e.g. the temporary local one)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return f"{str(client.api_url).rstrip('/')}/flow_runs/{flow_run_id}"
    except Exception:
        return None


@contextmanager
def mlflow_run(
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    parent: TrackedRun | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[TrackedRun]:
    """A run that ends FINISHED, or FAILED with the error when the body raises."""
    client = get_client()
    exp_id = parent.experiment_id if parent else experiment_id(client, experiment)
    all_tags = {**prefect_tags(), **(tags or {})}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    tracked = TrackedRun(run.info.run_id, exp_id, tracking_uri())
    try:
        yield tracked
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        _record_failure(client, tracked.run_id, exc)
        try:
            client.set_terminated(tracked.run_id, status=status)
        except Exception:  # the tracking server is down too: keep the original error
            pass
        raise
    client.set_terminated(tracked.run_id, status="FINISHED")


def _record_failure(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    message = error_message(exc)
    try:
        client.set_tag(run_id, "error", message[:5000])
        client.log_text(run_id, "".join(traceback.format_exception(exc)), "error.txt")
    except Exception:  # never hide the original error behind a tracking one
        pass


def error_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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


def run_params(model: dict[str, Any], recipe: dict[str, Any] | None) -> dict[str, str]:
    params = {
        "model.source": str(model.get("source")),
        "model.kind": str(model.get("kind")),
        "model.revision": str(model.get("revision")),
    }
    params.update({f"versions.{k}": v for k, v in package_versions().items()})
    if recipe is not None:
        params.update(flatten(recipe, "recipe."))
    return params


def log_params(run: TrackedRun, model: dict[str, Any] | None, recipe: dict[str, Any] | None):
    """Log params (MLflow takes at most 100 a call; re-logging a same value is allowed)."""
    client = get_client()
    params = [Param(k, v[:6000]) for k, v in run_params(model or {}, recipe).items()]
    if model is None:
        params = [p for p in params if not p.key.startswith("model.")]
    for start in range(0, len(params), 100):
        client.log_batch(run.run_id, params=params[start : start + 100])


def set_tags(run: TrackedRun, tags: dict[str, Any]) -> None:
    client = get_client()
    for key, value in tags.items():
        client.set_tag(run.run_id, key, str(value))


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
    client = get_client()
    log_params(run, model, recipe)
    figures = run_metrics(quantized, original_eval, quantized_eval, timings)
    metrics = [Metric(k, v, 0, 0) for k, v in figures.items()]
    layers = _layers(quantized)
    metrics += [
        Metric("layer_loss", float(r["loss"]), 0, i)
        for i, r in enumerate(layers)
        if math.isfinite(float(r["loss"]))
    ]
    metrics += method_metrics(layers)
    trained = _training(quantized)
    metrics += training_metrics(trained)
    for start in range(0, len(metrics), 1000):
        client.log_batch(run.run_id, metrics=metrics[start : start + 1000])
    if quantized:
        for key, value in (quantized.get("engine") or {}).items():  # device, dtype, resumed
            if value is not None:
                client.set_tag(run.run_id, f"quantmill.engine.{key}", str(value))
        for key in ("recipe_file", "summary_file", "layers_file", "training_file"):
            if quantized.get(key) and Path(quantized[key]).is_file():
                client.log_artifact(run.run_id, quantized[key])
    if layers or trained:
        with tempfile.TemporaryDirectory() as tmp:
            drawn = [
                plots.training(trained, Path(tmp) / "training.png"),
                plots.layer_loss(layers, Path(tmp) / "layer_loss.png") if layers else None,
                plots.distillation(layers, Path(tmp) / "distillation.png"),
                plots.outlier_columns(layers, Path(tmp) / "outlier_columns.png"),
            ]
            for path in drawn:
                if path is not None:
                    client.log_artifact(run.run_id, str(path), "plots")
    if quantized_eval and not quantized:
        client.log_dict(run.run_id, quantized_eval, "evaluation.json")
    return figures


# Per-method figures from the layer reports, logged as stepped metrics (one step per
# block or layer, in model order) so MLflow charts them: report field → metric name.
METHOD_METRICS = {
    ("zeroquant-lkd", "loss"): "lkd_loss",
    ("zeroquant-lkd", "initial_loss"): "lkd_loss_before",
    ("smoothquant", "alpha"): "smoothquant_alpha",
    ("awq", "ratio"): "awq_ratio",
    ("llm_int8", "outlier_fraction"): "outlier_column_fraction",
}


def method_metrics(layers: list[dict[str, Any]]) -> list[Metric]:
    steps: dict[str, int] = {}
    metrics = []
    for report in layers:
        values = {"loss": report.get("loss"), **report.get("extra", {})}
        for field, value in values.items():
            name = METHOD_METRICS.get((report.get("method"), field))
            if name is None or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            metrics.append(Metric(name, float(value), 0, steps.get(name, 0)))
            steps[name] = steps.get(name, 0) + 1
    return metrics


def training_metrics(results: list[dict[str, Any]]) -> list[Metric]:
    """Quantization-aware training: loss and learning rate per optimizer step (stepped),
    held-out loss before and after, steps, tokens and time."""
    metrics = []
    for result in results:
        for h in result["history"]:
            if math.isfinite(h["loss"]):
                metrics.append(Metric("train_loss", float(h["loss"]), 0, int(h["step"])))
            metrics.append(Metric("train_lr", float(h["lr"]), 0, int(h["step"])))
        figures = {
            "train_steps": result["steps"],
            "train_tokens": result["tokens_seen"],
            "train_seconds": result["seconds"],
            "train_eval_loss_before": result.get("eval_loss_before"),
            "train_eval_loss_after": result.get("eval_loss_after"),
        }
        metrics += [Metric(k, float(v), 0, 0) for k, v in figures.items() if v is not None]
    return metrics


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
    for stage, seconds in (timings or {}).items():
        figures[f"time_{stage}_s"] = float(seconds)
    return figures


def _training(quantized: dict[str, Any] | None) -> list[dict[str, Any]]:
    import json

    path = (quantized or {}).get("training_file")
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else []


def _layers(quantized: dict[str, Any] | None) -> list[dict[str, Any]]:
    import json

    if not quantized or not Path(quantized["layers_file"]).is_file():
        return []
    return json.loads(Path(quantized["layers_file"]).read_text())
