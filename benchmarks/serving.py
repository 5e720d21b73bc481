"""Serving what we publish: each checkpoint in vLLM (CPU) and, as GGUF, in llama.cpp.

For the original SmolLM2-135M and each recipe's checkpoint (quantized here by
``quantmill quantize`` unless it exists in the work folder):

- our perplexity (the checkpoint's ``quantmill_eval.json``: the first 8 windows
  of 2048 tokens of WikiText-2 test) and plain ``transformers``' perplexity of
  the same folder on the same windows (they must agree within 0.1%);
- vLLM (``scripts/vllm-venv.sh``): greedy decode tokens per second at batch 1
  and 16, peak RSS;
- GGUF (``quantmill export --format gguf``, bit-exact where the grid allows;
  the original as float16): llama.cpp (``benchmarks/serving/setup-llamacpp.sh``)
  perplexity on the same token windows, batch-1 tokens per second, peak RSS,
  and whether every quantized tensor dequantizes exactly to our weights.

Every engine runs in its own process with the same threads (2).

    .venv/bin/python benchmarks/serving.py                      # ~15 min
    .venv/bin/python benchmarks/serving.py --recipes gptq-w4g32 rtn-w8a8

Writes ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
HERE = Path(__file__).resolve().parent / "serving"
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
LLAMACPP_PY = REPO / ".venv-llamacpp" / "bin" / "python"
THREADS = 2


def quantized(recipe: str, work: Path) -> Path:
    out = work / recipe
    if not (out / "quantmill_eval.json").is_file():
        cmd = [sys.executable, "-m", "app", "quantize", "--model", "smollm2-135m",
               "--recipe", recipe, "--out", str(out), "--overwrite", "-q", "--json",
               "--calib-data", str(DATA / "wiki.valid.tokens"),
               "--eval-data", str(DATA / "wiki.test.raw")]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    return out


def windows_file(model_dir: Path, work: Path) -> tuple[Path, torch.Tensor]:
    from transformers import AutoTokenizer

    from quantmill.config import EvalSpec
    from quantmill.data import eval_ids

    spec = EvalSpec(dataset=str(DATA / "wiki.test.raw"), seq_len=2048, max_windows=8)
    ids = eval_ids(AutoTokenizer.from_pretrained(model_dir), spec)
    path = work / "windows.npy"
    np.save(path, ids.numpy().astype(np.int64))
    return path, ids


def transformers_perplexity(folder: Path, ids: torch.Tensor) -> float:
    """Plain transformers (no quantmill runtime swaps): what its users get."""
    from transformers import AutoModelForCausalLM

    from quantmill.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # compressed-tensors decompresses on the model's first forward
        model(ids[:1, :4])
    return perplexity(model, ids, progress=False).perplexity


def run_json(cmd: list[str], mark: str = "") -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env=_env())
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(mark) and line[len(mark) :].lstrip().startswith("{"):
            return json.loads(line[len(mark) :])
    tail = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"error": f"exit {done.returncode}: {tail}"[:800]}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "OMP_NUM_THREADS": str(THREADS), "VLLM_CPU_OMP_THREADS_BIND": "all"}


def gguf_of(folder: Path, work: Path, name: str) -> tuple[Path | None, dict[str, Any]]:
    from quantmill.errors import ExportError
    from quantmill.serving.gguf_export import export_gguf

    out = work / f"{name}.gguf"
    try:
        report = export_gguf(folder, out, overwrite=True).to_dict()
    except ExportError as exc:
        return None, {"error": str(exc)}
    report["exact_tensors"] = exactness(folder, out)
    return out, report


def exactness(folder: Path, gguf_file: Path) -> dict[str, int]:
    """Quantized tensors of the GGUF whose dequantized values equal our weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantmill.serving.gguf_export import _dequantize, _grid, _schemes, _tensors
    from quantmill.serving.gguf_meta import ARCHS

    config = json.loads((folder / "config.json").read_text())
    schemes, arch = _schemes(config), ARCHS[config["model_type"]]
    tensors = {t.name: t for t in GGUFReader(str(gguf_file)).tensors}
    equal = differ = 0
    for module, leaf, found in _tensors(folder):
        grid = _grid(module, found, schemes.get(module)) if leaf == "weight" else None
        if grid is None:
            continue
        name = arch.tensor_name(f"{module}.{leaf}")
        ours = arch.permute(name, _dequantize(grid), config)
        t = tensors[name]
        theirs = dequantize(t.data, t.tensor_type).reshape(ours.shape)
        equal += int(np.array_equal(theirs, ours))
        differ += int(not np.array_equal(theirs, ours))
    return {"equal": equal, "different": differ}


def measure(name: str, folder: Path, ours: float | None, ids, windows: Path, work: Path, args):
    row: dict[str, Any] = {"name": name, "folder": str(folder), "ours_perplexity": ours}
    start = time.perf_counter()
    row["transformers_perplexity"] = transformers_perplexity(folder, ids)
    row["transformers_seconds"] = round(time.perf_counter() - start, 1)
    if ours is not None:
        row["transformers_vs_ours"] = row["transformers_perplexity"] / ours - 1
    if not args.skip_vllm:
        row["vllm"] = run_json(
            [str(VLLM_PY), str(HERE / "vllm_bench.py"), str(folder), "--tokens", "64"],
            "QUANTMILL_BENCH ",
        )
    if not args.skip_llamacpp:
        gguf_file, report = gguf_of(folder, work, name)
        row["gguf"] = report
        if gguf_file is not None:
            probe = [str(LLAMACPP_PY), str(HERE / "llamacpp_probe.py"), str(gguf_file),
                     "--windows", str(windows), "--threads", str(THREADS)]  # fmt: skip
            row["llamacpp"] = run_json(probe)
            reference = ours if ours is not None else row["transformers_perplexity"]
            if "perplexity" in row["llamacpp"]:
                row["llamacpp_vs_ours"] = row["llamacpp"]["perplexity"] / reference - 1
    print(json.dumps(row, indent=1, default=str)[:1500], flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["gptq-w4g32", "rtn-w4g64", "rtn-w8a8"])
    parser.add_argument("--work", default=str(REPO / "outputs" / "bench-serving"))
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from quantmill.sources import resolve_model

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    original = resolve_model("smollm2-135m").path
    windows, ids = windows_file(original, work)
    folders = {recipe: quantized(recipe, work) for recipe in args.recipes}
    summaries = {r: json.loads((f / "quantmill_eval.json").read_text()) for r, f in folders.items()}
    first = next(iter(summaries.values()), {})
    rows = [measure("original", original, (first.get("original") or {}).get("perplexity"),
                    ids, windows, work, args)]  # fmt: skip
    for recipe, folder in folders.items():
        ours = (summaries[recipe].get("quantized") or {}).get("perplexity")
        rows.append(measure(recipe, folder, ours, ids, windows, work, args))
    result = {
        "command": "benchmarks/serving.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": THREADS,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },  # fmt: skip
        "protocol": "perplexity: the first 8 windows of 2048 tokens of WikiText-2 test, the "
        "same token ids for every engine (quantmill's tokenization); speed: greedy decode "
        "of 64 new tokens after 'The capital of France is' (vLLM: bfloat16 activations, "
        "engine in process; llama.cpp: batch 1, the 16-token prefix of window 0)",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
