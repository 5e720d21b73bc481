#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests on the real model.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
