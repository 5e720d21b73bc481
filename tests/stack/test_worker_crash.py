"""A worker killed mid-run: the run is marked Crashed once its heartbeats stop, and a
rerun completes. Last of the stack's tests (the file name sorts after the others):
the crashed run's deployment concurrency slot is held until its lease ends, which
would hold up any quantize run a later test starts."""

from __future__ import annotations

import time

import pytest

from tests.conftest import WIKI_TEST
from tests.stack.test_stack import deployment, wait_runs

pytestmark = pytest.mark.slow


def heartbeats(api_url: str, auth: str, run_id) -> int:
    """How many heartbeat events of the flow run the server has stored."""
    import httpx

    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        },
        "limit": 10,
    }
    login = tuple(auth.split(":", 1))
    response = httpx.post(f"{api_url}/events/filter", json=body, auth=login, timeout=10)
    response.raise_for_status()
    return len(response.json()["events"])


def test_a_worker_killed_mid_run_leaves_the_run_crashed_and_a_rerun_completes(
    stack, client, tmp_path, short_smollm2
):
    import psutil

    from stack import processes

    # RTN on the whole model: still running when its first heartbeat is stored
    job = {
        "model": "smollm2-135m",
        "recipe": "rtn-w4g64",
        "out_dir": str(tmp_path / "out"),
        "overwrite": True,
        "data": {"eval_data": str(WIKI_TEST), "eval_windows": 1},
    }
    quantize = deployment(client, "quantize")
    run = client.create_flow_run_from_deployment(quantize.id, parameters={"job": job})
    deadline = time.monotonic() + 300
    while client.read_flow_run(run.id).state.type.value != "RUNNING":
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(1)
    # the crash is detected from missed heartbeats: wait until the server has one
    api = stack["env"]["PREFECT_API_URL"]
    while heartbeats(api, stack["env"]["PREFECT_API_AUTH_STRING"], run.id) == 0:
        assert time.monotonic() < deadline, "the run sent no heartbeat"
        time.sleep(0.5)

    # the worker running it dies with everything it started, as when its machine goes down
    flow_process = psutil.Process(
        int(client.read_flow_run(run.id).infrastructure_pid.split(":")[-1])
    )
    worker = flow_process.parent()
    services = processes.read_state(stack["home"])["services"]
    (name,) = [n for n, info in services.items() if info["pid"] == worker.pid]
    family = [worker, *worker.children(recursive=True)]
    assert len(family) > 1  # the flow run's own process is among them
    for proc in family:
        proc.kill()
    psutil.wait_procs(family, timeout=30)

    (crashed,) = wait_runs(client, [run.id], timeout=300)
    assert crashed.state.type.value == "CRASHED", crashed.state
    assert "heartbeat" in (crashed.state.message or "")

    processes.restart(stack["home"], name)
    # the rerun on the first 4 blocks: what is checked is that the pool takes work again
    rerun = {**job, "model": str(short_smollm2)}
    again = client.create_flow_run_from_deployment(quantize.id, parameters={"job": rerun})
    (done,) = wait_runs(client, [again.id], timeout=600)
    assert done.state.type.value == "COMPLETED", done.state.message
