"""Every record a run leaves, gathered to be searched for secrets: Prefect's flow
run, task runs, logs, artifacts and results; MLflow's params, tags, artifacts and
registry entries; and files on disk."""

from __future__ import annotations

import json
from pathlib import Path


def files(label: str, folder: Path) -> list[tuple[str, bytes]]:
    """Every file under ``folder``."""
    return [(f"{label}:{p.name}", p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def prefect_records(flow_run_id: str, storage: Path | None = None) -> list[tuple[str, bytes]]:
    """The flow run, its task runs, logs, artifacts and persisted results (under
    ``storage``, default: this process's local result storage), from the Prefect API
    this process is configured for."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    records = []
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        records.append(("prefect-flow-run", flow_run.model_dump_json().encode()))
        runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        for task_run in client.read_task_runs(flow_run_filter=runs_filter):
            records.append(("prefect-task-run", task_run.model_dump_json().encode()))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        assert logs
        records.append(("prefect-logs", "\n".join(log.message for log in logs).encode()))
        for artifact in client.read_artifacts():
            records.append(("prefect-artifact", artifact.model_dump_json().encode()))
    storage = Path(storage or PREFECT_LOCAL_STORAGE_PATH.value())
    if storage.is_dir():
        records += [
            (f"prefect-result:{p.name}", p.read_bytes()) for p in storage.rglob("*") if p.is_file()
        ]
    return records


def mlflow_records(
    client, run_id: str, registered: dict, tmp_path: Path
) -> list[tuple[str, bytes]]:
    run = client.get_run(run_id)
    records = [
        ("mlflow-run", json.dumps([run.data.params, run.data.tags, run.data.metrics]).encode())
    ]
    folder = Path(client.download_artifacts(run_id, "", str(tmp_path / "mlflow-artifacts")))
    records += [
        (f"mlflow-artifact:{p.name}", p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    ]
    version = client.get_model_version(registered["name"], registered["version"])
    model = client.get_registered_model(registered["name"])
    text = json.dumps([version.tags, version.description, model.tags, model.description])
    records.append(("mlflow-registry", text.encode()))
    return records
