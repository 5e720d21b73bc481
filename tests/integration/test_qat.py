"""Quantization-aware training on the real SmolLM2-135M through ``quantize``: a short
run of each method, and a run killed part-way, resumed, and compared with one that
ran straight through (with a diverging learning rate in between)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from quantmill.api import TRAINING_FILE, quantize
from quantmill.recipe import parse_recipe
from quantmill.sources import cache_root

pytestmark = pytest.mark.slow

G3 = {"bits": 3, "group_size": 64}


def recipe_dict(wiki_files, method_steps, **training):
    settings = {"steps": 6, "lr": 1e-3, "seq_len": 64, "eval_samples": 2, **training}
    return {
        "steps": [
            {
                **step,
                "ignore": ["lm_head"],
                **({"training": settings} if i == len(method_steps) - 1 else {}),
            }
            for i, step in enumerate(method_steps)
        ],
        "calibration": {"dataset": str(wiki_files[0]), "num_samples": 8, "seq_len": 128},
        "evaluation": {"dataset": str(wiki_files[1]), "seq_len": 256, "max_windows": 1},
    }


def run(wiki_files, tmp_path, steps, **training):
    out = tmp_path / "out"
    summary = quantize(
        "smollm2-135m", parse_recipe(recipe_dict(wiki_files, steps, **training)), out,
        progress=False,
    )  # fmt: skip
    assert not out.with_name("out.training").exists()  # checkpoints go once the export is done
    (trained,) = json.loads((out / TRAINING_FILE).read_text())
    return summary, out, trained


def tensor_names(folder: Path) -> list[str]:
    names = []
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names += list(f.keys())
    return names


def test_peqa_trains_the_scales_of_an_rtn_start_on_the_real_model(wiki_files, tmp_path):
    summary, out, trained = run(
        wiki_files, tmp_path, [{"method": "rtn", "weights": G3}, {"method": "peqa"}]
    )
    assert trained["method"] == "peqa" and len(trained["history"]) == 6
    assert trained["tokens_seen"] == 6 * 64
    assert trained["eval_loss_after"] < trained["eval_loss_before"]
    assert summary.quantized["perplexity"] < 1e3
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 3 and group["weights"]["group_size"] == 64


def test_l4q_exports_a_packed_checkpoint_without_adapters(wiki_files, tmp_path):
    summary, out, trained = run(wiki_files, tmp_path, [{"method": "l4q", "weights": G3, "rank": 4}])
    assert trained["eval_loss_after"] < trained["eval_loss_before"]
    names = tensor_names(out)
    assert any(n.endswith("weight_packed") for n in names)
    assert not any("lora" in n or "parametrizations" in n for n in names)
    assert summary.quantized["perplexity"] < 1e3


def test_llm_qat_runs_w4a8kv8_on_generated_text_and_is_evaluated_as_trained(wiki_files, tmp_path):
    steps = [{"method": "llm_qat", "generated_samples": 4, "kv_cache": {"bits": 8}}]
    summary, out, trained = run(wiki_files, tmp_path, steps, lr=2e-5)
    assert summary.quantized["kv_cache"] == "kv8t"  # evaluated the way it was trained
    assert summary.quantized["runtime_layers"] == {"CompressedTensorsLinear": 210}
    assert len(trained["history"]) == 6 and trained["eval_loss_before"] > 0
    generated = [p for p in (cache_root() / "generated").iterdir() if p.is_dir()]
    assert generated, "the generated training text is in the cache"


def cli(recipe: Path, out: Path, log: Path, model: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app", "quantize", "--model", str(model),
           "--recipe", str(recipe), "--out", str(out), "--no-eval", "-q"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_a_killed_run_resumes_to_the_same_steps_and_loss(wiki_files, tmp_path, short_smollm2):
    # resuming is a property of the training loop, not of the depth: the real weights cut
    # to 4 blocks; 24 steps, killed once step 8 is saved, leave the run far from its end
    steps = [{"method": "rtn", "weights": G3}, {"method": "peqa"}]
    recipe = tmp_path / "peqa.yaml"
    settings = {"steps": 24, "seq_len": 32, "checkpoint_every": 4, "schedule": "constant"}
    recipe.write_text(yaml.safe_dump(recipe_dict(wiki_files, steps, **settings)))

    straight = tmp_path / "straight"
    assert cli(recipe, straight, tmp_path / "straight.log", short_smollm2).wait(900) == 0

    out = tmp_path / "killed"
    proc = cli(recipe, out, tmp_path / "killed.log", short_smollm2)
    deadline = time.monotonic() + 900
    while not list(out.parent.glob("killed.training/*/step-000008.pt")):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()  # nothing half-written

    # a learning rate that drives the loss to NaN: a clear error, the good checkpoint kept
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe_dict(wiki_files, steps, **{**settings, "lr": 1e4})))
    log = tmp_path / "bad.log"
    assert cli(bad, out, log, short_smollm2).wait(timeout=900) != 0
    message = log.read_text()
    assert "lower training.lr" in message and "step 8" in message, message
    assert list(out.parent.glob("killed.training/*/step-000008.pt"))
    assert not out.exists()

    assert cli(recipe, out, tmp_path / "resumed.log", short_smollm2).wait(timeout=900) == 0
    (first,) = json.loads((straight / TRAINING_FILE).read_text())
    (second,) = json.loads((out / TRAINING_FILE).read_text())
    assert second["resumed_from"] == 8 and first["resumed_from"] == 0
    assert [h["step"] for h in second["history"]] == list(range(1, 25))
    assert second["history"][-1]["loss"] == pytest.approx(first["history"][-1]["loss"], rel=1e-3)
    assert second["eval_loss_after"] == pytest.approx(first["eval_loss_after"], rel=1e-3)
