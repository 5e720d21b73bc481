"""Closer to the original at fewer bits, on SmolLM2-135M: rotations before RTN and
GPTQ and AutoRound, beside RTN, GPTQ and AutoRound alone.

Each rotation pair differs only in a first ``rotate`` step (random Hadamard, seed 0,
value heads too: the step's defaults, fixed before any figure was seen). AutoRound
runs 50 signed-gradient steps of 4 samples per block at its paper's step size
1/iters (``AUTOROUND``: what a CPU run affords, fixed before any figure). Nothing is
chosen on these figures; the rotated w3 g64 asymmetric GPTQ row is measured a second
time with the observer ``w3_observer.py`` chose on held-out validation text. Weight
schemes are the shipped recipes' (gptq-w4g64, gptq-w3g64), symmetric and asymmetric;
RTN and AutoRound take the same scheme.
Calibration: 128 × 512 tokens of WikiText-2 validation. Perplexity on two domains:
the first 8 windows of 2048 tokens of WikiText-2 test (the README's protocol), and
of LAMBADA's passages (books: the zero-shot set's contexts with their last words,
joined), the second domain the ordering is checked on. Each row runs in its own
process through ``benchmarks/peak_rss.py``: its peak resident memory covers
quantizing and both evaluations; seconds are the quantization's own and the row's
wall time, with the machine's load average (other work beside a row inflates its
times, not its perplexities). Rows are kept as they finish; a rerun does the
missing ones.

    .venv/bin/python benchmarks/fewer_bits.py          # writes benchmarks/results/fewer_bits.json
    .venv/bin/python benchmarks/fewer_bits.py --only gptq-w4g64-sym rotate-gptq-w4g64-sym
    .venv/bin/python benchmarks/fewer_bits.py --only autoround-w4g64-sym --again  # rerun
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_label, cpu_model, machine  # noqa: E402
from benchmarks.peak_rss import run_measured  # noqa: E402
from benchmarks.searches import current, label, recorded, search_of  # noqa: E402

DATA = REPO.parent / "shared" / "data"
WORK = REPO / "benchmarks" / "work" / "fewer_bits"
OUT = REPO / "benchmarks" / "results" / "fewer_bits.json"
WINDOWS = {"seq_len": 2048, "max_windows": 8, "tasks": []}


def lambada_text() -> Path:
    """LAMBADA's passages as one text file (context and last word, a blank line between)."""
    path = WORK / "lambada.txt"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in (DATA / "zero-shot/lambada_openai.jsonl").open()]
        path.write_text("\n\n".join(f"{r['context']} {r['continuation']}" for r in rows))
    return path


# AutoRound's settings, fixed by what a CPU run can afford before any figure was seen
# (the paper's default is 200 steps of 8 samples; its step size 1/iters is kept)
AUTOROUND = {"iters": 50, "batch_size": 4}


# the rotated 3-bit row whose observer benchmarks/w3_observer.py chooses
W3_ROW = "rotate-gptq-w3g64-asym"


def with_observer(recipe: dict[str, Any], observer: str) -> dict[str, Any]:
    """A copy of a row's recipe with ``observer`` on its last step, named after it."""
    data = json.loads(json.dumps(recipe))
    data["steps"][-1]["weights"]["observer"] = observer
    data["name"] = f"{recipe['name']}-{observer}"
    return data


