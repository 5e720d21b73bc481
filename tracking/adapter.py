"""The MLflow adapter: the one module that talks to a tracking store.

One run per flow run, child runs per recipe in a sweep. Everything goes
through ``MlflowClient`` with explicit run ids (never the fluent API's global
active run), so concurrent recipes cannot mix their records. With
``MLFLOW_TRACKING_URI`` unset, runs go to a SQLite store in a local folder
(``QUANTMILL_MLFLOW_DIR``, default ``./mlruns``): no server.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quantmill import defaults
from quantmill.storage import S3Settings, remote_store
from tracking import owners
from tracking.figures import Figure

OWNER_TAG = "quantmill.owner"  # host:pid:start of the process that opened the run


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
    experiment: str = defaults.EXPERIMENT,
    parent: TrackedRun | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[TrackedRun]:
    """A run that ends FINISHED, or FAILED with the error when the body raises."""
    client = get_client()
    exp_id = parent.experiment_id if parent else experiment_id(client, experiment)
    all_tags = {**prefect_tags(), **(tags or {}), OWNER_TAG: str(owners.current())}
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    else:  # runs a killed process left RUNNING in this experiment end now, as FAILED
        try:
            end_dead_runs(client, [exp_id])
        except MlflowException:  # tidying must never stop a run
            pass
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


def end_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """End as FAILED the RUNNING runs whose owning process on this host is gone (killed
    before it could end them), with the reason in their ``error`` tag; their ids."""
    me = owners.current()
    running = client.search_runs(
        experiment_ids, "attributes.status = 'RUNNING'", max_results=defaults.MAX_RUNS_SEARCHED
    )
    ended = []
    for run in running:
        owner = owners.Owner.parse(run.data.tags.get(OWNER_TAG, ""))
        if owner is None or not owners.is_gone(owner):
            continue
        reason = (f"the process that ran it ({owner.describe()}) ended without closing the "
                  f"run (killed?); marked FAILED by {me.describe()}")  # fmt: skip
        client.set_tag(run.info.run_id, "error", reason)
        client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


def end_dead_runs_everywhere(experiment: str | None = None) -> list[tuple[str, str]]:
    """``end_dead_runs`` in one experiment (by name) or all: (experiment, run id) pairs."""
    client = get_client()
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        experiments = [found] if found is not None else []
    else:
        experiments = client.search_experiments()
    return [
        (exp.name, run_id)
        for exp in experiments
        for run_id in end_dead_runs(client, [exp.experiment_id])
    ]


def _record_failure(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    message = error_message(exc)
    try:
        client.set_tag(run_id, "error", message[:5000])
        client.log_text(run_id, "".join(traceback.format_exception(exc)), "error.txt")
    except Exception:  # never hide the original error behind a tracking one
        pass


def error_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def log_params(run: TrackedRun, params: dict[str, str]) -> None:
    """Log params (MLflow takes at most 100 a call; re-logging a same value is allowed)."""
    client = get_client()
    entries = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(entries), 100):
        client.log_batch(run.run_id, params=entries[start : start + 100])


def log_metrics(run: TrackedRun, figures: list[Figure]) -> None:
    """Log figures as metrics (at most 1000 a call)."""
    client = get_client()
    metrics = [Metric(f.key, float(f.value), 0, f.step) for f in figures]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run.run_id, metrics=metrics[start : start + 1000])


def log_files(run: TrackedRun, paths: list[str | Path], folder: str | None = None) -> None:
    client = get_client()
    for path in paths:
        client.log_artifact(run.run_id, str(path), folder)


def log_dict(run: TrackedRun, data: Any, name: str) -> None:
    get_client().log_dict(run.run_id, data, name)


def log_table(run: TrackedRun, columns: dict[str, list], name: str) -> None:
    """A table artifact (MLflow's, shown as a table in its UI): column → values."""
    get_client().log_table(run.run_id, data=columns, artifact_file=name)


def set_tags(run: TrackedRun, tags: dict[str, Any]) -> None:
    client = get_client()
    for key, value in tags.items():
        client.set_tag(run.run_id, key, str(value))


def find_run(tag: str, value: str) -> tuple[str, dict[str, float]] | None:
    """``(run id, metrics)`` of the run whose ``tag`` is ``value``, in any experiment."""
    client = get_client()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`{tag}` = '{value}'"
    )
    return (runs[0].info.run_id, dict(runs[0].data.metrics)) if runs else None
