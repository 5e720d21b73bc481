"""The service stack without Docker, on this machine's PostgreSQL: `quantmill
stack up` (S3, Prefect server, MLflow server, a worker), its credentials, the
deployments, runs triggered through the Prefect API as the UI triggers them,
schedules, and a burst of runs held to the deployment's concurrency limit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import boto3
import httpx
import pytest

from stack.credentials import MLFLOW_ADMIN, load
from tests.conftest import WIKI_TEST, WIKI_VALID
from tests.stack.conftest import cli
from tests.support.leaks import files, mlflow_records, prefect_records
from tests.support.servers import PG

pytestmark = pytest.mark.slow
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployment(client, name: str):
    return client.read_deployment_by_name(f"{name}/{name}")


def wait_runs(client, ids, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [client.read_flow_run(i) for i in ids]
        if all(r.state and r.state.type.value in TERMINAL for r in runs):
            return runs
        time.sleep(2)
    states = [(r.name, r.state.type.value if r.state else None) for r in runs]
    pytest.fail(f"runs not finished after {timeout} s: {states}")


def test_status_shows_every_service_and_where(stack):
    rows = json.loads(cli("stack", "status", "--home", str(stack["home"]), "--json").stdout)
    by_name = {r["service"]: r for r in rows}
    for name in ("s3", "prefect-server", "mlflow"):
        assert by_name[name]["running"] and by_name[name]["ready"], by_name[name]
    assert by_name["worker-1"]["running"] and by_name["worker-2"]["running"]
    assert by_name["mlflow"]["url"] == stack["env"]["MLFLOW_TRACKING_URI"]
    assert by_name["pool"]["url"] == "quantmill"


def test_the_apis_refuse_requests_without_the_stacks_credentials(stack):
    env, home = stack["env"], stack["home"]
    creds = load(home)
    prefect, mlflow = env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]
    worker = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    runs = f"{prefect}/flow_runs/filter"
    experiments = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=5"

    # Prefect: the health probe is open, the API is not
    assert httpx.get(f"{prefect}/health", timeout=10).status_code == 200
    assert httpx.post(runs, json={}, timeout=10).status_code == 401
    assert httpx.post(runs, json={}, auth=("quantmill", "guess"), timeout=10).status_code == 401
    login = tuple(env["PREFECT_API_AUTH_STRING"].split(":", 1))
    assert httpx.post(runs, json={}, auth=login, timeout=10).status_code == 200

    # MLflow: the same; the workers' user works but cannot manage users, the admin can
    assert httpx.get(f"{mlflow}/health", timeout=10).status_code == 200
    assert httpx.get(experiments, timeout=10).status_code == 401
    assert httpx.get(experiments, auth=(worker[0], "guess"), timeout=10).status_code == 401
    assert httpx.get(f"{mlflow}/", timeout=10).status_code == 401  # the UI too
    assert httpx.get(experiments, auth=worker, timeout=10).status_code == 200
    new_user = {"username": "mallory", "password": "a-long-enough-password"}
    create = f"{mlflow}/api/2.0/mlflow/users/create"
    assert httpx.post(create, json=new_user, auth=worker, timeout=10).status_code == 403
    admin = (MLFLOW_ADMIN, creds.mlflow_admin_password)
    assert httpx.get(experiments, auth=admin, timeout=10).status_code == 200
    assert creds.mlflow_admin_password not in env.values()  # clients never get the admin

    # S3: signed requests only, and the workers' key reaches their bucket alone; moto's
    # control API (reset, a dashboard of every object) is closed
    import botocore.exceptions

    s3_url = env["MLFLOW_S3_ENDPOINT_URL"]
    key = {k.lower(): env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", **key)
    s3.put_object(Bucket="quantmill", Key="probe.txt", Body=b"ok")
    for call in (lambda: s3.create_bucket(Bucket="elsewhere"), s3.list_buckets):
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
            call()
    wrong = {**key, "aws_secret_access_key": "guess"}
    other = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", **wrong)
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        other.get_object(Bucket="quantmill", Key="probe.txt")
    assert httpx.get(f"{s3_url}/quantmill/probe.txt", timeout=10).status_code == 403
    assert httpx.post(f"{s3_url}/moto-api/reset", timeout=10).status_code == 403
    url = s3.generate_presigned_url("get_object", {"Bucket": "quantmill", "Key": "probe.txt"})
    refused = httpx.get(url, timeout=10)  # refused at once, saying what to set
    assert refused.status_code == 403 and "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" in refused.text
    s3.delete_object(Bucket="quantmill", Key="probe.txt")

    # no credential on a command line (any local user can read those)
    import psutil

    secrets = creds.values()
    for info in json.loads((home / "state.json").read_text())["services"].values():
        proc = psutil.Process(info["pid"])
        lines = [" ".join(p.cmdline()) for p in [proc, *proc.children(recursive=True)]]
        assert not [s for s in secrets for line in lines if s in line], info["cmd"][:4]

    # the credentials on disk are the owner's alone
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("credentials.json", "state.json", "mlflow-auth.ini"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name

    # PostgreSQL: each service has its own role, and no role reaches another's database
    import psycopg2

    prefix = stack["prefix"]
    own = psycopg2.connect(host=PG["host"], user=f"{prefix}_mlflow", dbname=f"{prefix}_mlflow")
    own.close()
    with pytest.raises(psycopg2.OperationalError, match="CONNECT privilege"):
        psycopg2.connect(host=PG["host"], user=f"{prefix}_prefect", dbname=f"{prefix}_mlflow")


def test_deployments_have_forms_limits_and_schedules(stack, client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    quantize = deployment(client, "quantize")
    schema = json.dumps(quantize.parameter_openapi_schema)
    assert '"gptq-w4g64"' in schema and '"rtn-w4g64"' in schema  # recipe choices in the form
    assert "export_format" in schema and "hub_repo" in schema
    assert quantize.global_concurrency_limit.limit == 2
    assert quantize.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert quantize.work_pool_name == "quantmill"

    analyze = deployment(client, "analyze")  # the outlier report, from the UI too
    assert "seq_len" in json.dumps(analyze.parameter_openapi_schema)

    sweep = deployment(client, "sweep")
    assert [s.schedule.cron for s in sweep.schedules] == ["0 2 * * *"]
    # the scheduler turns the cron schedule into scheduled runs at 02:00
    deadline = time.monotonic() + 90
    runs = []
    while time.monotonic() < deadline and not runs:
        flt = DeploymentFilter(id=DeploymentFilterId(any_=[sweep.id]))
        runs = [
            r
            for r in client.read_flow_runs(deployment_filter=flt)
            if r.state_type.value == "SCHEDULED"
        ]
        time.sleep(2)
    assert runs, "no scheduled runs for the nightly sweep"
    assert all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0 for r in runs)

    # a user sets another deployment's schedule
    cli("deploy", "--schedule", "evaluate=30 4 * * 1-5", env={**os.environ, **stack["env"]})
    evaluate = deployment(client, "evaluate")
    assert [s.schedule.cron for s in evaluate.schedules] == ["30 4 * * 1-5"]


def test_a_run_triggered_through_the_api_completes_into_mlflow_and_s3(
    stack, client, tmp_path, short_smollm2
):
    from mlflow.tracking import MlflowClient

    data = {"calib_data": str(WIKI_VALID), "eval_data": str(WIKI_TEST), "eval_windows": 1}
    job = {
        "model": str(short_smollm2),  # the services are the point: the real weights, 4 blocks
        "recipe": "rtn-w4g64",
        "out_dir": str(tmp_path / "out"),
        "data": {**data, "eval_seq_len": 256},
    }
    run = client.create_flow_run_from_deployment(
        deployment(client, "quantize").id, parameters={"job": job}
    )
    (done,) = wait_runs(client, [run.id], timeout=600)
    assert done.state.type.value == "COMPLETED", done.state.message

    mlflow = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    exp = mlflow.get_experiment_by_name("quantmill")
    (tracked,) = mlflow.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert tracked.info.status == "FINISHED"
    s3 = boto3.client(
        "s3",
        endpoint_url=stack["env"]["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=stack["env"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack["env"]["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys = [
        o["Key"] for o in s3.list_objects_v2(Bucket="quantmill", MaxKeys=1000).get("Contents", [])
    ]
    run_keys = [k for k in keys if f"/{tracked.info.run_id}/artifacts/" in k]
    names = {k.split("/artifacts/", 1)[1] for k in run_keys}
    assert {"quantmill_eval.json", "quantmill_recipe.yaml", "model/MLmodel"} <= names
    versions = mlflow.search_model_versions(f"run_id = '{tracked.info.run_id}'")
    assert len(versions) == 1

    # none of the stack's credentials is in anything the run left, nor in the logs
    home = stack["home"]
    registered = {"name": versions[0].name, "version": versions[0].version}
    haystack = prefect_records(str(run.id), storage=home / "prefect" / "storage")
    haystack += mlflow_records(mlflow, tracked.info.run_id, registered, tmp_path)
    haystack += files("checkpoint", tmp_path / "out") + files("stack-log", home / "logs")
    names = {name.split(":")[0] for name, _ in haystack}
    assert {"prefect-logs", "prefect-flow-run", "mlflow-artifact", "checkpoint"} <= names
    secrets = [s.encode() for s in load(home).values()]

    def leaks(records):
        return [(name, i) for name, data in records for i, s in enumerate(secrets) if s in data]

    assert leaks(haystack) == []
    # the search finds them where they are meant to be (the state file holds every one)
    state = [("state", (home / "state.json").read_bytes())]
    assert len(leaks(state)) == len(secrets)


def test_three_runs_at_once_with_a_limit_of_two_all_complete(stack, client, short_smollm2):
    # the limit is the point, not the depth of the model: SmolLM2's real weights, 4 blocks,
    # one short window; three runs, one of them queued behind the two slots
    data = {"eval_data": str(WIKI_TEST), "eval_windows": 1, "eval_seq_len": 256}
    job = {"model": str(short_smollm2), "data": data}
    evaluate = deployment(client, "evaluate")
    ids = [
        client.create_flow_run_from_deployment(evaluate.id, parameters={"job": job}).id
        for _ in range(3)
    ]
    runs = wait_runs(client, ids, timeout=1200)
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 3
    # from each run's recorded states (not by sampling, which can miss the peak): the
    # most runs RUNNING at one moment
    events = []
    for run_id in ids:
        states = client.read_flow_run_states(run_id)
        start = min(s.timestamp for s in states if s.type.value == "RUNNING")
        end = max(s.timestamp for s in states if s.type.value == "COMPLETED")
        events += [(start, 1), (end, -1)]
    running, most = 0, 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start
        running += step
        most = max(most, running)
    assert most == 2  # the limit was used, and respected


def test_a_sweep_fans_out_over_the_pools_workers(stack, client, tmp_path, short_smollm2):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    job = {
        "model": str(short_smollm2),  # where each recipe runs is the point, not its depth
        "recipes": ["rtn-w4g64", "rtn-w8-channel"],
        "out_root": str(tmp_path / "sweep"),
        "fan_out": True,
        "data": {"eval_data": str(WIKI_TEST), "eval_windows": 1, "eval_seq_len": 256},
    }
    sweep = client.create_flow_run_from_deployment(
        deployment(client, "sweep").id, parameters={"job": job}
    )
    (done,) = wait_runs(client, [sweep.id], timeout=900)
    assert done.state.type.value == "COMPLETED", done.state.message
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sweep.id])
        )
    )
    assert len(children) == 2
    assert {c.deployment_id for c in children} == {deployment(client, "quantize").id}
    assert all(c.state_type.value == "COMPLETED" for c in children)
    # each recipe ran in a process a worker started, not in the sweep's own
    pids = {c.infrastructure_pid for c in children} | {done.infrastructure_pid}
    assert len(pids) == 3
    for name in ("rtn-w4g64", "rtn-w8-channel"):
        assert (tmp_path / "sweep" / name / "quantmill_eval.json").is_file()


@pytest.mark.parametrize(
    "change, named",
    [
        ({"PREFECT_API_AUTH_STRING": "quantmill:wrong"}, "PREFECT_API_AUTH_STRING"),
        ({"PREFECT_API_AUTH_STRING": ""}, "set PREFECT_API_AUTH_STRING"),
        ({"MLFLOW_TRACKING_PASSWORD": "wrong"}, "MLFLOW_TRACKING_USERNAME and"),
    ],
    ids=["wrong-prefect", "no-prefect", "wrong-mlflow"],
)
def test_a_client_without_the_right_credentials_is_told_which_to_set(
    stack, tmp_path, change, named
):
    env = {**os.environ, **stack["env"], **change}
    cmd = [sys.executable, "-m", "app", "runs", "clean"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert named in done.stderr and "quantmill stack env" in done.stderr
    assert "Traceback" not in done.stderr
