#!/usr/bin/env bash
# The main job: the quantize flow (Prefect) with GPTQ 4-bit (groups of 64) on the
# real SmolLM2-135M, its evaluation against the original (perplexity and zero-shot
# accuracy), and an MLflow run.
# No server needed: Prefect starts a temporary local API and MLflow writes to
# ./mlruns (SQLite). Set PREFECT_API_URL / MLFLOW_TRACKING_URI to use servers.
# Arguments are passed on to `quantmill run` (e.g. --recipe gptq-w3g64).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
DATA="${QUANTMILL_DATA_DIR:-../shared/data}"
ARGS=(--model smollm2-135m --recipe gptq-w4g64 --out outputs/smollm2-135m-gptq-w4g64 --overwrite)
# Local WikiText-2 files where they exist; otherwise the recipe's `datasets` names.
if [ -f "$DATA/wikitext-2/wiki.valid.tokens" ]; then
    ARGS+=(--calib-data "$DATA/wikitext-2/wiki.valid.tokens"
           --eval-data "$DATA/wikitext-2/wiki.test.raw")
else
    echo "quantize-example: no $DATA/wikitext-2/wiki.valid.tokens (set QUANTMILL_DATA_DIR" \
         "to the folder holding wikitext-2/ and zero-shot/); using the recipe's Hub datasets" >&2
fi
# Zero-shot accuracy (lm-evaluation-harness) on the first 200 questions of ARC-Easy and
# PIQA, from their local copies; without them the harness would need the Hub.
if [ -f "$DATA/zero-shot/arc_easy.jsonl" ]; then
    ARGS+=(--tasks arc_easy,piqa --limit 200 --task-data "$DATA/zero-shot")
fi
exec .venv/bin/quantmill run "${ARGS[@]}" "$@"
