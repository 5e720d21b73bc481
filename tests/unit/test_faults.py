"""Faults around the work, each a clear message and exit code, no traceback: servers
the environment names that do not answer, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.reach import ServiceUnreachableError, check_services
from tests.support.servers import free_port


def app(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "app", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_check_services_names_the_variable_of_a_dead_server_and_the_fix():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnreachableError) as caught:
        check_services({"MLFLOW_TRACKING_URI": dead, "PREFECT_API_URL": "sqlite:///x"})
    message = str(caught.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={dead}: no MLflow tracking server")
    assert "unset MLFLOW_TRACKING_URI" in message
    check_services({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})  # not a server: no check


@pytest.mark.parametrize("variable", ["PREFECT_API_URL", "MLFLOW_TRACKING_URI"])
def test_run_against_a_dead_server_fails_in_seconds_naming_the_variable(
    variable, tiny_checkpoint, text_files, tmp_path
):
    calib, evaluation = text_files
    dead = f"http://127.0.0.1:{free_port()}" + ("/api" if variable == "PREFECT_API_URL" else "")
    env = {**os.environ, variable: dead, "QUANTMILL_CACHE": str(tmp_path / "cache")}
    start = time.monotonic()
    done = app(
        "run", "--model", str(tiny_checkpoint()), "--recipe", "rtn-w4g64",
        "--calib-data", str(calib), "--eval-data", str(evaluation), "--out", str(tmp_path / "out"),
        env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {variable}={dead}: no " in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 60  # no minutes of retries
    assert not (tmp_path / "out").exists()  # nothing started


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    # the command blocks where real work would run; SIGINT arrives as from the terminal
    code = (
        "import time, quantmill.cli as c\n"
        "def busy(args):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
        "c.run = busy\n"
        "from app.main import main\n"
        "raise SystemExit(main(['methods']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == "interrupted"
