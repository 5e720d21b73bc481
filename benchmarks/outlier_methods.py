"""The outlier-aware methods on the real SmolLM2-135M, each against its baseline.

Comparisons (same calibration rows and evaluation for every run):

- ``w8a8``: naive per-token W8A8 (RTN) vs SmoothQuant W8A8 with α = 0.8 (the
  peer's setting) and with α searched per mapping and block. Both W8A8
  checkpoints are evaluated with integer matmuls (``Int8Linear``).
- ``zeroquant``: W4A8 groups of 64 without and with layer-wise distillation.
- ``awq``: RTN vs AWQ at 4-bit and 3-bit groups of 64, plus the peer toolkit's
  AWQ (llmcompressor 0.14, ``benchmarks/peer/setup.sh``) on the same rows.
- ``llm_int8``: LLM.int8() vs the original at thresholds 6.0 (the paper's),
  4, 3 and 2, with the share of input columns each kept in float at run time.

Every quantization runs in its own process (``quantmill quantize``), measured
from outside (wall time, peak RSS); every checkpoint is evaluated by the same
code: perplexity over the first windows of 2048 tokens of WikiText-2 test.

    .venv/bin/python benchmarks/outlier_methods.py                     # all (~1 h)
    .venv/bin/python benchmarks/outlier_methods.py --only w8a8,llm_int8 --skip-peer
    .venv/bin/python benchmarks/outlier_methods.py --only llm_int8,llm_int8_thresholds \
        --rows llm-int8-t6,llm-int8-t2 --skip-peer

Prints a table and writes ``benchmarks/results/outlier_methods.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_vs_peer import DATA, REPO, calibration_file, evaluate, measured_once

W8 = {"bits": 8, "group_size": None, "symmetric": True}
A8 = {"bits": 8}


def g(bits: int) -> dict[str, Any]:
    return {"bits": bits, "group_size": 64, "symmetric": True}


def experiments(args) -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    """Per comparison: (run name, recipe steps); ``peer-…`` runs go to llmcompressor."""
    lkd = {"lkd_steps": args.lkd_steps, "lkd_lr": args.lkd_lr, "lkd_batch_size": 4}
    return {
        "w8a8": [
            ("rtn-w8a8", [{"method": "rtn", "weights": W8, "activations": A8}]),
            ("smoothquant-a0.8-w8a8", [{"method": "smoothquant", "alpha": 0.8}]),
            (
                "smoothquant-search-w8a8",
                [{"method": "smoothquant", "alpha_grid": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}],
            ),
        ],
        "zeroquant": [
            ("zeroquant-w4a8g64-nolkd", [{"method": "zeroquant", "weights": g(4), "lkd_steps": 0}]),
            ("zeroquant-w4a8g64-lkd", [{"method": "zeroquant", "weights": g(4), **lkd}]),
        ],
        "awq": [
            ("rtn-w4g64", [{"method": "rtn", "weights": g(4)}]),
            ("awq-w4g64", [{"method": "awq", "weights": g(4)}]),
            ("rtn-w3g64", [{"method": "rtn", "weights": g(3)}]),
            ("awq-w3g64", [{"method": "awq", "weights": g(3)}]),
        ],
        "llm_int8": [("llm-int8-t6", [{"method": "llm_int8", "threshold": 6.0}])],
        "awq_peer": [
            ("peer-awq-w4g64", [{"method": "awq", "weights": g(4)}]),
            ("peer-awq-w3g64", [{"method": "awq", "weights": g(3)}]),
        ],
        # 6.0 is the paper's threshold; lower ones keep more columns in float
        "llm_int8_thresholds": [
            (f"llm-int8-t{t:g}", [{"method": "llm_int8", "threshold": t}]) for t in (4.0, 3.0, 2.0)
        ],
    }


def recipe_file(folder: Path, name: str, steps: list[dict[str, Any]], args) -> Path:
    recipe = {
        "name": name,
        "steps": [{**step, "ignore": ["lm_head"]} for step in steps],
        "calibration": {
            "dataset": str(DATA / "wiki.valid.tokens"),
            "num_samples": args.samples,
            "seq_len": args.seq_len,
            "seed": 0,
        },
        "evaluation": {"dataset": str(DATA / "wiki.test.raw"), "max_windows": args.windows},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_ours(name: str, steps, model_dir: Path, work: Path, args) -> dict[str, Any]:
    out = work / name
    cmd = [
        sys.executable, "-m", "app", "quantize",
        "--model", str(model_dir),
        "--recipe", str(recipe_file(work, name, steps, args)),
        "--out", str(out), "--json", "-q", "--overwrite",
    ]  # fmt: skip
    run = measured_once(cmd, out, work / f"{name}.log")
    result = run["result"]
    quantized = result.get("quantized") or {}
    layers = json.loads((out / "quantmill_layers.json").read_text())
    return {
        "perplexity": quantized.get("perplexity"),
        "runtime_layers": quantized.get("runtime_layers"),
        "outlier_column_fraction": quantized.get("outlier_column_fraction"),
        "quant_seconds": result.get("quant_seconds"),
        "wall_seconds": run["wall_seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "bits_per_weight": result.get("bits_per_weight"),
        **layer_figures(layers),
    }


def layer_figures(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-method figures from the layer reports: chosen α/ratios, LKD losses, outliers."""
    out: dict[str, Any] = {}
    lkd = [r for r in layers if r["method"] == "zeroquant-lkd"]
    if lkd:
        out["lkd_blocks"] = [
            {"block": r["name"], "before": r["extra"]["initial_loss"], "after": r["loss"],
             "kept": r["extra"].get("kept")}
            for r in lkd
        ]  # fmt: skip
    alphas = [r["extra"]["alpha"] for r in layers if "alpha" in r.get("extra", {})]
    if alphas:
        out["alphas"] = {str(a): alphas.count(a) for a in sorted(set(alphas))}
    fractions = {
        r["name"]: r["extra"]["outlier_fraction"]
        for r in layers
        if "outlier_fraction" in r.get("extra", {})
    }
    if fractions:
        out["calibration_outlier_fraction"] = {
            "mean": sum(fractions.values()) / len(fractions),
            "max": max(fractions.values()),
            "layers_with_outliers": sum(1 for f in fractions.values() if f > 0),
            "per_layer": fractions,
        }
    return out


