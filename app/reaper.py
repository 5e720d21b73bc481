"""The reaper of one command: it waits for the command to end, then stops what the
command started and left running (Prefect's temporary server, a local Dask cluster).

``app.main`` starts it for the commands that start servers: the command marks its
environment (``QUANTMILL_COMMAND=<id>``, inherited by everything it starts) and
keeps the only write end of a pipe that is this process's stdin. When the command
exits, normally or by ``kill -9``, the pipe reads end-of-file; every process still
carrying the mark gets SIGTERM, and SIGKILL 5 s later. Standard library only; Linux
(``/proc``); elsewhere it is not started.

    python -I app/reaper.py ID   (stdin: the pipe)
"""

import os
import signal
import sys
import time

MARK = "QUANTMILL_COMMAND"
GRACE_S = 5.0


def marked(token: str) -> list[int]:
    """The processes (other than this one) whose environment carries the mark."""
    entry = f"{MARK}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if entry in fh.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def reap(token: str) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        pids = marked(token)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = marked(token)
        if not pids:
            return


def main() -> int:
    token = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle
    while os.read(0, 4096):  # end-of-file: the command has exited
        pass
    reap(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
