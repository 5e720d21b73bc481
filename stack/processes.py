"""Start, stop and list the stack's processes. Each runs in its own process
group with its log in ``<home>/logs/``; ``<home>/state.json`` records what runs
where, so ``stack down`` and ``stack status`` work from another shell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stack import credentials
from stack.credentials import MLFLOW_ADMIN, MLFLOW_WORKER, Credentials
from stack.services import (
    MLFLOW_AUTH_FILE,
    Service,
    StackSettings,
    client_env,
    mlflow_auth_ini,
    services,
)

STATE = "state.json"


class StackError(RuntimeError):
    """The stack cannot start, or a service did not come up; the message says which."""


def up(settings: StackSettings, timeout: float = 180) -> dict[str, Any]:
    """Start the servers (S3, Prefect, MLflow) at once, wait until each answers, then the
    workers at once (they need the Prefect server and the pool) and wait for them."""
    home = settings.home.resolve()
    if running(home):
        raise StackError(f"a stack already runs from {home}; `quantmill stack down` first")
    creds = credentials.load_or_create(home)  # the home is made private (0700) here
    credentials.private_dir(home / "logs")
    if settings.postgres:
        ensure_databases(settings, creds)
    credentials.write_private(home / MLFLOW_AUTH_FILE, mlflow_auth_ini(settings, creds))
    state: dict[str, Any] = {
        "settings": {k: str(v) for k, v in asdict(settings).items()},
        "env": client_env(settings, creds),
        "services": {},
    }
    every = services(settings, creds)
    servers = [s for s in every if not s.name.startswith("worker")]
    workers = [s for s in every if s.name.startswith("worker")]
    try:
        for wave in (servers, workers):
            if wave is workers:
                ensure_bucket(settings, creds)
                ensure_worker_user(settings, creds)
                ensure_pool(settings, creds)
                state["pool"] = settings.pool
            for service in wave:
                state["services"][service.name] = start(service, home)
            _write(home, state)
            for service in wave:
                wait_ready(service, state["services"][service.name], settings, creds, timeout)
    except BaseException:
        down(home)
        raise
    return state


def start(service: Service, home: Path) -> dict[str, Any]:
    log = home / "logs" / f"{service.name}.log"
    env = {**os.environ, **service.env}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            service.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return {
        "pid": proc.pid,
        "url": service.url,
        "health": service.health,
        "log": str(log),
        "cmd": service.cmd,
        "env": service.env,
    }


def restart(home: Path, name: str) -> int:
    """Start service ``name`` again with its recorded command (after a crash); its pid."""
    home = Path(home).resolve()
    state = read_state(home)
    info = state["services"][name]
    if alive(info["pid"]):
        raise StackError(f"{name} still runs (pid {info['pid']})")
    service = Service(name, info["cmd"], info["url"], info["health"], info["env"])
    state["services"][name] = start(service, home)
    _write(home, state)
    return state["services"][name]["pid"]


def wait_ready(
    service: Service, info: dict[str, Any], s: StackSettings, c: Credentials, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(info["pid"]):
            raise StackError(f"{service.name} exited at start; its log:\n{_tail(info['log'])}")
        if healthy(service.name, info, s, c):
            return
        time.sleep(0.5)
    raise StackError(f"{service.name} not ready after {timeout:.0f} s; log:\n{_tail(info['log'])}")


def healthy(name: str, info: dict[str, Any], s: StackSettings, c: Credentials) -> bool:
    if info.get("health"):
        return _http_ok(info["health"])
    return name in online_workers(s, c)


def online_workers(s: StackSettings, c: Credentials) -> set[str]:
    """Names (``worker``, ``worker-2``, …) of the pool's workers that the server sees online."""
    try:
        with prefect_client(s.prefect_api, c.prefect_auth) as client:
            workers = client.read_workers_for_work_pool(s.pool)
    except Exception:
        return set()
    prefix = f"{s.pool}-"
    return {
        w.name[len(prefix) :]
        for w in workers
        if str(getattr(w.status, "value", w.status)) == "ONLINE" and w.name.startswith(prefix)
    }


def down(home: Path, grace: float = 20) -> list[str]:
    """Stop every recorded service and forget the state: the workers first, all at once,
    then the servers, all at once; each group has ``grace`` seconds before SIGKILL."""
    home = Path(home).resolve()
    state = read_state(home)
    services = list(state.get("services", {}).items())
    workers = [(n, i) for n, i in services if n.startswith("worker")]
    servers = [(n, i) for n, i in services if not n.startswith("worker")]
    stopped = []
    for group in (workers, servers):
        running = [(name, info["pid"]) for name, info in group if alive(info["pid"])]
        for _, pid in running:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(alive(pid) for _, pid in running) and time.monotonic() < deadline:
            time.sleep(0.2)
        for _, pid in running:
            if alive(pid):
                _signal(pid, signal.SIGKILL)
        stopped += [name for name, _ in reversed(running)]
    (home / STATE).unlink(missing_ok=True)
    return stopped


