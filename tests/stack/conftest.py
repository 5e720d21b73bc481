"""One local stack for the tests of this folder: `quantmill stack up --deploy` on free
ports with fresh PostgreSQL databases, and a Prefect client on it, with the
credentials `quantmill stack env` exports (the stack refuses requests without them)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid

import pytest

from tests.conftest import DATA_DIR
from tests.support.servers import PG, free_port

# what MlflowClient reads from the environment (as a shell after `eval "$(quantmill stack
# env)"` has it): the workers' login, and artifacts through the server, not presigned URLs
MLFLOW_LOGIN = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
)


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "app", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    """`quantmill stack up --deploy` on free ports with fresh PostgreSQL databases."""
    import psycopg2

    home = tmp_path_factory.mktemp("stack")
    prefix = f"qm_stack_{uuid.uuid4().hex[:6]}"
    ports = [str(free_port()) for _ in range(3)]
    args = ["--home", str(home), "--postgres", f"postgresql://{PG['user']}@{PG['host']}:5432"]
    args += ["--db-prefix", prefix, "--prefect-port", ports[0], "--mlflow-port", ports[1]]
    args += ["--s3-port", ports[2], "--workers", "2", "--deploy"]
    # runs started through the API or the UI write under the tests' temporary folders
    # and read the shared data and the models the tests cut there
    temp = tmp_path_factory.getbasetemp()
    args += ["--output-root", str(temp), "--data-root", str(DATA_DIR), "--data-root", str(temp)]
    # a killed worker's run is marked Crashed 45 s after its last heartbeat (90 s by
    # default; they come every 30 s), and the scheduler looks for new deployments
    # every 5 s (60 s)
    args += ["--crash-after-s", "45"]
    env = {**os.environ, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    try:
        cli("stack", "up", *args, env=env)
        env_lines = cli("stack", "env", "--home", str(home)).stdout.splitlines()
        env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in env_lines)
        saved = {k: os.environ.get(k) for k in MLFLOW_LOGIN}
        os.environ.update({k: env[k] for k in MLFLOW_LOGIN})
        yield {"home": home, "env": env, "prefix": prefix}
    finally:
        for key, value in locals().get("saved", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(
            [sys.executable, "-m", "app", "stack", "down", "--home", str(home)], timeout=300
        )
        admin = psycopg2.connect(dbname="postgres", **PG)
        admin.autocommit = True
        with admin.cursor() as cur:
            for name in ("prefect", "mlflow", "mlflow_auth"):
                cur.execute(f'DROP DATABASE IF EXISTS "{prefix}_{name}" WITH (FORCE)')
            for role in ("prefect", "mlflow"):
                cur.execute(f'DROP ROLE IF EXISTS "{prefix}_{role}"')
        admin.close()


@pytest.fixture
def client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    env = stack["env"]
    settings = {
        PREFECT_API_URL: env["PREFECT_API_URL"],
        PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"],
    }
    with temporary_settings(settings):
        with get_client(sync_client=True) as c:
            yield c