def recipes() -> dict[str, dict[str, Any]]:
    from quantmill.recipe import find_recipe, load_recipe

    rows = {}
    for base_name, bits in (("gptq-w4g64", "w4g64"), ("gptq-w3g64", "w3g64")):
        base = load_recipe(find_recipe(base_name)).to_dict()
        for symmetric in (True, False):
            methods = ["gptq", "autoround"]
            if bits == "w4g64" and symmetric:
                methods.insert(0, "rtn")
            for method in methods:
                for rotate in (False, True):
                    data = json.loads(json.dumps(base))
                    step = data["steps"][0]
                    if method == "rtn":
                        step = {"method": "rtn", "weights": step["weights"]}
                    if method == "autoround":
                        weights = {**step["weights"], "observer": "minmax"}  # its start
                        step = {"method": "autoround", "weights": weights, **AUTOROUND}
                    step["weights"]["symmetric"] = symmetric
                    data["steps"] = [{"method": "rotate"}] * rotate + [step]
                    sym = "sym" if symmetric else "asym"
                    data["name"] = f"{'rotate-' * rotate}{method}-{bits}-{sym}"
                    data["calibration"]["dataset"] = str(DATA / "wikitext-2/wiki.valid.tokens")
                    data["evaluation"].update(dataset=str(DATA / "wikitext-2/wiki.test.raw"),
                                              **WINDOWS)  # fmt: skip
                    rows[data["name"]] = data
    # The rotated 3-bit row again with the observer held-out text chose for it
    # (benchmarks/w3_observer.py), when that is not the recipe's own
    choice = OUT.with_name("w3_observer.json")
    chosen = json.loads(choice.read_text()).get("chosen") if choice.is_file() else None
    if chosen and chosen != rows[W3_ROW]["steps"][-1]["weights"]["observer"]:
        data = with_observer(rows[W3_ROW], chosen)
        rows[data["name"]] = data
    # Mixed precision at 3.5 bits per weight (scales included: w3 g64 costs 3.25, w4 g64
    # 4.25), GPTQ's w3g64 recipe otherwise; by measured error, and the same sizes at random
    base = load_recipe(find_recipe("gptq-w3g64")).to_dict()
    for choose in ("sensitivity", "random"):
        data = json.loads(json.dumps(base))
        step = data["steps"][0]
        schemes = [{**step["weights"], "bits": bits} for bits in (3, 4)]
        step["mixed"] = {"target_bits_per_weight": 3.5, "schemes": schemes, "choose": choose}
        data["name"] = f"gptq-mixed3.5-{choose}"
        data["calibration"]["dataset"] = str(DATA / "wikitext-2/wiki.valid.tokens")
        data["evaluation"].update(dataset=str(DATA / "wikitext-2/wiki.test.raw"), **WINDOWS)
        rows[data["name"]] = data
    # W4A8 KV8 with per-channel 4-bit weights: the setting of the LLM-QAT row
    # (benchmarks/qat.py); RTN keeps min-max as there, GPTQ its recipe's mse
    w4a8 = load_recipe(find_recipe("gptq-w4-channel")).to_dict()
    for method in ("rtn", "gptq"):
        for rotate in (False, True):
            data = json.loads(json.dumps(w4a8))
            step = data["steps"][0]
            if method == "rtn":
                step = {"method": "rtn", "weights": {**step["weights"], "observer": "minmax"}}
            step["activations"] = {"bits": 8}
            data["steps"] = [{"method": "rotate"}] * rotate + [step]
            data["name"] = f"{'rotate-' * rotate}{method}-w4a8kv8"
            data["calibration"]["dataset"] = str(DATA / "wikitext-2/wiki.valid.tokens")
            data["evaluation"].update(dataset=str(DATA / "wikitext-2/wiki.test.raw"),
                                      kv_cache={"bits": 8, "granularity": "token"},
                                      **WINDOWS)  # fmt: skip
            rows[data["name"]] = data
    return rows


def run_row(name: str) -> None:
    """One row, in this process: quantize (with the WikiText evaluation), then LAMBADA."""
    import torch

    from quantmill.api import evaluate_checkpoint, quantize
    from quantmill.config import EvalSpec
    from quantmill.recipe import Recipe

    torch.set_num_threads(2)
    recipe = Recipe.model_validate(recipes()[name])
    out = WORK / name
    summary = quantize("smollm2-135m", recipe, out, overwrite=True, progress=False).to_dict()
    lambada = EvalSpec(dataset=str(lambada_text()), **WINDOWS)
    second = evaluate_checkpoint(str(out), lambada, progress=False)
    original = evaluate_checkpoint("smollm2-135m", lambada, progress=False, cache=True)
    print(json.dumps({
        "perplexity": summary["quantized"]["perplexity"],
        "original_perplexity": summary["original"]["perplexity"],
        "lambada_perplexity": second["perplexity"],
        "original_lambada_perplexity": original["perplexity"],
        "bits_per_weight": summary["bits_per_weight"],  # as stored: scales, zeros counted
        "quant_seconds": round(summary["quant_seconds"], 1),
    }))  # fmt: skip


def fill_stored_bits(rows: dict[str, dict[str, Any]]) -> None:
    """Stored bits per weight for rows measured before the rows recorded them (read from
    the row's checkpoint, still in the work folder, when the row is current)."""
    from quantmill.evaluate import bits_per_weight

    recipes_now = recipes()
    for name, row in rows.items():
        folder = WORK / name
        if row.get("bits_per_weight") is None and (folder / "config.json").is_file():
            if name in recipes_now and current(row, recipes_now[name]):
                row["bits_per_weight"] = bits_per_weight(folder)


