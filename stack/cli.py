"""``quantmill stack up | down | status | env``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stack.services import DEFAULT_HOME, StackSettings


def add_stack_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="run the service stack as local processes (no Docker)")
    verbs = p.add_subparsers(dest="stack_command", required=True)
    u = verbs.add_parser("up", help="start S3, Prefect server, MLflow server and a worker")
    _home(u)
    u.add_argument(
        "--postgres",
        help="PostgreSQL server URL, e.g. postgresql://postgres@127.0.0.1:5432 "
        "(default: SQLite files under --home)",
    )
    u.add_argument("--db-prefix", default="quantmill", help="databases <prefix>_prefect/_mlflow")
    u.add_argument("--prefect-port", type=int, default=4200)
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.add_argument("--s3-port", type=int, default=9000)
    u.add_argument("--pool", default="quantmill", help="the process work pool")
    u.add_argument("--workers", type=int, default=1, help="worker processes on the pool")
    u.add_argument("--worker-limit", type=int, default=2, help="flow runs per worker at once")
    u.add_argument("--bucket", default="quantmill", help="S3 bucket for artifacts and cache")
    u.add_argument("--deploy", action="store_true", help="then create the deployments")
    d = verbs.add_parser("down", help="stop the stack")
    _home(d)
    s = verbs.add_parser("status", help="what runs and where")
    _home(s)
    s.add_argument("--json", action="store_true")
    e = verbs.add_parser("env", help="print the shell exports that point clients at the stack")
    _home(e)


def _home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, default=DEFAULT_HOME, help="state, logs and stores")


def run_stack_command(args: argparse.Namespace) -> int:
    import logging

    from stack import processes

    logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.stack_command == "up":
        settings = StackSettings(
            home=args.home,
            prefect_port=args.prefect_port,
            mlflow_port=args.mlflow_port,
            s3_port=args.s3_port,
            postgres=args.postgres,
            db_prefix=args.db_prefix,
            pool=args.pool,
            workers=args.workers,
            worker_limit=args.worker_limit,
            bucket=args.bucket,
        )
        try:
            processes.up(settings)
        except processes.StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.deploy:
            from flows.deploy import deploy_all

            deploy_all(settings.pool, api_url=settings.prefect_api)
        _print_status(args.home)
        print('\nPoint a shell at it:  eval "$(quantmill stack env)"')
        prefect_ui = f"http://{settings.host}:{settings.prefect_port}"
        print(f"Prefect UI: {prefect_ui}   MLflow UI: {settings.mlflow_url}")
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
    for key, value in state["env"].items():
        print(f"export {key}={value}")
    return 0


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
