"""Kill -9 a real-model quantization part-way and run it again: it resumes at the first
unfinished block and writes the same bytes as a run that was never interrupted.

The real SmolLM2 weights with only their first 4 blocks keep this under a minute;
the full 30-block figure is in benchmarks/engine.py (``--only resume``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantmill.folder import weight_files
from tests.conftest import SHORT_BLOCKS as BLOCKS

pytestmark = pytest.mark.slow

KILL_AFTER = 2


def command(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "app", "quantize", "--model", str(model),
        "--recipe", "gptq-w4g64", "--out", str(out), "--calib-data", str(calib),
        "--calib-samples", "8", "--no-eval", "--json", "-q", *extra,
    ]  # fmt: skip


def run_killed(cmd: list[str], journal: Path, blocks: int, cwd: Path) -> int:
    """Run ``cmd`` and SIGKILL it once its journal records ``blocks`` finished blocks."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    done = 0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                done = json.loads(journal.read_text())["state"].get("blocks_done", 0)
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= blocks:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    return done


def test_sigkill_then_rerun_resumes_and_writes_the_same_bytes(short_smollm2, wiki_files, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    calib = wiki_files[0]
    whole = tmp_path / "whole"
    subprocess.run(command(short_smollm2, whole, calib), cwd=repo, check=True, timeout=600,
                   capture_output=True)  # fmt: skip

    out = tmp_path / "out"
    journal = tmp_path / ".out.journal" / "journal.json"
    done = run_killed(command(short_smollm2, out, calib), journal, KILL_AFTER, repo)
    assert KILL_AFTER <= done < BLOCKS
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()

    again = subprocess.run(command(short_smollm2, out, calib), cwd=repo, timeout=600,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"resuming at block {done + 1}/{BLOCKS}" in again.stderr
    assert "it/s" not in again.stderr and "%|" not in again.stderr  # -q: no library's bars
    summary = json.loads(again.stdout)
    assert summary["engine"]["resumed_at_block"] == done + 1
    names = [f.name for f in weight_files(whole)] + ["config.json"]
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    # nothing of either run is left beside the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]
