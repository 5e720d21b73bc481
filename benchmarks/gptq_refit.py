"""Choose whether GPTQ refits its scales to the integers it chose, on held-out text.

After GPTQ has chosen every integer, each row's scales can be refitted by least
squares on the damped Hessian (``quantmill.quant.refit``): the layer's output error
on the calibration inputs can only fall and the integers stay. Whether that lowers
perplexity is measured here, on the held-out windows of ``observer_search.py``
(WikiText-2 validation that no calibration window touches; the test text is not
read), with GPTQ as the comparison with llmcompressor runs ours, at the settings
where the comparison found ours short or close: w4 g64 asymmetric and symmetric with
min-max, w4 g64 symmetric and w3 g64 symmetric with MSE, w4 per channel symmetric
with min-max. Rule fixed before the runs: refitting becomes the default
(``GPTQConfig.refit_scales``) when its geometric-mean held-out perplexity over those
settings is lower than without.

``--rounds``: with the refit on, whether further rounds (``GPTQConfig.refit_rounds``:
GPTQ again on the refitted grid, then refit, each layer keeping its round of least
damped output error) lower held-out perplexity, at the same five settings, written
to ``gptq_rounds.json``. Rule (2026-12-07, fixed before the 2-round runs; on
2026-12-06 only 1 and 3 rounds were measured and 3 won): ``refit_rounds`` is the
fewest rounds whose geometric-mean held-out perplexity over those settings is within
0.25% of the lowest of 1, 2 and 3 rounds (a round costs most at large layers); the
time each costs is recorded beside it.

    .venv/bin/python benchmarks/gptq_refit.py            # about 40 min on 2 cores
    .venv/bin/python benchmarks/gptq_refit.py --rounds   # about 35 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.jsonfile import write_json  # noqa: E402
from benchmarks.machine import machine  # noqa: E402
from benchmarks.observer_search import geomeans, gptq_row, held_out_windows  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "gptq_refit.json"
ROUNDS_OUT = REPO / "benchmarks" / "results" / "gptq_rounds.json"
# (setting, observer): the comparison's pairings where ours was short or close
CASES = (
    ("w4g64a", "minmax"), ("w3g64s", "mse"), ("w4g64s", "mse"),
    ("w4g64s", "minmax"), ("w4pcs", "minmax"),
)  # fmt: skip
# each stage's variants: GPTQ options, and the rule that picks the shipped one
STAGES = {
    "refit": {
        "variants": {"refit": {"refit_scales": True}, "plain": {"refit_scales": False}},
        "selection": "refit becomes the default when its geometric-mean held-out "
        "perplexity over {cases} is lower than plain GPTQ's",
    },
    "rounds": {  # in order of cost: each round repeats GPTQ's column loop and the refit
        "variants": {
            "rounds1": {"refit_rounds": 1},
            "rounds2": {"refit_rounds": 2},
            "rounds3": {"refit_rounds": 3},
        },
        # fixed before the 2-round runs (2026-12-07; 1 and 3 were measured on 2026-12-06,
        # when 3 became the default): a round costs most at large layers (the 1B shape's
        # GPTQ doubles with three), so a cheaper count within 0.25% is preferred
        "tolerance": 0.0025,
        "selection": "refit_rounds is the fewest rounds whose geometric-mean held-out "
        "perplexity over {cases} is within 0.25% of the lowest of 1, 2 and 3 rounds "
        "(rule fixed before the 2-round runs; 1 and 3 rounds alone chose 3 on 2026-12-06)",
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=6, help="held-out windows")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", action="store_true", help="the rounds stage")
    parser.add_argument("--out", type=Path, help="default: the stage's results file")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "refit")
    args = parser.parse_args()
    args.stage = "rounds" if args.rounds else "refit"
    args.out = args.out or (ROUNDS_OUT if args.rounds else OUT)
    variants = STAGES[args.stage]["variants"]

    import torch

    from quantmill.models import load_model
    from quantmill.quant.grid import MSE_SEARCH
    from quantmill.sources import resolve_model

    torch.set_num_threads(2)
    _, tokenizer = load_model(resolve_model("smollm2-135m"))
    windows, covered = held_out_windows(tokenizer, args.seq_len, args.windows)
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = data.setdefault("rows", {})
    began = time.perf_counter()
    for label, observer in CASES:
        for name, options in variants.items():
            key = f"{label}/{observer}/{name}"
            if key in rows:
                continue
            out = args.work / key.replace("/", "-")
            row = gptq_row(label, MSE_SEARCH, out, windows, observer, **options)
            layers = json.loads((out / "quantmill_layers.json").read_text())
            gains = [layer["extra"].get("refit_gain") for layer in layers]
            if None not in gains:
                row["mean_layer_error_drop"] = round(sum(gains) / len(gains), 4)
            kept = [layer["extra"].get("refit_round") for layer in layers]
            if None not in kept:
                row["layers_keeping_round"] = {r: kept.count(r) for r in sorted(set(kept))}
            rows[key] = row
            print(f"{key}: {row}", flush=True)
            write(args, data, windows, covered, time.perf_counter() - began)
    write(args, data, windows, covered, time.perf_counter() - began)
    print(json.dumps({k: data.get(k) for k in ("geomean", "chosen")}, indent=2))
    return 0


def chosen(score: dict[str, float], stage: dict) -> str:
    """The first variant (in the stage's order of cost) within the stage's tolerance
    of the lowest geometric mean."""
    limit = min(score.values()) * (1 + stage.get("tolerance", 0.0))
    return next(name for name in stage["variants"] if score[name] <= limit)


def write(args, data: dict, windows, covered: float, seconds: float) -> None:
    rows = data["rows"]
    stage = STAGES[args.stage]
    cases = [f"{label}/{observer}" for label, observer in CASES]
    score = geomeans(stage["variants"], cases, lambda k: rows.get(k, {}).get("perplexity"))
    best = chosen(score, stage) if len(score) == len(stage["variants"]) else None
    data.update(
        command="python benchmarks/gptq_refit.py" + " --rounds" * (args.stage == "rounds"),
        held_out=f"{windows.shape[0]} windows of {args.seq_len} tokens of WikiText-2 "
        "validation that no calibration window (128 x 512, seed 0) overlaps "
        f"(calibration covers {covered:.1%} of the file); the test text is not read",
        method="GPTQ as gptq_vs_peer.py runs ours (dampening 0.01, block 128, actorder "
        "with static groups, bfloat16 forward passes, the shipped MSE search); refit: "
        "each row's scales then refitted by least squares on the damped Hessian "
        "(quantmill/quant/refit.py); rounds: GPTQ again on the refitted grid, then refit, "
        "each layer keeping its round of least damped error",
        calibration_criterion="mean_layer_error_drop: the mean over layers of the fall "
        "in the damped output error on the calibration inputs that the refit (and its "
        "rounds) bring, against GPTQ's first result",
        selection=stage["selection"].format(cases=", ".join(cases)),
        geomean=score,
        chosen=None if best is None else {"variant": best, "geomean": score[best]},
        last_invocation_seconds=round(seconds, 1),
        machine=machine(threads=2),
    )
    write_json(args.out, data)


if __name__ == "__main__":
    sys.exit(main())
