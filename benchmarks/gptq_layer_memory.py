"""Peak memory and time of GPTQ on one large layer, this code against an earlier commit's
``quantmill/quant/gptq.py``, and whether the two give the same weights to the bit.

One layer of the Llama-3.2-1B shape's ``down_proj`` (2048 × 8192) by default, random
weights, a Hessian from random activations of uneven scale; GPTQ w4 g128 symmetric,
min-max, activation order with static groups (the engine's 1B settings). Each side runs
in its own process (through ``peak_rss.py``, glibc's mmap threshold pinned at 1 MiB on
both, 2 threads), so its peak resident memory is its own; the high-water mark is reset
(``/proc/self/clear_refs``) once the layer and its Hessian are built, so
``gptq_added_mb`` is what GPTQ itself adds on top of them.

    .venv/bin/python benchmarks/gptq_layer_memory.py --before 9f1a736~1

Writes ``benchmarks/results/gptq_layer_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.jsonfile import write_json  # noqa: E402
from benchmarks.machine import machine  # noqa: E402
from benchmarks.peak_rss import run_measured  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gptq_layer_memory.json"


def one_side(module_file: str, rows: int, cols: int, out: str) -> None:
    """In a child: build the layer, run that ``gptq.py``'s GPTQ once, save the result."""
    import importlib.util
    import time

    import torch

    from quantmill.config import QuantScheme

    spec = importlib.util.spec_from_file_location("gptq_side", module_file)
    gptq = importlib.util.module_from_spec(spec)
    sys.modules["gptq_side"] = gptq
    spec.loader.exec_module(gptq)
    torch.manual_seed(0)
    X = torch.randn(4096, cols) * (torch.rand(cols) * 3)
    H = X.t() @ X * (2 / X.shape[0])
    del X
    W = torch.randn(rows, cols) * 0.02
    scheme = QuantScheme(bits=4, group_size=128, symmetric=True, observer="minmax")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again here
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = gptq.gptq_quantize_weight(W, H, scheme, 128, 0.01, True, True)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    torch.save({"weight": result.weight, "scale": result.scale}, out)
    print(
        json.dumps(
            {
                "gptq_seconds": seconds,
                "rss_before_gptq_mb": before,
                "gptq_peak_rss_mb": peak,
                "gptq_added_mb": peak - before,
            }
        )
    )


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (kB) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def side(name: str, module_file: Path, args, work: Path) -> dict:
    out = work / f"{name}.pt"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "2",
           "MKL_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, __file__, "--side", str(module_file), str(args.rows),
           str(args.cols), str(out)]  # fmt: skip
    text, run = run_measured(cmd, work / f"{name}.log", cwd=REPO, env=env)
    if run["returncode"] != 0:
        raise SystemExit(f"{name} failed: see {work / f'{name}.log'}")
    return {"peak_rss_mb": run["peak_rss_kb"] / 1024, "wall_seconds": run["wall_seconds"],
            **json.loads(text.strip().splitlines()[-1]), "file": str(out)}  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--side":
        one_side(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old = work / "gptq_before.py"
        old.write_text(subprocess.run(
            ["git", "show", f"{before}:quantmill/quant/gptq.py"], cwd=REPO, check=True,
            capture_output=True, text=True).stdout)  # fmt: skip
        sides = {"before": side("before", old, args, work),
                 "now": side("now", REPO / "quantmill/quant/gptq.py", args, work)}  # fmt: skip
        a, b = (torch.load(sides[s].pop("file")) for s in ("before", "now"))
        identical = all(torch.equal(a[k], b[k]) for k in a)
    report = {
        "benchmark": "gptq_layer_memory",
        "command": "python benchmarks/gptq_layer_memory.py " + " ".join(sys.argv[1:]),
        "machine": machine(2),
        "layer": {"rows": args.rows, "cols": args.cols, "scheme": "w4 g128 symmetric, "
                  "min-max, actorder, static groups, dampening 0.01, block 128, float32"},
        "before_commit": before,
        "before": sides["before"],
        "now": sides["now"],
        "gptq_added_saved_mb": sides["before"]["gptq_added_mb"] - sides["now"]["gptq_added_mb"],
        "bit_identical": identical,
    }  # fmt: skip
    write_json(args.out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
