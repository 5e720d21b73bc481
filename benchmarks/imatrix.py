"""The imatrix observer against the plain MSE search, RTN and GPTQ, on SmolLM2-135M.

Each pair differs only in ``weights.observer`` (``mse`` → ``imatrix``); everything
else is the shipped recipe's (GPTQ: gptq-w4g64 / gptq-w3g64; RTN: the same weight
schemes). The imatrix observer has no setting of its own, so nothing is chosen on
these figures. Perplexity: the first 8 windows of 2048 tokens of WikiText-2 test
(the README's protocol); calibration: each recipe's 128 × 512 tokens of WikiText-2
validation.

    .venv/bin/python benchmarks/imatrix.py            # writes benchmarks/results/imatrix.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
from benchmarks.machine import machine  # noqa: E402
from benchmarks.searches import current, recorded  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "imatrix.json"


def recipes() -> dict[str, dict[str, Any]]:
    from quantmill.recipe import find_recipe, load_recipe

    rows = {}
    for gptq in ("gptq-w4g64", "gptq-w3g64"):
        base = load_recipe(find_recipe(gptq)).to_dict()
        for method in ("rtn", "gptq"):
            for observer in ("mse", "imatrix"):
                data = json.loads(json.dumps(base))
                step = data["steps"][0]
                if method == "rtn":
                    step = {"method": "rtn", "weights": step["weights"]}
                step["weights"]["observer"] = observer
                data["steps"] = [step]
                data["name"] = f"{method}-{gptq.split('-', 1)[1]}-{observer}"
                data["calibration"]["dataset"] = str(DATA / "wiki.valid.tokens")
                data["evaluation"].update(dataset=str(DATA / "wiki.test.raw"), seq_len=2048,
                                          max_windows=8, tasks=[])  # fmt: skip
                rows[data["name"]] = data
    return rows


def main() -> int:
    import torch

    from quantmill.api import quantize
    from quantmill.recipe import Recipe

    torch.set_num_threads(2)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}
    for name, recipe in recipes().items():
        if current(data["rows"].get(name), recipe):
            continue
        start = time.perf_counter()
        summary = quantize("smollm2-135m", Recipe.model_validate(recipe),
                           REPO / "benchmarks" / "work" / "imatrix" / name, overwrite=True,
                           progress=False).to_dict()  # fmt: skip
        data["rows"][name] = {
            "recipe": recipe, **recorded(recipe),
            "perplexity": summary["quantized"]["perplexity"],
            "original_perplexity": summary["original"]["perplexity"],
            "quant_seconds": round(summary["quant_seconds"], 1),
            "wall_seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        print(name, data["rows"][name]["perplexity"], flush=True)
        data.update(
            command="python benchmarks/imatrix.py",
            selection="none: the imatrix observer has no setting; each pair differs only in "
            "weights.observer",
            evaluation="first 8 windows x 2048 tokens of WikiText-2 test",
            machine=machine(threads=2),
        )
        OUT.write_text(json.dumps(data, indent=2) + "\n")
    rows = data["rows"]
    data["checks"] = {
        f"{n.rsplit('-', 1)[0]}: imatrix below mse": rows[n]["perplexity"]
        < rows[n.replace("-imatrix", "-mse")]["perplexity"]
        for n in rows if n.endswith("-imatrix") and n.replace("-imatrix", "-mse") in rows
    }  # fmt: skip
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["checks"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