def table(data: dict[str, Any]) -> str:
    """The README's table, from the JSON: rows in the recipes' order."""
    rows = data["rows"]
    first = next(iter(rows.values()))
    wiki, lambada = first["original_perplexity"], first["original_lambada_perplexity"]
    lines = [
        f"| recipe | WikiText-2 (original {wiki:.2f}) | LAMBADA (original {lambada:.2f}) "
        "| stored bits/weight | quantize s | row wall s | peak RSS MB | load | CPU | mse search |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recipe in recipes().items():
        if name not in rows:
            continue
        r = rows[name]
        earlier = "" if current(r, recipe) else " (earlier code)"  # a rerun would differ
        bits = "-" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.2f}"
        lines.append(
            f"| {name}{earlier} | {r['perplexity']:.2f} ({r['perplexity'] / wiki - 1:+.1%}) "
            f"| {r['lambada_perplexity']:.2f} | {bits} | {r['quant_seconds']:.0f} "
            f"| {r['wall_seconds']:.0f} | {r['peak_rss_mb']} | {r['load_average']:.1f} "
            f"| {cpu_label(r.get('cpu'))} | {label(search_of(r))} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="row names (default: every row)")
    parser.add_argument(
        "--again", action="store_true", help="rerun the --only rows even when current"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a child's one row
    parser.add_argument("--table", action="store_true", help="print the README's table")
    args = parser.parse_args()
    if args.row:
        run_row(args.row)
        return 0
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}
    WORK.mkdir(parents=True, exist_ok=True)
    for name, recipe in recipes().items():
        if args.only and name not in args.only:
            continue
        if current(data["rows"].get(name), recipe) and not (args.again and args.only):
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--row", name]
        stdout, run = run_measured(cmd, WORK / f"{name}.log", cwd=REPO)
        if run["returncode"] != 0:
            print(f"{name}: failed (exit {run['returncode']}), see {WORK / name}.log")
            return 1
        row = json.loads(stdout.strip().splitlines()[-1])
        data["rows"][name] = {
            "recipe": recipe, **recorded(recipe), **row,
            "wall_seconds": round(run["wall_seconds"], 1),
            "peak_rss_mb": round(run["peak_rss_kb"] / 1024), "load_average": os.getloadavg()[0],
            "cpu": cpu_model(),
        }  # fmt: skip
        print(name, row["perplexity"], row["lambada_perplexity"], flush=True)
        data.update(
            command="python benchmarks/fewer_bits.py",
            selection="none: the rotate step's defaults (hadamard, seed 0, heads true) and "
            f"AutoRound's {AUTOROUND} (CPU budget), fixed before any figure; each rotation "
            "pair differs only in the rotate step; rotate-gptq-w3g64-asym-<observer>: the "
            "observer benchmarks/w3_observer.py chose on held-out validation text",
            evaluation="first 8 windows x 2048 tokens of WikiText-2 test, and of LAMBADA's "
            "passages (second domain)",
            machine=machine(threads=2),
        )
        OUT.write_text(json.dumps(data, indent=2) + "\n")
    rows = data["rows"]
    fill_stored_bits(rows)
    checks, skipped = {}, []

    def check(title: str, name: str, other: str) -> None:
        """``name`` below ``other`` on both domains; only rows one CPU measured compare
        (bfloat16 arithmetic differs between CPUs by about as much as some gaps)."""
        if rows[name].get("cpu") != rows[other].get("cpu"):
            skipped.append(f"{title}: {name} and {other} ran on different CPUs")
            return
        for metric in ("perplexity", "lambada_perplexity"):
            checks[f"{title} {metric}"] = rows[name][metric] < rows[other][metric]

    for name in rows:
        gptq = name.replace("autoround-", "gptq-")
        if name.startswith("autoround-") and gptq in rows:
            check(f"{name}: below gptq's", name, gptq)
        plain = name.removeprefix("rotate-")
        if name.startswith("rotate-") and plain in rows:
            check(f"{plain}: rotation lowers", name, plain)
    mix = "gptq-mixed3.5-sensitivity"
    if mix in rows:
        for other in ("gptq-mixed3.5-random", "gptq-w3g64-sym"):
            if other in rows:
                check(f"mixed 3.5 bits: below {other}'s", mix, other)
    data["not_compared"] = skipped
    data["checks"] = checks
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
