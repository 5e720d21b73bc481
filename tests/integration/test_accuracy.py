"""Zero-shot accuracy of the real model through the real harness, from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR

pytestmark = pytest.mark.slow
ZERO_SHOT = DATA_DIR / "zero-shot"
LIMIT = 20


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, env=env, timeout=900
    )


def test_cli_quantize_and_eval_report_the_same_task_figures(tmp_path, wiki_files, smollm2_path):
    # the converted preset's folder: a fresh cache (so nothing of the task results is
    # cached yet) would otherwise convert the GGUF file again
    env = {**os.environ, "QUANTMILL_CACHE": str(tmp_path / "cache"), "QUANTMILL_TASK_DATA": ""}
    data = ["--eval-data", str(wiki_files[1]), "--eval-windows", "1", "--eval-seq-len", "256"]
    tasks = ["--tasks", "arc_easy", "--limit", str(LIMIT), "--task-data", str(ZERO_SHOT)]
    out = tmp_path / "rtn"
    done = cli(
        "quantize", "--model", str(smollm2_path), "--recipe", "rtn-w4g64", "--out", str(out),
        "--json", "-q", *data, *tasks, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    original = summary["original"]["tasks"]["arc_easy"]
    quantized = summary["quantized"]["tasks"]["arc_easy"]
    assert original["documents"] == quantized["documents"] == LIMIT
    assert not original["cached"]
    for task in (original, quantized):
        assert set(task["metrics"]) == {"acc", "acc_norm"} and task["stderr"]["acc"] > 0
    # SmolLM2-135M answers ARC-Easy well above chance (0.25), even on 24 questions
    assert original["metrics"]["acc"] > 0.4
    row = summary["accuracy"]["tasks"]["arc_easy"]
    assert row["recovery"] == pytest.approx(
        quantized["metrics"]["acc"] / original["metrics"]["acc"]
    )
    assert (out / "lm_eval_results.json").is_file()

    # the original again: served from the cache, the same figures
    again = cli(
        "eval", "--model", str(smollm2_path), "--original", "--json", "-q", *data, *tasks, env=env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    cached = json.loads(again.stdout)["tasks"]["arc_easy"]
    assert cached["cached"] and cached["metrics"] == original["metrics"]
    assert "harness" not in json.loads(again.stdout)

    # the checkpoint, loaded by transformers in a new process: what quantize reported
    loaded = cli("eval", "--model", str(out), "--json", "-q", *data, *tasks, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    evaluated = json.loads(loaded.stdout)
    assert evaluated["tasks"]["arc_easy"]["metrics"] == quantized["metrics"]
    assert evaluated["perplexity"] == pytest.approx(summary["quantized"]["perplexity"], rel=1e-5)
    assert evaluated["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])


def test_without_local_copies_an_offline_hub_task_fails_naming_the_fix(tmp_path):
    # the shipped names fall back to the harness's own tasks, whose data is on the Hub
    code = (
        "from tests.conftest import tiny_config, tiny_tokenizer\n"
        "from transformers import AutoModelForCausalLM\n"
        "from quantmill.accuracy.harness import evaluate_tasks\n"
        "from quantmill.accuracy.tasks import resolve_tasks\n"
        "from quantmill.errors import ConfigError\n"
        "model = AutoModelForCausalLM.from_config(tiny_config('llama')).eval()\n"
        "refs = resolve_tasks(['piqa'])\n"
        "assert refs[0].source == 'hub'\n"
        "try:\n"
        "    evaluate_tasks(lambda: (model, tiny_tokenizer()), refs, 2, 4, False)\n"
        "except ConfigError as exc:\n"
        "    print('ERR', exc)\n"
    )
    env = {
        **os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "ds"), "HF_HUB_CACHE": str(tmp_path / "hub"),
        "QUANTMILL_TASK_DATA": "",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
        cwd=str(Path(__file__).resolve().parents[2]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERR task piqa: lm-evaluation-harness could not load its Hub dataset" in done.stdout
    assert "--task-data" in done.stdout and "baber/piqa" in done.stdout
