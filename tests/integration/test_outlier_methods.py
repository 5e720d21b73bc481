"""The outlier-aware methods on the real SmolLM2-135M, end to end through ``quantize``:
small calibration and evaluation sets, so every one runs in CI."""

import json

import pytest
import torch

from quantmill.api import quantize
from quantmill.folder import RUNTIME_FILE
from quantmill.recipe import parse_recipe
from tests.conftest import SHORT_BLOCKS

pytestmark = pytest.mark.slow


def recipe(wiki_files, steps, **evaluation):
    return parse_recipe(
        {
            "steps": [{**step, "ignore": ["lm_head"]} for step in steps],
            "calibration": {"dataset": str(wiki_files[0]), "num_samples": 8, "seq_len": 256},
            "evaluation": {
                "dataset": str(wiki_files[1]),
                "seq_len": 512,
                "max_windows": 2,
                **evaluation,
            },
        }
    )


@pytest.fixture(scope="module")
def run(smollm2_path, wiki_files, tmp_path_factory):
    """Quantize the real model once per recipe; later tests reuse the result."""
    done = {}

    def go(name, steps, model="smollm2-135m", **evaluation):
        if name not in done:
            out = tmp_path_factory.mktemp("outl") / name
            summary = quantize(
                str(model), recipe(wiki_files, steps, **evaluation), out, progress=False
            )
            done[name] = (summary, out)
        return done[name]

    return go


W8 = {"bits": 8, "group_size": None}


def test_smoothquant_w8a8_runs_with_integer_kernels_and_stays_close(run):
    steps = [{"method": "smoothquant", "alpha_grid": [0.5, 0.7, 0.9]}]
    summary, out = run("smoothquant", steps)
    original, quantized = summary.original["perplexity"], summary.quantized["perplexity"]
    assert summary.quantized["runtime_layers"] == {"CompressedTensorsLinear": 210}
    assert quantized < 1.05 * original
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["input_activations"]["strategy"] == "token"
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    alphas = {r["extra"]["alpha"] for r in summary.layers if "alpha" in r["extra"]}
    assert alphas <= {0.5, 0.7, 0.9} and alphas


def test_smoothquant_beats_naive_w8a8_on_the_real_model(run):
    naive, _ = run("naive", [{"method": "rtn", "weights": W8, "activations": {"bits": 8}}])
    smooth, _ = run("smoothquant", [{"method": "smoothquant", "alpha_grid": [0.5, 0.7, 0.9]}])
    assert smooth.quantized["perplexity"] < naive.quantized["perplexity"]


def test_llm_int8_is_within_one_percent_on_two_short_windows_and_reports_outliers(run):
    summary, out = run("llm_int8", [{"method": "llm_int8"}])
    assert summary.quantized["perplexity"] < 1.01 * summary.original["perplexity"]
    assert summary.quantized["runtime_layers"] == {"MixedInt8Linear": 210}
    assert 0 < summary.quantized["outlier_column_fraction"] < 0.5
    fractions = [r["extra"]["outlier_fraction"] for r in summary.layers]
    assert len(fractions) == 210 and max(fractions) > 0.01
    runtime = json.loads((out / RUNTIME_FILE).read_text())["layers"]
    assert set(map(json.dumps, runtime.values())) == {json.dumps({"outlier_threshold": 6.0})}


def test_awq_beats_rtn_at_three_bits(run):
    w3 = {"bits": 3, "group_size": 64}
    rtn, _ = run("rtn-w3", [{"method": "rtn", "weights": w3}])
    awq, _ = run("awq-w3", [{"method": "awq", "weights": w3, "grid": 5, "clip_grid": 5}])
    assert awq.quantized["perplexity"] < 0.8 * rtn.quantized["perplexity"]
    assert awq.bits_per_weight == rtn.bits_per_weight  # same packed format


def test_zeroquant_distillation_lowers_block_losses(run, short_smollm2):
    # block-wise distillation is a property of each block: the real weights cut to 4 blocks
    step = {"method": "zeroquant", "weights": {"bits": 4, "group_size": 64}, "lkd_steps": 8}
    summary, _ = run("zeroquant", [step], model=short_smollm2)
    blocks = [r for r in summary.layers if r["method"] == "zeroquant-lkd"]
    assert len(blocks) == SHORT_BLOCKS
    assert all(r["loss"] <= r["extra"]["initial_loss"] for r in blocks)
    assert sum(r["extra"]["kept"] == "distilled" for r in blocks) >= SHORT_BLOCKS - 1
    assert summary.quantized["runtime_layers"] == {"CompressedTensorsLinear": SHORT_BLOCKS * 7}


def test_kv_cache_int8_costs_little_and_int4_more(run):
    steps = [{"method": "rtn", "weights": W8}]
    plain, _ = run("w8", steps)
    kv8, _ = run("w8-kv8", steps, kv_cache={"bits": 8})
    kv4, _ = run("w8-kv4", steps, kv_cache={"bits": 4})
    base = plain.quantized["perplexity"]
    assert abs(kv8.quantized["perplexity"] / base - 1) < 0.01
    assert kv4.quantized["perplexity"] > kv8.quantized["perplexity"]
    assert torch.isfinite(torch.tensor(kv4.quantized["perplexity"]))
