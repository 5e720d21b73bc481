"""``quantmill``: one program over three layers.

The library's commands (``quantize``, ``eval``, ``outliers``, ``methods``)
come from ``quantmill.cli``, the pipeline's (``run``, ``sweep``, ``publish``,
``deploy``, ``evaluate``) from ``flows.cli``, and ``stack`` from ``stack.cli``.
This module composes them, sets up logging and process-wide settings, and
wires the one thing that crosses layers: ``stack up --deploy`` creates the
pipeline's deployments on the stack it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import flows.cli
import quantmill.cli
import stack.cli
from app.reaper import MARK as REAPER_MARK
from quantmill.errors import QuantmillError

# glibc raises its mmap threshold each time a large block is freed, after which
# activation-sized tensors come from the heap and fragment it: peak RSS of a
# GPTQ run then varied from 1.24 to 1.65 GB between settings. A fixed 1 MiB
# threshold keeps large tensors in their own mappings, returned on free
# (measured at w4g64 asym: 1623 → 1241 MB peak, 248 → 281 s).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantmill", description="Quantize language models, alone or as Prefect flows."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    quantmill.cli.add_commands(sub)
    flows.cli.add_commands(sub)
    stack.cli.add_commands(sub)
    return parser


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc, or
    where the environment decides: glibc's own ``MALLOC_MMAP_THRESHOLD_`` (kept as set)
    or ``QUANTMILL_MMAP_PIN=0`` (glibc's dynamic default, e.g. to compare allocators)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("QUANTMILL_MMAP_PIN") == "0":
        return False
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def setup_logging(command: str) -> None:
    if command in flows.cli.COMMANDS:
        # Prefect configures the terminal logging of flows; quantmill's INFO lines
        # (one per block and per window) go to the Prefect run logs.
        logging.getLogger("quantmill").setLevel(logging.INFO)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The terminal has progress bars; per-block lines are for the Prefect logs.
    logging.getLogger("quantmill.progress").setLevel(logging.WARNING)


def deploy_on(settings) -> None:
    """After ``stack up --deploy``: the pipeline's deployments on the new stack."""
    from flows.deploy import deploy_all
    from stack.credentials import load

    creds = load(settings.home.resolve())
    deploy_all(
        settings.pool,
        api_url=settings.prefect_api,
        crash_after_s=settings.crash_after_s,
        auth=creds.prefect_auth if creds else None,
    )


# The commands that may start servers (Prefect's temporary one, a local Dask cluster).
REAPED = ("run", "sweep", "publish")
_REAPER_PIPE: list[int] = []


def start_reaper() -> bool:
    """Mark this process's environment and start ``app/reaper.py``: whatever this
    command starts is stopped when it exits, even by ``kill -9``. False off Linux."""
    import subprocess
    import uuid

    if not os.path.isdir("/proc/self"):
        return False
    token = uuid.uuid4().hex
    os.environ[REAPER_MARK] = token
    read, write = os.pipe()  # not inheritable: this process holds the only write end
    script = Path(__file__).with_name("reaper.py")
    subprocess.Popen([sys.executable, "-I", str(script), token], stdin=read,
                     stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    os.close(read)
    _REAPER_PIPE.append(write)  # open until this process ends
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in REAPED:  # the program, not a caller in-process
        start_reaper()
    pin_mmap_threshold()  # an application setting: the program's, never the library's
    if getattr(args, "quiet", False):  # the libraries' bars too (tqdm reads it on import)
        os.environ["TQDM_DISABLE"] = "1"
    setup_logging(args.command)
    try:
        if args.command in flows.cli.COMMANDS:
            return flows.cli.run(args)
        if args.command == "stack":
            return stack.cli.run(args, after_up=deploy_on if args.__dict__.get("deploy") else None)
        return quantmill.cli.run(args)
    except QuantmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # what was being written is left as partial folders, never as finished output
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
