"""GPTQ on a mixture-of-experts model: every expert calibrated on every token vs
each expert on the tokens routed to it.

The model is a random-weight Qwen3-MoE shape (8 blocks, hidden 1024, 16 experts of
384, top-2; SmolLM2's tokenizer and vocabulary), written as sharded bfloat16
safetensors under the names the Hub uses. Its routers are made unbalanced as
trained ones are (each expert's router row scaled by a factor from 0.2 to 2.0), so
that routed-only calibration leaves some experts with few tokens. Its perplexity
means nothing; what is measured is what calibration gives each expert:

- tokens routed to and calibrated on, per expert (the runs' ``quantmill_layers.json``);
- each block's output error against the float block on held-out tokens (WikiText-2
  test): both blocks get the float model's inputs to that block, error is
  ``|quantized - float|² / |float|²`` over the held-out tokens;
- wall time and peak RSS of each ``quantmill quantize`` process (``wait4`` in
  ``peak_rss.py``, a small launcher: a direct child's figure would include this
  process's own peak).

Both runs use the same recipe (gptq-w4g64's weights: 4 bits, groups of 64, MSE
observer, act-order) and calibration (32 × 512 tokens of WikiText-2 validation);
only ``calibration.all_experts`` differs. Nothing is chosen from these figures.

    .venv/bin/python benchmarks/moe.py --work /work/scratch/moe
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.peak_rss import run_measured  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "wikitext-2"
CONFIG = dict(
    hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=16,
    num_experts_per_tok=2, norm_topk_prob=True, vocab_size=49152, max_position_embeddings=4096,
    tie_word_embeddings=True,
)  # fmt: skip
SAMPLES, SEQ = 32, 512
HELD_OUT = 8  # windows of SEQ tokens of WikiText-2 test


def write_model(folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantmill.sources import resolve_model

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **CONFIG)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    factors = torch.linspace(0.2, 2.0, CONFIG["num_experts"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.02).mul_(factors[:, None].to(torch.bfloat16) * 8)
    model.save_pretrained(folder, max_shard_size="200MB")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path).save_pretrained(folder)


def recipe(work: Path, all_experts: bool) -> Path:
    from quantmill.recipe import find_recipe, load_recipe

    data = load_recipe(find_recipe("gptq-w4g64")).to_dict()
    data["name"] = f"moe-gptq-w4g64-{'all' if all_experts else 'routed'}"
    data["calibration"] = {"dataset": str(DATA / "wiki.valid.tokens"), "num_samples": SAMPLES,
                           "seq_len": SEQ, "seed": 0, "batch_size": 8,
                           "all_experts": all_experts}  # fmt: skip
    path = work / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def measured(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Through ``peak_rss.py``: this process's own peak would count in a direct child's."""
    out, run = run_measured(cmd, log, env=env)
    if run["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed; see {log}")
    return {"summary": json.loads(out), "wall_seconds": round(run["wall_seconds"], 1),
            "peak_rss_mb": round(run["peak_rss_kb"] / 1024)}  # fmt: skip


def held_out_ids() -> torch.Tensor:
    from quantmill.models import load_tokenizer
    from quantmill.sources import resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    text = (DATA / "wiki.test.raw").read_text()[:200_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[: HELD_OUT * SEQ].reshape(HELD_OUT, SEQ)


@torch.no_grad()
def block_errors(source: Path, quantized: Path, ids: torch.Tensor) -> list[float]:
    """Each block's relative output error, both blocks fed the float model's inputs."""
    from transformers import AutoModelForCausalLM

    from quantmill.arch import arch_for, decoder_blocks
    from quantmill.blocks import block_outputs, capture_block_inputs

    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32).eval()
    float_blocks = decoder_blocks(ref, arch_for(ref))
    quant_blocks = decoder_blocks(ours, arch_for(ours))
    inputs = capture_block_inputs(ref, float_blocks[0], ids, 2)
    errors = []
    for index, (f, q) in enumerate(zip(float_blocks, quant_blocks, strict=True)):
        inputs.enter(index)
        want, got = block_outputs(f, inputs), block_outputs(q, inputs)
        num = sum(float((g - w).square().sum()) for g, w in zip(got, want, strict=True))
        den = sum(float(w.square().sum()) for w in want)
        errors.append(num / den)
        inputs.hidden = want
    return errors


