#!/usr/bin/env bash
# The engine on one CUDA GPU, in under 8 minutes: SmolLM2 GPTQ w4 g64 in bfloat16 with
# its perplexity, and the Llama-3.2-1B-shape GPTQ w4 g128 with its time and peak GPU
# memory. Nothing else in the project needs a GPU; run this where one is at hand:
#
#     bash benchmarks/gpu_check.sh [WORK]        # default WORK: /tmp/quantmill-gpu
#
# Prints one JSON object per run and writes them to WORK/gpu_check.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK="${1:-/tmp/quantmill-gpu}"
mkdir -p "$WORK"
export QUANTMILL_TORCH_SPEC="${QUANTMILL_TORCH_SPEC:-torch==2.13.0}"
bash scripts/bootstrap.sh
PY=.venv/bin/python
DATA="${QUANTMILL_DATA_DIR:-../shared/data}/wikitext-2"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this check needs one")'

"$PY" - "$WORK" "$DATA" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from quantmill.api import quantize
from quantmill.config import EngineSpec
from quantmill.recipe import load_recipe, parse_recipe, with_overrides
from random_models import write_model

work, data = Path(sys.argv[1]), Path(sys.argv[2])
engine = EngineSpec(device="cuda", dtype="bfloat16")
rows = []

def timed(label, model, recipe, out, evaluate):
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = quantize(model, recipe, out, evaluate=evaluate, overwrite=True, progress=False,
                       engine=engine)
    row = {"run": label, "wall_seconds": round(time.perf_counter() - start, 1),
           "quant_seconds": round(summary.quant_seconds, 1),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20),
           "device": torch.cuda.get_device_name(), **summary.engine}
    if summary.quantized:
        row["perplexity"] = summary.quantized["perplexity"]
        row["original_perplexity"] = summary.original["perplexity"]
    print(json.dumps(row), flush=True)
    rows.append(row)

recipe = with_overrides(load_recipe("gptq-w4g64"),
                        calib_data=str(data / "wiki.valid.tokens"),
                        eval_data=str(data / "wiki.test.raw"))
timed("smollm2 gptq w4g64 bf16", "smollm2-135m", recipe, work / "smollm2-gptq", True)

folder = work / "llama-3.2-1b"
if not (folder / "config.json").is_file():
    from quantmill.sources import resolve_model
    write_model("llama-3.2-1b", folder, resolve_model("smollm2-135m").path)
gptq = parse_recipe({
    "name": "gptq-w4g128",
    "steps": [{"method": "gptq", "weights": {"bits": 4, "group_size": 128, "observer": "minmax"},
               "actorder": True, "static_groups": True}],
    "calibration": {"dataset": str(data / "wiki.valid.tokens"), "num_samples": 16, "seq_len": 512},
})
timed("llama-3.2-1b shape gptq w4g128", str(folder), gptq, work / "1b-gptq", False)
(work / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
EOF