def run_peer(name: str, steps, model_dir: Path, calib: Path, peer_py: str, work: Path, args):
    weights = steps[0]["weights"]
    out = work / name
    cmd = [
        peer_py, str(REPO / "benchmarks/peer/run_llmcompressor.py"),
        "--model-dir", str(model_dir), "--calib", str(calib),
        "--method", steps[0]["method"], "--bits", str(weights["bits"]),
        "--group-size", str(weights["group_size"]), "--symmetric", "--out", str(out),
    ]  # fmt: skip
    try:
        run = measured_once(cmd, out, work / f"{name}.log")
    except RuntimeError as exc:  # the peer does not run everywhere: say so, keep going
        return {"error": str(exc)}
    return {
        "perplexity": evaluate(out, args, work / f"eval-{name}.log"),
        "quant_seconds": run["result"].get("quant_seconds"),
        "wall_seconds": run["wall_seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
    }


def verdicts(rows: dict[str, dict[str, Any]], original: float) -> dict[str, Any]:
    def ppl(name):
        return (rows.get(name) or {}).get("perplexity")

    def below(a, b):
        return None if ppl(a) is None or ppl(b) is None else ppl(a) < ppl(b)

    int8 = ppl("llm-int8-t6")
    within = sorted(
        (float(name.removeprefix("llm-int8-t")), r["perplexity"])
        for name, r in rows.items()
        if name.startswith("llm-int8-t")
        and r.get("perplexity") is not None
        and r["perplexity"] <= 1.01 * original
    )
    return {
        "smoothquant_search_below_naive_w8a8": below("smoothquant-search-w8a8", "rtn-w8a8"),
        "smoothquant_a0.8_below_naive_w8a8": below("smoothquant-a0.8-w8a8", "rtn-w8a8"),
        "lkd_below_no_lkd": below("zeroquant-w4a8g64-lkd", "zeroquant-w4a8g64-nolkd"),
        "awq_below_rtn_w4g64": below("awq-w4g64", "rtn-w4g64"),
        "awq_below_rtn_w3g64": below("awq-w3g64", "rtn-w3g64"),
        "awq_below_peer_awq_w4g64": below("awq-w4g64", "peer-awq-w4g64"),
        "awq_below_peer_awq_w3g64": below("awq-w3g64", "peer-awq-w3g64"),
        "llm_int8_t6_within_1pct": None if int8 is None else int8 <= 1.01 * original,
        "llm_int8_t6_increase_pct": None if int8 is None else 100 * (int8 / original - 1),
        "llm_int8_largest_threshold_within_1pct": within[-1][0] if within else None,
    }


def table(rows: dict[str, dict[str, Any]], original: float) -> str:
    lines = [
        "| run | perplexity | vs original | float columns | quant time (s) | wall (s) "
        "| peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| original | {original:.2f} | | | | | |",
    ]
    for name, r in rows.items():
        p = r.get("perplexity")
        if p is None:
            lines.append(f"| {name} | failed: {r.get('error', '?')[:60]} | | | | | |")
            continue
        q = r.get("quant_seconds")
        share = r.get("outlier_column_fraction")
        lines.append(
            f"| {name} | {p:.2f} | {100 * (p / original - 1):+.1f}% "
            f"| {'' if share is None else f'{100 * share:.1f}%'} "
            f"| {'-' if q is None else f'{q:.0f}'} | {r['wall_seconds']:.0f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        help="comma-separated, run in this order: w8a8, zeroquant, awq, llm_int8, awq_peer, "
        "llm_int8_thresholds",
    )
    parser.add_argument("--rows", help="comma-separated run names: only these of the groups")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--lkd-steps", type=int, default=50)
    parser.add_argument("--lkd-lr", type=float, default=5e-5)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--work", help="work folder to (re)use; finished runs are kept")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/outlier_methods.json"))
    args = parser.parse_args()

    from quantmill.sources import resolve_model

    model_dir = resolve_model("smollm2-135m").path
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="quantmill-outl-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    peer_py = None
    if not args.skip_peer:
        setup = subprocess.run(
            ["bash", str(REPO / "benchmarks/peer/setup.sh")], capture_output=True, text=True
        )
        peer_py = setup.stdout.strip().splitlines()[-1] if setup.returncode == 0 else None
    calib = calibration_file(model_dir, work, args)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    rows: dict[str, dict[str, Any]] = saved.get("rows", {})
    original = evaluate(model_dir, args, work / "eval-original.log")
    chosen = args.only.split(",") if args.only else list(experiments(args))
    report: dict[str, Any] = {
        "benchmark": "outlier_methods",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "model": "SmolLM2-135M-Instruct (smollm2-135m preset)",
        "calibration": {
            "file": "wiki.valid.tokens",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "seed": 0,
        },  # fmt: skip
        "evaluation": {"file": "wiki.test.raw", "windows": args.windows, "seq_len": 2048},
        "lkd": {"steps": args.lkd_steps, "lr": args.lkd_lr, "batch_size": 4},
        "peer": "llmcompressor 0.14 AWQModifier (default Llama mappings)",
        "original_perplexity": original,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    table_of = experiments(args)
    for group in chosen:  # in the order given
        for name, steps in table_of[group]:
            if args.rows and name not in args.rows.split(","):
                continue
            if name.startswith("peer-"):
                if peer_py is None:
                    continue
                rows[name] = run_peer(name, steps, model_dir, calib, peer_py, work, args)
            else:
                rows[name] = run_ours(name, steps, model_dir, work, args)
            rows[name]["command"] = report["command"]  # the top-level one is the latest's
            print(f"  {name}: ppl {rows[name].get('perplexity')}", flush=True)
            report["verdicts"] = verdicts(rows, original)
            out.write_text(json.dumps(report, indent=2) + "\n")  # kept if interrupted
    print(table(rows, original))
    print(json.dumps(report["verdicts"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
