"""Pipeline fixtures: Prefect's test harness, an MLflow SQLite store and a cache
folder per test, one MLflow server on PostgreSQL for the session, and small
calibration/evaluation budgets on the real model."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "quantmill")

import pytest

from tests.conftest import DATA_DIR, WIKI_TEST, WIKI_VALID


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def mlflow_server_url(tmp_path_factory):
    """One real ``mlflow server`` for the session, its runs and registry in PostgreSQL."""
    from tests.support.servers import mlflow_server, postgres_database

    with postgres_database("quantmill_mlflow") as backend:
        with mlflow_server(backend, tmp_path_factory.mktemp("mlflow-server")) as url:
            yield url


@pytest.fixture
def pipeline_env(smollm2_path, prefect_harness, tmp_path, tmp_path_factory, monkeypatch):
    """Nothing configured: local MLflow store, fresh cache, outputs under tmp_path. Jobs
    made from plain data keep their paths in their places (flows.places) as on a worker:
    outputs under tmp_path; inputs there, in the shared data folder, in pytest's
    temporary folders (the cut model, the checkpoints of module fixtures) and the
    converted preset."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("QUANTMILL_MLFLOW_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTMILL_OUTPUT_ROOT", str(tmp_path))
    data_roots = [DATA_DIR, tmp_path_factory.getbasetemp(), smollm2_path]
    monkeypatch.setenv("QUANTMILL_DATA_ROOTS", os.pathsep.join(map(str, data_roots)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def small_data(**extra):
    """A CI-sized budget: 4 calibration samples of 512 tokens, 1 window of 2048."""
    return {
        "calib_data": str(WIKI_VALID),
        "calib_samples": 4,
        "eval_data": str(WIKI_TEST),
        "eval_windows": 1,
        **extra,
    }


@pytest.fixture
def mlflow_client(pipeline_env):
    from tracking.adapter import get_client

    return get_client()
