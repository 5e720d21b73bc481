"""What the stack runs, as data: each service's command, environment, URL and
health check, built from one settings object. Nothing here starts anything."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from quantmill import defaults
from stack.credentials import MLFLOW_ADMIN, MLFLOW_WORKER, Credentials

DEFAULT_HOME = Path(".quantmill") / "stack"


class StackSettingsError(ValueError):
    """A stack setting that cannot work."""


@dataclass(frozen=True)
class StackSettings:
    home: Path = DEFAULT_HOME  # state file, logs and local stores
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    s3_port: int = 9000
    # A PostgreSQL server URL (postgresql://user[:pw]@host:port); None: SQLite files in home.
    postgres: str | None = None
    db_prefix: str = "quantmill"
    bucket: str = defaults.BUCKET
    pool: str = defaults.POOL
    worker_limit: int = 2  # flow runs one worker executes at once
    workers: int = 1
    crash_after_s: int = defaults.CRASH_AFTER_S  # a run without heartbeats is then Crashed
    # where runs started from the UI or the API may write, and read inputs from
    output_root: Path = Path(defaults.OUTPUT_ROOT)
    data_roots: tuple[Path, ...] = ()  # () : the workers' defaults ($QUANTMILL_DATA_DIR, ./data)

    def check(self) -> None:
        """Settings that cannot work, named with the fix (``StackSettingsError``)."""
        if self.crash_after_s <= defaults.HEARTBEAT_S:
            raise StackSettingsError(
                f"crash_after_s = {self.crash_after_s}: runs send a heartbeat every "
                f"{defaults.HEARTBEAT_S} s, so give more than that (default "
                f"{defaults.CRASH_AFTER_S}): --crash-after-s"
            )
        if self.workers < 1 or self.worker_limit < 1:
            raise StackSettingsError("workers and worker_limit: give at least 1")

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def role(self, service: str) -> str:
        """The PostgreSQL role of ``service`` (prefect, mlflow): ``<prefix>_<service>``."""
        return f"{self.db_prefix}_{service}"

    def database(self, name: str, driver: str, c: Credentials) -> str | None:
        """``postgresql+<driver>://<role>:<pw>@host:port/<prefix>_<name>`` when PostgreSQL
        is configured; the role is the service's own (``mlflow_auth`` is MLflow's)."""
        if not self.postgres:
            return None
        server = self.postgres.split("://", 1)[1].rstrip("/").rsplit("@", 1)[-1]
        service = name.split("_")[0]
        login = f"{self.role(service)}:{c.pg_password(service)}"
        return f"postgresql+{driver}://{login}@{server}/{self.db_prefix}_{name}"


# MLflow 3's server starts about eight job-queue consumers (GenAI evaluation jobs, which
# quantmill never submits): ~270 MB each, polling all the time. Not started.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass(frozen=True)
class Service:
    name: str
    cmd: list[str]
    url: str
    health: str  # a URL that answers 200 when the service is ready
    env: dict[str, str] = field(default_factory=dict)


def client_env(s: StackSettings, c: Credentials) -> dict[str, str]:
    """What a client (CLI, worker, flow run) needs to use the stack: its addresses and
    the workers' credentials (MLflow's non-admin worker user, Prefect's auth string)."""
    return {
        "PREFECT_API_URL": s.prefect_api,
        "PREFECT_API_AUTH_STRING": c.prefect_auth,
        "MLFLOW_TRACKING_URI": s.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_WORKER,
        "MLFLOW_TRACKING_PASSWORD": c.mlflow_worker_password,
        "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
        "QUANTMILL_S3_BUCKET": s.bucket,
        "AWS_ACCESS_KEY_ID": c.s3_key,
        "AWS_SECRET_ACCESS_KEY": c.s3_secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "quantmill",
        # artifacts stream through MLflow (its logins and permissions), never through
        # presigned S3 URLs (bearer links, and the locked S3 server takes signed headers)
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    }


