"""Start and stop real server processes for tests: free loopback ports, readiness
checks, a fresh PostgreSQL database, an MLflow server, a moto S3 server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stack.services import MLFLOW_SERVER_ENV

PG = {"host": os.environ.get("QUANTMILL_PG_HOST", "127.0.0.1"), "user": "postgres"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def postgres_database(prefix: str = "quantmill") -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards; yields its URL."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(dbname="postgres", **PG)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG['user']}@{PG['host']}:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def start_mlflow(
    backend: str, folder: Path, port: int | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on loopback, ready; artifacts proxied into ``folder``."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    cmd += ["--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = folder / f"mlflow-{port}.log"
    proc = start(cmd, log, {**(env or os.environ), **MLFLOW_SERVER_ENV})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}"


@contextmanager
def mlflow_server(
    backend: str, folder: Path, port: int | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``start_mlflow`` for the duration of the block; yields its URL."""
    proc, url = start_mlflow(backend, folder, port, env)
    try:
        yield url
    finally:
        stop(proc)


@contextmanager
def s3_server(folder: Path) -> Iterator[str]:
    """moto's standalone S3-compatible server on loopback; yields its endpoint URL."""
    port = free_port()
    log = folder / "moto.log"
    proc = start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
