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


def main(capsys, *argv: str) -> tuple[int, str]:
    """``quantmill ARGV`` in this process: (exit code, stderr)."""
    import logging

    from app.main import main as program

    logging.root.handlers.clear()  # a handler an earlier call bound to an earlier stderr
    code = program(list(argv))
    return code, capsys.readouterr().err


def quantize_args(model, out, calib, evaluation, *extra: str, recipe="rtn-w4g64") -> list[str]:
    return [
        "quantize", "--model", str(model), "--recipe", recipe, "--out", str(out),
        "--calib-data", str(calib), "--eval-data", str(evaluation), "-q", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_bytes(bytes(range(256)) * 64), "is not UTF-8 text (byte 128 is 0x80)"),
        (lambda p: p.mkdir(), "is a folder: give a UTF-8 text file in it"),
    ],
    ids=["binary", "folder"],
)
def test_calibration_data_that_is_not_text_is_named(
    make, expected, capsys, tiny_checkpoint, text_files, tmp_path
):
    bad = tmp_path / "calib.bin"
    make(bad)
    out = tmp_path / "out"
    args = quantize_args(tiny_checkpoint(), out, bad, text_files[1], recipe="gptq-w4g64")
    code, err = main(capsys, *args)
    assert code == 2 and f"error: data file {bad} {expected}" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("model_type, limit", [("gpt2", 128), ("llama", 2048)])
def test_seq_len_beyond_the_models_positions_is_refused_before_work(
    model_type, limit, capsys, tiny_checkpoint, text_files, tmp_path
):
    folder = tiny_checkpoint(model_type)
    out = tmp_path / "out"
    too_long = str(limit * 2)
    code, err = main(
        capsys,
        *quantize_args(folder, out, *text_files, "--eval-seq-len", too_long, "--format", "fake"),
    )
    assert code == 2, err
    assert f"evaluation.seq_len = {too_long}: {model_type} has {limit} positions" in err
    assert not out.exists()
    code, err = main(capsys, "eval", "--model", str(folder), "--eval-data", str(text_files[1]),
                     "--eval-seq-len", too_long, "-q")  # fmt: skip
    assert code == 2 and f"evaluation.seq_len = {too_long}" in err, err
