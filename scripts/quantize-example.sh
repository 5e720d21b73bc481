#!/usr/bin/env bash
# The main job: GPTQ 4-bit (groups of 64) on the real SmolLM2-135M, then its
# evaluation against the original. No server needed. Arguments are passed on
# to `quantmill quantize` (e.g. --recipe recipes/gptq-w3g64.yaml).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
DATA="${QUANTMILL_DATA_DIR:-../shared/data}"
ARGS=(--model smollm2-135m --recipe recipes/gptq-w4g64.yaml
      --out outputs/smollm2-135m-gptq-w4g64 --overwrite)
# Local WikiText-2 files where they exist; otherwise the recipe's `datasets` names.
if [ -f "$DATA/wikitext-2/wiki.valid.tokens" ]; then
    ARGS+=(--calib-data "$DATA/wikitext-2/wiki.valid.tokens"
           --eval-data "$DATA/wikitext-2/wiki.test.raw")
fi
exec .venv/bin/quantmill quantize "${ARGS[@]}" "$@"
