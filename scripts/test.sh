#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests on the real model.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
# The vLLM tests (tests/serving) run vLLM's CPU build from its own venv.
bash scripts/vllm-venv.sh
# The browser test drives Debian's Chromium: install it once when missing.
if ! command -v chromium >/dev/null 2>&1; then
    echo "test: installing chromium (Debian package) for the browser test" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; }
fi
# Two workers (pytest-xdist) keep both cores busy while the other waits on a server,
# a subprocess or a schedule; each module stays on one worker (tests/conftest.py).
# Waiting OpenMP threads sleep instead of spinning: with two workers (or a worker's
# flow runs) sharing the cores, spinning threads took 1.9x as long for the same work.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python -m pytest -n "${QUANTMILL_TEST_WORKERS:-2}" --dist loadgroup "$@"
