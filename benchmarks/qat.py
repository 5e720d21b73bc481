"""Quantization-aware training on SmolLM2-135M against its post-training start.

Rows (each ``quantmill quantize`` in its own process, measured from outside:
wall time, peak RSS; every checkpoint evaluated the same way, perplexity over
the first windows of 2048 tokens of WikiText-2 test):

- ``rtn-w3g64`` and ``peqa-w3g64`` (RTN, then PEQA trains the scales);
- ``l4q-w3g64`` (LoRA and scales trained under 3-bit group-64 quantization);
- ``rtn-w4a8kv8`` and ``llm-qat-w4a8kv8`` (per-channel 4-bit weights, per-token
  int8 activations, int8 KV cache; LLM-QAT trains on text the model writes).

PEQA and L4Q train on WikiText-2 validation (the calibration text), LLM-QAT on
its own generated text; the budgets (steps, sequence length, batch) are CPU
sized and written into the output with steps, tokens seen and time.

    .venv/bin/python benchmarks/qat.py                      # all rows (~1 h on 2 cores)
    .venv/bin/python benchmarks/qat.py --only peqa --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from gptq_vs_peer import DATA, REPO, evaluate, measured_once

G3 = {"bits": 3, "group_size": 64, "symmetric": True}
W4PC = {"bits": 4, "group_size": None, "symmetric": True}
A8 = {"bits": 8}
KV8 = {"bits": 8, "granularity": "token"}


def experiments(args) -> dict[str, list[tuple[str, list[dict[str, Any]], dict | None]]]:
    """Group → rows of (name, steps, evaluation KV cache)."""

    def training(lr: float, steps: int) -> dict[str, Any]:
        return {"steps": steps, "lr": lr, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "checkpoint_every": 50, "eval_samples": 4}  # fmt: skip

    return {
        "peqa": [
            ("rtn-w3g64", [{"method": "rtn", "weights": G3}], None),
            (
                "peqa-w3g64",
                [
                    {"method": "rtn", "weights": G3},
                    {"method": "peqa", "training": training(args.peqa_lr, args.steps)},
                ],
                None,
            ),
        ],  # fmt: skip
        "l4q": [
            (
                "l4q-w3g64",
                [
                    {
                        "method": "l4q",
                        "weights": G3,
                        "rank": 8,
                        "training": training(args.l4q_lr, args.steps),
                    }
                ],
                None,
            ),
        ],  # fmt: skip
        "llm_qat": [
            ("rtn-w4a8kv8", [{"method": "rtn", "weights": W4PC, "activations": A8}], KV8),
            (
                "llm-qat-w4a8kv8",
                [
                    {
                        "method": "llm_qat",
                        "weights": W4PC,
                        "activations": A8,
                        "kv_cache": KV8,
                        "generated_samples": args.generated,
                        "training": training(args.llm_qat_lr, args.steps),
                    }
                ],
                KV8,
            ),
        ],  # fmt: skip
    }


def recipe_file(folder: Path, name: str, steps, kv: dict | None, args) -> Path:
    recipe = {
        "name": name,
        "steps": [{**step, "ignore": ["lm_head"]} for step in steps],
        "calibration": {
            "dataset": str(DATA / "wiki.valid.tokens"),
            "num_samples": args.samples,
            "seq_len": 512,
            "seed": 0,
        },  # fmt: skip
        "evaluation": {
            "dataset": str(DATA / "wiki.test.raw"),
            "max_windows": args.windows,
            "kv_cache": kv,
        },  # fmt: skip
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(name: str, steps, kv, model_dir: Path, work: Path, args) -> dict[str, Any]:
    out = work / name
    cmd = [
        sys.executable, "-m", "app", "quantize",
        "--model", str(model_dir), "--recipe", str(recipe_file(work, name, steps, kv, args)),
        "--out", str(out), "--json", "-q", "--overwrite",
    ]  # fmt: skip
    measured = measured_once(cmd, out, work / f"{name}.log")
    result = measured["result"]
    row: dict[str, Any] = {
        "perplexity": (result.get("quantized") or {}).get("perplexity"),
        "bits_per_weight": result.get("bits_per_weight"),
        "quant_seconds": result.get("quant_seconds"),
        "wall_seconds": measured["wall_seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
    }
    training_file = out / "quantmill_training.json"
    if training_file.is_file():
        trained = json.loads(training_file.read_text())[0]
        history = trained["history"]
        row["training"] = {
            "method": trained["method"],
            "steps": trained["steps"],
            "tokens_seen": trained["tokens_seen"],
            "seconds": trained["seconds"],
            "eval_loss_before": trained["eval_loss_before"],
            "eval_loss_after": trained["eval_loss_after"],
            "first_loss": history[0]["loss"] if history else None,
            "last_10_mean_loss": sum(h["loss"] for h in history[-10:]) / max(1, len(history[-10:])),
        }
    return row


def verdicts(rows: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    def below(a: str, b: str) -> bool | None:
        pa, pb = (rows.get(a) or {}).get("perplexity"), (rows.get(b) or {}).get("perplexity")
        return None if pa is None or pb is None else pa < pb

    return {
        "peqa_below_rtn_w3g64": below("peqa-w3g64", "rtn-w3g64"),
        "l4q_below_rtn_w3g64": below("l4q-w3g64", "rtn-w3g64"),
        "llm_qat_below_ptq_w4a8kv8": below("llm-qat-w4a8kv8", "rtn-w4a8kv8"),
    }


def table(rows: dict[str, dict[str, Any]], original: float) -> str:
    lines = [
        f"original perplexity {original:.2f}",
        "| row | perplexity | steps | tokens | train s | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        t = r.get("training") or {}
        lines.append(
            f"| {name} | {r['perplexity']:.2f} | {t.get('steps', '-')} "
            f"| {t.get('tokens_seen', '-')} | {t.get('seconds', 0):.0f} "
            f"| {r['wall_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated groups, in order: peqa, l4q, llm_qat")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each method")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--samples", type=int, default=64, help="calibration texts of 512 tokens")
    parser.add_argument("--generated", type=int, default=64, help="LLM-QAT generated sequences")
    parser.add_argument("--peqa-lr", type=float, default=1e-3)
    parser.add_argument("--l4q-lr", type=float, default=5e-4)
    parser.add_argument("--llm-qat-lr", type=float, default=2e-5)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--work", help="work folder to (re)use; finished runs are kept")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/qat.json"))
    args = parser.parse_args()

    from quantmill.sources import resolve_model

    model_dir = resolve_model("smollm2-135m").path
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quantmill-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    rows: dict[str, dict[str, Any]] = saved.get("rows", {})
    original = evaluate(model_dir, args, work / "eval-original.log")
    table_of = experiments(args)
    chosen = args.only.split(",") if args.only else list(table_of)
    report: dict[str, Any] = {
        "benchmark": "qat",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},  # fmt: skip
        "model": "SmolLM2-135M-Instruct (smollm2-135m preset)",
        "budget": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                   "lr": {"peqa": args.peqa_lr, "l4q": args.l4q_lr, "llm_qat": args.llm_qat_lr},
                   "training_text": f"wiki.valid.tokens, {args.samples} x 512 tokens "
                                    "(PEQA, L4Q); LLM-QAT: "
                                    f"{args.generated} generated x {args.seq_len} tokens"},
        "evaluation": {"file": "wiki.test.raw", "windows": args.windows, "seq_len": 2048},
        "original_perplexity": original,
        "rows": rows,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    for group in chosen:
        for name, steps, kv in table_of[group]:
            rows[name] = run(name, steps, kv, model_dir, work, args)
            print(f"  {name}: ppl {rows[name]['perplexity']}", flush=True)
            report["verdicts"] = verdicts(rows)
            out.write_text(json.dumps(report, indent=2) + "\n")  # kept if interrupted
    print(table(rows, original))
    print(json.dumps(report["verdicts"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
