"""What a quantized KV cache costs in perplexity, on the real SmolLM2-135M.

The model is loaded once (the ``smollm2-135m`` preset, float32) and evaluated
over the first windows of 2048 tokens of WikiText-2 test (``wiki.test.raw``,
GPTQ protocol) with keys and values in float, then fake-quantized
(``quantmill.kv_cache.kv_cache_quantized``) to 8 and 4 bits, one asymmetric
scale per token (``token``: over all heads) or per token and head (``head``).

    .venv/bin/python benchmarks/kv_cache.py               # 8 windows
    .venv/bin/python benchmarks/kv_cache.py --windows 2   # a quick look

Prints a table and writes ``benchmarks/results/kv_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTMILL_DATA_DIR", REPO.parent / "shared" / "data")) / "wikitext-2"
SEQ_LEN = 2048
# (bits, granularity) of each quantized setting; None is the float baseline.
SETTINGS: list[tuple[int, str] | None] = [
    None,
    (8, "token"),
    (8, "head"),
    (4, "token"),
    (4, "head"),
]


def evaluate(model, windows: torch.Tensor, setting: tuple[int, str] | None) -> dict[str, Any]:
    from quantmill.config import KVCacheSpec
    from quantmill.evaluate import perplexity
    from quantmill.kv_cache import kv_cache_quantized

    spec = None
    if setting is not None:
        spec = KVCacheSpec(bits=setting[0], granularity=setting[1], symmetric=False)
    with kv_cache_quantized(model, spec):
        result = perplexity(model, windows, progress=False)
    return {
        "kv_cache": "float" if spec is None else spec.label() + "a",
        "spec": None if spec is None else spec.model_dump(),
        "perplexity": result.perplexity,
        "seconds": result.seconds,
    }


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["perplexity"]
    lines = ["| KV cache | perplexity | vs float | seconds |", "|---|---|---|---|"]
    for r in rows:
        change = (r["perplexity"] / base - 1) * 100
        lines.append(
            f"| {r['kv_cache']} | {r['perplexity']:.3f} | {change:+.2f}% | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=8, help="windows of 2048 tokens")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/kv_cache.json"))
    args = parser.parse_args()

    import transformers

    from quantmill.config import EvalSpec
    from quantmill.data import eval_ids
    from quantmill.models import load_model
    from quantmill.sources import resolve_model

    start = time.perf_counter()
    model, tokenizer = load_model(resolve_model("smollm2-135m"))
    spec = EvalSpec(
        dataset=str(DATA / "wiki.test.raw"),
        dataset_config=None,
        seq_len=SEQ_LEN,
        max_windows=args.windows,
    )
    windows = eval_ids(tokenizer, spec)
    rows = []
    for setting in SETTINGS:
        rows.append(evaluate(model, windows, setting))
        print(f"  {rows[-1]['kv_cache']}: {rows[-1]['perplexity']:.3f}", flush=True)
    report = {
        "benchmark": "kv_cache",
        "command": shlex.join(["python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct (smollm2-135m preset), float32",
        "attention": model.config._attn_implementation,
        "evaluation": {"file": "wiki.test.raw", "windows": len(windows), "seq_len": SEQ_LEN},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
