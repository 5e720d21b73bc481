"""Run a command and write its own peak resident memory, measured from a small parent.

Why a launcher: Linux's ``ru_maxrss`` of a child includes the high-water mark of the
memory it started from. Python starts children with ``vfork``, so a child of a
benchmark process that has loaded models reports at least that process's peak
(measured here: a child running ``python -c pass`` from a parent holding 2 GB
reports 2061 MB; from a small one, 13 MB). This launcher is small, so the command it
starts reports its own peak. Standard library only.

    python benchmarks/peak_rss.py RESULT.json command args...

The command's standard streams are the launcher's; RESULT.json gets
``{"returncode": int, "peak_rss_kb": int, "wall_seconds": float}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_measured(
    cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[str, dict]:
    """``cmd`` through this launcher: its standard output (stderr goes to ``log``) and
    ``{"returncode", "peak_rss_kb", "wall_seconds"}``."""
    fd, result = tempfile.mkstemp(suffix=".json", prefix="peak-rss-")
    os.close(fd)
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, __file__, result, *cmd], stdout=subprocess.PIPE,
                stderr=err, text=True, cwd=cwd, env=env,
            )  # fmt: skip
            out = proc.stdout.read() if proc.stdout else ""
            proc.wait()
        with open(result) as f:
            return out, json.load(f)
    finally:
        os.unlink(result)


def main() -> int:
    result, cmd = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as out:
        json.dump({"returncode": code, "peak_rss_kb": usage.ru_maxrss,
                   "wall_seconds": time.perf_counter() - start}, out)  # fmt: skip
    return code


if __name__ == "__main__":
    raise SystemExit(main())
