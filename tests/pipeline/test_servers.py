"""`quantmill run` against real servers started here: an MLflow tracking server
backed by PostgreSQL (on this machine) and a Prefect server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import SHORT_BLOCKS, WIKI_TEST, WIKI_VALID
from tests.support.servers import free_port, start, stop, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = start(cmd + ["--port", str(port)], folder / "server.log", env)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, folder / "server.log")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)


def last_json(text: str) -> dict:
    """The JSON document the CLI prints last (log lines may come before it)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_run_against_mlflow_on_postgres_and_a_prefect_server(
    mlflow_server_url, prefect_server, short_smollm2, tmp_path
):
    from mlflow.tracking import MlflowClient

    mlflow_url = mlflow_server_url
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "QUANTMILL_CACHE": str(tmp_path / "cache"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "quantmill",
    }
    cmd = [sys.executable, "-m", "app", "run", "--model", str(short_smollm2)]
    cmd += ["--recipe", "rtn-w4g64", "--out", str(tmp_path / "out"), "--json"]
    cmd += ["--calib-data", str(WIKI_VALID), "--eval-data", str(WIKI_TEST), "--eval-windows", "1"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = last_json(done.stdout)
    assert result["mlflow"].startswith(mlflow_url)
    assert not (tmp_path / "mlruns").exists()  # the local store is not used

    client = MlflowClient(mlflow_url)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe.steps.0.method"] == "rtn"
    assert run.data.metrics["perplexity"] == pytest.approx(result["perplexity"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "quantmill_eval.json" in artifacts  # served back through the tracking server

    flow_run_id = run.data.tags["prefect.flow_run_id"]
    flow_run = api(f"{prefect_server}/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert run.data.tags["prefect.flow_run_url"].startswith(("http://", "https://"))
    logs = api(f"{prefect_server}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
    messages = [entry["message"] for entry in logs]
    assert any(f"block {SHORT_BLOCKS}/{SHORT_BLOCKS} quantized" in m for m in messages)
    assert any("perplexity: window 1/1" in m for m in messages)
