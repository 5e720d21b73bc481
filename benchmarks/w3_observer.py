"""The observer of the rotated 3-bit GPTQ row, chosen on held-out validation text.

``fewer_bits.py`` runs rotation + GPTQ at w3 g64 asymmetric with the shipped
recipe's observer (``mse``). The issue's importance-weighted observer (``imatrix``:
the rounding error weighted by each input column's activation energy, the Hessian's
diagonal for GPTQ) and plain min-max are the alternatives. Each is run here with the
row's recipe otherwise unchanged and scored by perplexity on the held-out windows of
``observer_search.py`` (WikiText-2 validation that no calibration window touches;
the test text is not read). Rule fixed before the runs: the observer of least
held-out perplexity; ``fewer_bits.py`` then measures that observer's row on the test
text (``rotate-gptq-w3g64-asym-<observer>``, unless it is the recipe's own).

    .venv/bin/python benchmarks/w3_observer.py     # about 15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.fewer_bits import W3_ROW as ROW  # noqa: E402
from benchmarks.fewer_bits import recipes, with_observer  # noqa: E402
from benchmarks.jsonfile import write_json  # noqa: E402
from benchmarks.machine import machine  # noqa: E402
from benchmarks.observer_search import held_out_windows  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "w3_observer.json"
CANDIDATES = ("mse", "minmax", "imatrix")  # the recipe's own first


def candidate(observer: str) -> dict:
    """The fewer_bits row's recipe with ``observer`` on its GPTQ step, not evaluated."""
    data = with_observer(recipes()[ROW], observer)
    data.pop("evaluation", None)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "w3_observer")
    args = parser.parse_args()

    import torch

    from quantmill import api
    from quantmill.evaluate import perplexity
    from quantmill.models import load_model
    from quantmill.recipe import Recipe
    from quantmill.sources import resolve_model

    torch.set_num_threads(2)
    _, tokenizer = load_model(resolve_model("smollm2-135m"))
    windows, covered = held_out_windows(tokenizer, 1024, 6)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    rows = data.setdefault("rows", {})
    for observer in CANDIDATES:
        if observer in rows:
            continue
        out = args.work / observer
        began = time.perf_counter()
        recipe = Recipe.model_validate(candidate(observer))
        api.quantize("smollm2-135m", recipe, out, evaluate=False, overwrite=True, progress=False)
        seconds = time.perf_counter() - began
        model, _ = load_model(resolve_model(str(out)))
        ppl = perplexity(model, windows, progress=False).perplexity
        rows[observer] = {"held_out_perplexity": round(ppl, 4), "quant_seconds": round(seconds, 1)}
        print(observer, rows[observer], flush=True)
        done = len(rows) == len(CANDIDATES)
        best = min(rows, key=lambda o: rows[o]["held_out_perplexity"]) if done else None
        data.update(
            command="python benchmarks/w3_observer.py",
            row=ROW,
            held_out=f"{windows.shape[0]} windows of 1024 tokens of WikiText-2 validation that "
            f"no calibration window (128 x 512, seed 0) overlaps (calibration covers "
            f"{covered:.1%} of the file); the test text is not read",
            selection="the observer of least held-out perplexity among "
            f"{', '.join(CANDIDATES)} (rule fixed before the runs; the recipe's mse row's "
            "test perplexity, 27.17, was known, the others' were not)",
            chosen=best,
            machine=machine(threads=2),
        )
        write_json(OUT, data)
    print(json.dumps({"chosen": data.get("chosen"), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
