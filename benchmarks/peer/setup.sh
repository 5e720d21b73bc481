#!/usr/bin/env bash
# Create the peer toolkit's own virtual environment (benchmarks/peer/.venv).
#
# llmcompressor pins transformers and compressed-tensors, so it never shares
# the project's .venv. torch is installed first and then held with a
# constraints file: any other torch request pulls the CUDA wheels (GBs).
# Idempotent: rerunning only checks that everything is already installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="$VENV/bin/python"
TORCH_SPEC="torch==2.13.0"
# 0.14.0.1 is the 0.14 patch release; override to compare another one.
LLMCOMPRESSOR_SPEC="${LLMCOMPRESSOR_SPEC:-llmcompressor==0.14.0.1}"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi

"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "$TORCH_SPEC" >&2

CONSTRAINTS="$VENV/constraints.txt"
"$PY" -m pip freeze | grep '^torch==' > "$CONSTRAINTS"
"$PY" -m pip install --quiet -c "$CONSTRAINTS" "$LLMCOMPRESSOR_SPEC" >&2

"$PY" -c 'import torch, llmcompressor; print("torch", torch.__version__, "llmcompressor", llmcompressor.__version__)' >&2
echo "$PY"
