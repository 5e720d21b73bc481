#!/usr/bin/env bash
# llama.cpp's Python binding in a venv of its own (.venv-llamacpp): llama-cpp-python
# is a source package on PyPI, compiled here with cmake (several minutes on 2 cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV=".venv-llamacpp"
[ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null && exit 0
python3 -m venv "$VENV"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" "$VENV/bin/pip" install --quiet llama-cpp-python numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
