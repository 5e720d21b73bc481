"""A sweep whose recipes run on a local Dask cluster of several processes."""

from __future__ import annotations

import os

import pytest

from flows.params import SweepJob
from flows.sweep import sweep_flow
from tests.pipeline.conftest import small_data
from tests.pipeline.test_flows import runs_of

pytestmark = pytest.mark.slow


def test_a_sweep_fans_out_over_dask_worker_processes(pipeline_env, short_smollm2, mlflow_client):
    job = SweepJob(
        model=str(short_smollm2),
        recipes=["rtn-w4g64", "rtn-w8-channel"],
        max_concurrency=2,
        dask="local",
        data=small_data(),
    )
    state = sweep_flow(job, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    (parent,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["quantmill.recipe"] for c in children) == [
        "rtn-w4g64",
        "rtn-w8-channel",
    ]
    assert all(c.info.status == "FINISHED" for c in children)
    # each recipe ran in a Dask worker process, not in this one
    pids = {c.data.tags["quantmill.pid"] for c in children}
    assert pids and str(os.getpid()) not in pids
