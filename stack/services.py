"""What the stack runs, as data: each service's command, environment, URL and
health check, built from one settings object. Nothing here starts anything."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from quantmill import defaults

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
    aws_key: str = "quantmill"
    aws_secret: str = "quantmill-secret"

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

    def database(self, name: str, driver: str) -> str | None:
        """``postgresql+<driver>://…/<prefix>_<name>`` when PostgreSQL is configured."""
        if not self.postgres:
            return None
        base = self.postgres.split("://", 1)[1].rstrip("/")
        return f"postgresql+{driver}://{base}/{self.db_prefix}_{name}"


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


def client_env(s: StackSettings) -> dict[str, str]:
    """What a client (CLI, worker, flow run) needs to use the stack."""
    return {
        "PREFECT_API_URL": s.prefect_api,
        "MLFLOW_TRACKING_URI": s.mlflow_url,
        "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
        "QUANTMILL_S3_BUCKET": s.bucket,
        "AWS_ACCESS_KEY_ID": s.aws_key,
        "AWS_SECRET_ACCESS_KEY": s.aws_secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "quantmill",
    }


def services(s: StackSettings) -> list[Service]:
    """The servers (object storage, Prefect, MLflow), then the workers on the pool."""
    py = sys.executable
    home = s.home.resolve()
    aws = {k: v for k, v in client_env(s).items() if k.startswith(("AWS_", "MLFLOW_S3"))}
    prefect_env = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": s.prefect_api,
    }
    prefect_db = s.database("prefect", "asyncpg")
    if prefect_db:
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db
    mlflow_db = s.database("mlflow", "psycopg2") or f"sqlite:///{home / 'mlflow.db'}"
    out = [
        Service(
            "s3",
            [py, "-m", "moto.server", "-H", s.host, "-p", str(s.s3_port)],
            s.s3_url,
            f"{s.s3_url}/moto-api/",
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
            [py, "-m", "mlflow", "server", "--backend-store-uri", mlflow_db]
            + ["--artifacts-destination", f"s3://{s.bucket}/mlflow-artifacts"]
            + ["--host", s.host, "--port", str(s.mlflow_port), "--workers", "1"],
            s.mlflow_url,
            f"{s.mlflow_url}/health",
            {**aws, **MLFLOW_SERVER_ENV},
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
                    **client_env(s),
                    "PREFECT_HOME": str(home / "prefect"),
                    # runs send heartbeats; flows/deploy.py marks silent ones Crashed
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(defaults.HEARTBEAT_S),
                },
            )
        )
    return out