def worker_places(s: StackSettings) -> dict[str, str]:
    """The output root and data roots of runs started from the UI or the API."""
    env = {"QUANTMILL_OUTPUT_ROOT": str(s.output_root.resolve())}
    if s.data_roots:
        env["QUANTMILL_DATA_ROOTS"] = os.pathsep.join(str(p.resolve()) for p in s.data_roots)
    return env


def mlflow_auth_ini(s: StackSettings, c: Credentials) -> str:
    """MLflow's basic-auth configuration: users see what they made or were given
    (``NO_PERMISSIONS`` by default); the user store beside the tracking store."""
    store = s.database("mlflow_auth", "psycopg2", c) or f"sqlite:///{s.home.resolve() / 'auth.db'}"
    return (
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {store}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


MLFLOW_AUTH_FILE = "mlflow-auth.ini"


def services(s: StackSettings, c: Credentials) -> list[Service]:
    """The servers (object storage, Prefect, MLflow), then the workers on the pool."""
    py = sys.executable
    home = s.home.resolve()
    aws = {k: v for k, v in client_env(s, c).items() if k.startswith(("AWS_", "MLFLOW_S3"))}
    prefect_env = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": s.prefect_api,
        "PREFECT_SERVER_API_AUTH_STRING": c.prefect_auth,
    }
    prefect_db = s.database("prefect", "asyncpg", c)
    if prefect_db:
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db
    mlflow_db = s.database("mlflow", "psycopg2", c) or f"sqlite:///{home / 'mlflow.db'}"
    mlflow_env = {
        **aws,
        **MLFLOW_SERVER_ENV,
        # in the environment, not on the command line, which other users can read
        "MLFLOW_BACKEND_STORE_URI": mlflow_db,
        "MLFLOW_AUTH_CONFIG_PATH": str(home / MLFLOW_AUTH_FILE),
        "MLFLOW_AUTH_ADMIN_PASSWORD": c.mlflow_admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": c.mlflow_flask_secret,
    }
    out = [
        Service(
            "s3",  # moto's server, locked: signed requests only, the bucket's user alone
            [py, "-m", "stack.s3_server", "--host", s.host, "--port", str(s.s3_port)]
            + ["--bucket", s.bucket],
            s.s3_url,
            f"{s.s3_url}/health",
            {"QUANTMILL_S3_KEY": c.s3_key, "QUANTMILL_S3_SECRET": c.s3_secret},
        ),
        Service(
            "prefect-server",
            [py, "-m", "prefect", "server", "start", "--host", s.host]
            + ["--port", str(s.prefect_port)],
            f"http://{s.host}:{s.prefect_port}",
            f"{s.prefect_api}/health",
            prefect_env,
        ),
        Service(
            "mlflow",
            [py, "-m", "mlflow", "server", "--app-name", "basic-auth"]
            + ["--artifacts-destination", f"s3://{s.bucket}/mlflow-artifacts"]
            + ["--host", s.host, "--port", str(s.mlflow_port), "--workers", "1"],
            s.mlflow_url,
            f"{s.mlflow_url}/health",
            mlflow_env,
        ),
    ]
    for index in range(s.workers):
        name = "worker" if s.workers == 1 else f"worker-{index + 1}"
        out.append(
            Service(
                name,
                [py, "-m", "prefect", "worker", "start", "--pool", s.pool, "--type", "process"]
                + ["--limit", str(s.worker_limit), "--name", f"{s.pool}-{name}"],
                s.prefect_api,
                "",  # checked through the API: the worker shows up in its pool
                {
                    **client_env(s, c),
                    **worker_places(s),
                    "PREFECT_HOME": str(home / "prefect"),
                    # runs send heartbeats; flows/deploy.py marks silent ones Crashed
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(defaults.HEARTBEAT_S),
                },
            )
        )
    return out
