"""The benchmarks' peak-memory launcher: a child's peak is its own, not its parent's."""

import os
import subprocess
import sys

from benchmarks.peak_rss import run_measured


def test_a_child_reports_its_parents_peak_unless_launched(tmp_path):
    held = bytearray(300 * 1024**2)
    for i in range(0, len(held), 4096):  # touch every page: 300 MB resident here
        held[i] = 1
    cmd = [sys.executable, "-c", "pass"]
    direct = subprocess.Popen(cmd)
    _, _, usage = os.wait4(direct.pid, 0)
    assert usage.ru_maxrss > 300 * 1024  # what the benchmarks measured before (KiB)
    out, run = run_measured(cmd, tmp_path / "log")
    assert run["returncode"] == 0 and run["peak_rss_kb"] < 100 * 1024
    del held