def status(home: Path) -> list[dict[str, Any]]:
    state = read_state(Path(home).resolve())
    settings = state.get("settings", {})
    rows = []
    for name, info in state.get("services", {}).items():
        up_ = alive(info["pid"])
        ready = up_ and (_http_ok(info["health"]) if info.get("health") else None)
        rows.append(
            {
                "service": name,
                "pid": info["pid"],
                "running": up_,
                "ready": ready,
                "url": info["url"],
                "log": info["log"],
            }
        )
    if settings:
        rows.append(
            {
                "service": "pool",
                "pid": None,
                "running": None,
                "ready": None,
                "url": settings.get("pool"),
                "log": "",
            }
        )
    return rows


def running(home: Path) -> bool:
    state = read_state(home)
    return any(alive(i["pid"]) for i in state.get("services", {}).values())


def read_state(home: Path) -> dict[str, Any]:
    path = Path(home) / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


DATABASES = {"prefect": "prefect", "mlflow": "mlflow", "mlflow_auth": "mlflow"}  # -> service


def ensure_databases(s: StackSettings, c: Credentials) -> None:
    """On the PostgreSQL server of ``--postgres`` (an administrator's URL): a role per
    service (``<prefix>_prefect``, ``<prefix>_mlflow``) with its own password, and its
    databases (``<prefix>_prefect``; ``<prefix>_mlflow`` and ``<prefix>_mlflow_auth``)
    owned by it, which no other role may connect to."""
    try:
        import psycopg2
        from psycopg2 import sql
    except ImportError as exc:
        raise StackError("--postgres needs psycopg2: pip install psycopg2-binary") from exc
    url = s.postgres.split("://", 1)[1]  # type: ignore[union-attr]
    try:
        conn = psycopg2.connect(f"postgresql://{url.rstrip('/')}/postgres")
    except psycopg2.Error as exc:
        raise StackError(f"--postgres {s.postgres}: cannot connect: {exc}".strip()) from exc
    conn.autocommit = True
    with conn.cursor() as cur:
        for service in sorted(set(DATABASES.values())):
            role, password = s.role(service), c.pg_password(service)
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                (password,),
            )
        for name, service in DATABASES.items():
            db, role = sql.Identifier(f"{s.db_prefix}_{name}"), sql.Identifier(s.role(service))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"{s.db_prefix}_{name}",))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(db, role))
            cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, role))
            cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(db))
    conn.close()


def ensure_bucket(s: StackSettings, c: Credentials) -> None:
    """The S3 server made the bucket; the workers' key reaches it (and only it)."""
    import boto3
    import botocore.exceptions

    client = boto3.client(
        "s3",
        endpoint_url=s.s3_url,
        aws_access_key_id=c.s3_key,
        aws_secret_access_key=c.s3_secret,
        region_name="us-east-1",
    )
    try:
        client.head_bucket(Bucket=s.bucket)
    except botocore.exceptions.ClientError as exc:
        raise StackError(f"the S3 server refused the workers' key on {s.bucket}: {exc}") from None


def ensure_worker_user(s: StackSettings, c: Credentials) -> None:
    """MLflow's worker user (no admin rights), made by the admin; kept if it exists."""
    import base64
    import urllib.error

    body = json.dumps({"username": MLFLOW_WORKER, "password": c.mlflow_worker_password})
    basic = base64.b64encode(f"{MLFLOW_ADMIN}:{c.mlflow_admin_password}".encode()).decode()
    request = urllib.request.Request(
        f"{s.mlflow_url}/api/2.0/mlflow/users/create",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {basic}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        if "RESOURCE_ALREADY_EXISTS" in text or "already exists" in text:
            return
        raise StackError(
            f"MLflow refused to create its worker user: {exc.code} {text[:300]}"
        ) from None


def ensure_pool(s: StackSettings, c: Credentials) -> None:
    """The process work pool; its concurrency limit is the workers' total."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    limit = s.worker_limit * s.workers
    with prefect_client(s.prefect_api, c.prefect_auth) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=s.pool, type="process", concurrency_limit=limit)
            )
        except ObjectAlreadyExists:
            client.update_work_pool(s.pool, WorkPoolUpdate(concurrency_limit=limit))


@contextmanager
def prefect_client(api_url: str, auth: str | None) -> Iterator[Any]:
    """A sync Prefect client on ``api_url`` with the auth string ``auth``, whatever this
    process was configured with."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}):
        with get_client(sync_client=True) as client:
            yield client


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _write(home: Path, state: dict[str, Any]) -> None:
    """The state file holds the services' environments (credentials): owner-only."""
    credentials.write_private(home / STATE, json.dumps(state, indent=2) + "\n")
