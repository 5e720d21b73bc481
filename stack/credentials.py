"""The stack's credentials: made once per ``--home`` with a cryptographic random
source, kept in ``<home>/credentials.json`` (mode 0600, in a 0700 folder) and
read again by every later ``stack up``, ``stack env`` and ``stack status``.

Nothing here is a default in code: a stack started elsewhere gets other values.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "credentials.json"
PREFECT_USER = "quantmill"  # the user part of Prefect's "user:password" auth string
MLFLOW_ADMIN = "admin"  # MLflow's administrator: people in the UI, user management
MLFLOW_WORKER = "quantmill-worker"  # what the workers and clients use: no admin rights


@dataclass(frozen=True)
class Credentials:
    prefect_password: str
    mlflow_admin_password: str
    mlflow_worker_password: str
    mlflow_flask_secret: str  # signs MLflow's session cookies and CSRF tokens
    s3_key: str
    s3_secret: str
    pg_prefect_password: str  # each service's own PostgreSQL role (with --postgres)
    pg_mlflow_password: str

    @property
    def prefect_auth(self) -> str:
        """Prefect's server and client auth string."""
        return f"{PREFECT_USER}:{self.prefect_password}"

    def values(self) -> list[str]:
        """Every secret value (to search records for leaks)."""
        return [v for k, v in asdict(self).items() if k != "s3_key"] + [self.prefect_auth]

    @classmethod
    def new(cls) -> Credentials:
        return cls(
            prefect_password=secrets.token_urlsafe(24),
            mlflow_admin_password=secrets.token_urlsafe(24),
            mlflow_worker_password=secrets.token_urlsafe(24),
            mlflow_flask_secret=secrets.token_hex(32),
            s3_key="QM" + secrets.token_hex(9).upper(),
            s3_secret=secrets.token_urlsafe(30),
            pg_prefect_password=secrets.token_urlsafe(24),
            pg_mlflow_password=secrets.token_urlsafe(24),
        )

    def pg_password(self, service: str) -> str:
        return {"prefect": self.pg_prefect_password, "mlflow": self.pg_mlflow_password}[service]


def private_dir(path: Path) -> Path:
    """``path`` created if missing, readable by its owner alone (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically, the file never readable by others (0600)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def load_or_create(home: Path) -> Credentials:
    """The home's credentials; made and saved on the first call."""
    existing = load(private_dir(home))
    if existing is not None:
        return existing
    made = Credentials.new()
    write_private(home / FILE, json.dumps(asdict(made), indent=2) + "\n")
    return made


def load(home: Path) -> Credentials | None:
    path = home / FILE
    return Credentials(**json.loads(path.read_text())) if path.is_file() else None
