#!/usr/bin/env bash
# The whole test suite: unit tests, then integration tests on the real model.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
# The browser test drives Debian's Chromium: install it once when missing.
if ! command -v chromium >/dev/null 2>&1; then
    echo "test: installing chromium (Debian package) for the browser test" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; }
fi
exec .venv/bin/python -m pytest "$@"
