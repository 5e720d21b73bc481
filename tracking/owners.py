"""Who owns a RUNNING run: the host, pid and start time of the process that opened it.

A run whose process was killed (``kill -9``, the machine's OOM killer, a power cut)
stays RUNNING in MLflow for ever. Each run carries its owner; a later run on the
same host, or ``quantmill runs clean``, ends the runs whose owner is gone as FAILED
with the reason. A pid the system reused for another process is told apart by the
process's start time. Runs owned on another host are left alone: that host decides.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str  # the process's start time in clock ticks since boot ("" where unknown)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.started}"

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])


def current() -> Owner:
    """This process."""
    return Owner(socket.gethostname(), os.getpid(), start_ticks(os.getpid()))


def is_gone(owner: Owner) -> bool:
    """True when ``owner`` ran on this host and that process no longer exists."""
    if owner.host != socket.gethostname():
        return False  # another machine's process: not ours to judge
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    # the pid exists: the same process, or a later one that was given its number
    return bool(owner.started) and start_ticks(owner.pid) not in ("", owner.started)


def start_ticks(pid: int) -> str:
    """Field 22 of ``/proc/PID/stat`` (start time since boot), "" where unreadable."""
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read().decode(errors="replace")
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else ""