def experts_of(out: Path) -> dict[str, Any]:
    from quantmill.api import LAYERS_FILE
    from quantmill.moe import token_table

    table = token_table(json.loads((out / LAYERS_FILE).read_text()))
    gate = [i for i, name in enumerate(table["layer"]) if name.endswith("gate_proj")]
    routed = [table["routed_tokens"][i] for i in gate]
    calibrated = [table["calibrated_tokens"][i] for i in gate]
    return {
        "experts": len(gate),
        "routed_tokens": {"min": min(routed), "median": sorted(routed)[len(routed) // 2],
                          "max": max(routed)},
        "calibrated_tokens": {"min": min(calibrated), "max": max(calibrated)},
        "under_calibrated": sum(1 for c in calibrated if c < CONFIG["hidden_size"]),
        "uncalibrated": sum(1 for c in calibrated if c == 0),
        "fell_back_to_rtn": sum(1 for f in table["fallback"] if f),
        "per_expert": {name.rsplit(".", 1)[0]: [table["routed_tokens"][i],
                                                table["calibrated_tokens"][i]]
                       for name, i in ((table["layer"][i], i) for i in gate)},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantmill-moe"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/moe.json")
    parser.add_argument(
        "--allocators", default="pinned",
        help="comma-separated: pinned (the CLI's fixed 1 MiB mmap threshold), default "
        "(glibc's dynamic one: QUANTMILL_MMAP_PIN=0); rows already in --out are kept",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "qwen3-moe-random"
    if not (source / "config.json").is_file():
        write_model(source)
    ids = held_out_ids()
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = dict(old.get("runs", {}))
    for allocator in args.allocators.split(","):
        env = dict(os.environ)
        if allocator == "default":
            env["QUANTMILL_MMAP_PIN"] = "0"
        for label, all_experts in (("all_experts", True), ("routed_only", False)):
            key = label if allocator == "pinned" else f"{label}/{allocator}"
            out = args.work / f"out-{label}-{allocator}"
            cmd = [sys.executable, "-m", "app", "quantize", "--model", str(source), "--recipe",
                   str(recipe(args.work, all_experts)), "--out", str(out), "--format", "fake",
                   "--no-eval", "--json", "-q", "--overwrite", "--threads", "2"]  # fmt: skip
            load_before = os.getloadavg()[0]
            run = measured(cmd, args.work / f"{label}-{allocator}.log", env)
            errors = block_errors(source, out, ids)
            rows[key] = {
                "command": " ".join(cmd[1:]), "allocator": allocator,
                "wall_seconds": run["wall_seconds"], "peak_rss_mb": run["peak_rss_mb"],
                "load_average": {"before": round(load_before, 2),
                                 "after": round(os.getloadavg()[0], 2)},
                "quantize_seconds": round(run["summary"]["quant_seconds"], 1),
                "block_errors": [round(e, 6) for e in errors],
                "mean_block_error": round(sum(errors) / len(errors), 6), **experts_of(out),
            }  # fmt: skip
            shown = {k: v for k, v in rows[key].items() if k != "per_expert"}
            print(key, shown, flush=True)
    a, r = rows["all_experts"], rows["routed_only"]
    report = {
        "command": "benchmarks/moe.py --work /work/scratch/moe (pinned rows), then "
        "--allocators default (the */default rows; load_average says what else ran)",
        "model": {"kind": "random-weight Qwen3-MoE shape, router rows scaled 0.2-2.0",
                  **CONFIG},
        "recipe": "gptq-w4g64 weights (4 bits, groups of 64, MSE observer, act-order); "
                  f"calibration {SAMPLES} x {SEQ} tokens of WikiText-2 validation",
        "held_out": f"{HELD_OUT} x {SEQ} tokens of WikiText-2 test",
        "selection": "none: one fixed recipe; only calibration.all_experts differs",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": 2,
                    "cores": os.cpu_count()},
        "runs": rows,
        "checks": {
            "all_experts_not_worse_in_any_block": all(
                x <= y for x, y in zip(a["block_errors"], r["block_errors"], strict=True)),
            "all_experts_mean_not_worse": a["mean_block_error"] <= r["mean_block_error"],
            "no_expert_uncalibrated_with_all_experts": a["uncalibrated"] == 0,
        },
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["checks"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
