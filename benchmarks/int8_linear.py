"""W8A8 linear layers of SmolLM2-135M's shapes: integer kernels against float32.

For each linear shape of the model (q/o 576→576, k/v 576→192, gate/up 576→1536,
down 1536→576) and for 1 token and 512 tokens, times:

- ``fp32``: ``F.linear`` in float32 (what the unquantized model runs);
- ``int8``: ``quantmill.runtime.Int8Linear`` (per-token int8 activations,
  ``torch._int_mm`` int8×int8→int32, rescale), end to end;
- ``int_mm``: the integer matmul alone, on already-quantized inputs;
- ``llm.int8``: ``MixedInt8Linear`` with one planted outlier column.

Also checks that every int8 output matches the dequantized float reference.
Nothing else should run on the machine meanwhile.

    .venv/bin/python benchmarks/int8_linear.py   # writes benchmarks/results/int8_linear.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from quantmill.quant.int8 import quantize_rows_int8
from quantmill.runtime import Int8Linear, MixedInt8Linear

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (in_features, out_features)
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (576, 192),
    "gate_proj/up_proj": (576, 1536),
    "down_proj": (1536, 576),
}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def measure(in_f: int, out_f: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=False)
    q, scale = quantize_rows_int8(linear.weight.data)
    int8 = Int8Linear(q, scale, None)
    mixed = MixedInt8Linear(q, scale, None, threshold=6.0)
    x = torch.randn(tokens, in_f)
    x_outlier = x.clone()
    x_outlier[:, 7] = 20.0
    qx = torch.randint(-127, 128, (tokens, in_f), dtype=torch.int8)
    reference = x @ (q.float() * scale[:, None]).t()
    error = float((int8(x) - reference).abs().max() / reference.abs().max())
    fp32 = timed(lambda: nn.functional.linear(x, linear.weight), repeats)
    ours = timed(lambda: int8(x), repeats)
    raw = timed(lambda: torch._int_mm(qx, int8.qweight_t), repeats)
    llm = timed(lambda: mixed(x_outlier), repeats)
    flops = 2 * tokens * in_f * out_f
    return {
        "tokens": tokens,
        "in_features": in_f,
        "out_features": out_f,
        "fp32_us": fp32 * 1e6,
        "int8_us": ours * 1e6,
        "int_mm_us": raw * 1e6,
        "llm_int8_us": llm * 1e6,
        "speedup_int8_vs_fp32": fp32 / ours,
        "speedup_int_mm_vs_fp32": fp32 / raw,
        "fp32_gflops": flops / fp32 / 1e9,
        "int_mm_gops": flops / raw / 1e9,
        "max_rel_error_vs_dequantized": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "int8_linear.json"))
    args = parser.parse_args()
    rows = []
    for name, (in_f, out_f) in SHAPES.items():
        for tokens in (1, 512):
            row = {"layer": name, **measure(in_f, out_f, tokens, args.repeats)}
            rows.append(row)
            print(
                f"{name:18s} {tokens:4d} tok  fp32 {row['fp32_us']:8.1f} µs"
                f"  int8 {row['int8_us']:8.1f} µs  int_mm {row['int_mm_us']:8.1f} µs"
                f"  llm.int8 {row['llm_int8_us']:8.1f} µs"
                f"  int8/fp32 ×{row['speedup_int8_vs_fp32']:.2f}"
                f"  err {row['max_rel_error_vs_dequantized']:.1e}",
                flush=True,
            )
    result = {
        "command": "benchmarks/int8_linear.py",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
