"""``quantmill stack up | down | status | env``.

The options of ``up`` are the fields of ``StackSettings`` (their defaults are
shown from there, and only the options given reach it). The stack knows
nothing of the pipeline: ``up --deploy`` hands the started stack to the
``after_up`` callback the program (``app.main``) gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from quantmill import defaults
from stack.services import DEFAULT_HOME, StackSettings, StackSettingsError

SETTING = "stack."  # the prefix of the options that are StackSettings fields


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="run the service stack as local processes (no Docker)")
    verbs = p.add_subparsers(dest="stack_command", required=True)
    u = verbs.add_parser("up", help="start S3, Prefect server, MLflow server and a worker")
    _home(u)
    _setting(
        u,
        "postgres",
        "PostgreSQL server URL, e.g. postgresql://postgres@127.0.0.1:5432 "
        "(default: SQLite files under --home)",
    )
    _setting(u, "db_prefix", "databases <prefix>_prefect and <prefix>_mlflow")
    _setting(u, "prefect_port", "Prefect server port", type=int)
    _setting(u, "mlflow_port", "MLflow server port", type=int)
    _setting(u, "s3_port", "S3 server port", type=int)
    _setting(u, "pool", "the process work pool")
    _setting(u, "workers", "worker processes on the pool", type=int)
    _setting(u, "worker_limit", "flow runs per worker at once", type=int)
    _setting(
        u,
        "crash_after_s",
        f"a run is marked Crashed after this many seconds without a heartbeat "
        f"(they come every {defaults.HEARTBEAT_S} s; --deploy)",
        type=int,
    )
    _setting(u, "bucket", "S3 bucket for artifacts and cache")
    _setting(
        u,
        "output_root",
        "runs started from the UI or the API write under this folder only",
        type=Path,
    )
    u.add_argument(
        "--data-root",
        dest=SETTING + "data_roots",
        action="append",
        type=Path,
        default=argparse.SUPPRESS,
        help="a folder whose files runs started from the UI or the API may read (repeat for "
        "more; default: $QUANTMILL_DATA_DIR and ./data on the workers)",
    )
    u.add_argument("--deploy", action="store_true", help="then create the deployments")
    d = verbs.add_parser("down", help="stop the stack")
    _home(d)
    s = verbs.add_parser("status", help="what runs and where")
    _home(s)
    s.add_argument("--json", action="store_true")
    e = verbs.add_parser("env", help="print the shell exports that point clients at the stack")
    _home(e)
    e.add_argument(
        "--logins", action="store_true", help="print the UIs' logins instead (for a person)"
    )


def _home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help="state, logs and stores")


def _setting(p: argparse.ArgumentParser, name: str, text: str, **kwargs) -> None:
    """``--name`` for the ``StackSettings`` field ``name``, its default shown from there."""
    default = {f.name: f.default for f in dataclasses.fields(StackSettings)}[name]
    shown = f" (default: {default})" if default is not None else ""
    p.add_argument(
        "--" + name.replace("_", "-"),
        dest=SETTING + name,
        default=argparse.SUPPRESS,
        help=text + shown,
        **kwargs,
    )


def run(args: argparse.Namespace, after_up: Callable[[StackSettings], None] | None = None) -> int:
    """Run a ``stack`` verb; ``after_up`` runs on the settings of a stack just started."""
    import logging

    from stack import processes

    logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.stack_command == "up":
        given = {k.removeprefix(SETTING): v for k, v in vars(args).items() if k.startswith(SETTING)}
        if "data_roots" in given:
            given["data_roots"] = tuple(given["data_roots"])
        settings = StackSettings(home=args.home, **given)
        try:
            settings.check()
            processes.up(settings)
        except (processes.StackError, StackSettingsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if after_up is not None:
            after_up(settings)
        _print_status(args.home)
        home = args.home.resolve()
        print('\nPoint a shell at it:  eval "$(quantmill stack env)"')
        prefect_ui = f"http://{settings.host}:{settings.prefect_port}"
        print(f"Prefect UI: {prefect_ui}   MLflow UI: {settings.mlflow_url}")
        print(
            f"Both ask for credentials: `quantmill stack env --logins` prints them (they are "
            f"kept in {home / 'credentials.json'}, readable by you alone)."
        )
        return 0
    if args.stack_command == "down":
        stopped = processes.down(args.home)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.stack_command == "status":
        rows = processes.status(args.home)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_status(args.home, rows)
        return 0 if rows else 1
    state = processes.read_state(args.home.resolve())
    if not state:
        print("error: no stack runs from this --home; `quantmill stack up` first", file=sys.stderr)
        return 1
    if args.logins:
        _print_logins(args.home.resolve(), state)
        return 0
    for key, value in state["env"].items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _print_logins(home: Path, state: dict) -> None:
    from stack.credentials import MLFLOW_ADMIN, load

    creds = load(home)
    if creds is None:
        print(f"no credentials in {home}", file=sys.stderr)
        return
    env = state["env"]
    prefect_ui = env["PREFECT_API_URL"].removesuffix("/api")
    print(f"Prefect UI  {prefect_ui}  password (the whole string): {creds.prefect_auth}")
    print(f"MLflow UI   {env['MLFLOW_TRACKING_URI']}  user: {MLFLOW_ADMIN}  "
          f"password: {creds.mlflow_admin_password}")  # fmt: skip


def _print_status(home: Path, rows: list[dict] | None = None) -> None:
    from stack import processes

    rows = processes.status(home) if rows is None else rows
    if not rows:
        print(f"no stack runs from {home.resolve()}")
        return
    print(f"{'service':<16} {'pid':>7}  {'state':<9} url")
    for row in rows:
        if row["service"] == "pool":
            print(f"{'work pool':<16} {'':>7}  {'':<9} {row['url']}")
            continue
        state = "ready" if row["ready"] else ("running" if row["running"] else "stopped")
        if row["ready"] is None and row["running"]:
            state = "running"
        print(f"{row['service']:<16} {row['pid']:>7}  {state:<9} {row['url']}")
