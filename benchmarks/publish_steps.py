"""Time each publishing step on a real checkpoint: model card, Hub upload (one
commit), a second upload of the same content (no commit), verification
(download into an empty cache, load, compare logits) and MLflow registration.

The Hub is the test suite's stand-in server (``tests/support/hub_server.py``)
on loopback, since the Hub cannot be reached here: upload and download times
measure the client and local disk, not a network. The registry is a local
SQLite store.

    .venv/bin/python benchmarks/publish_steps.py --checkpoint outputs/smollm2-135m-gptq-w4g64

Prints a table and writes ``benchmarks/results/publish_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a quantmill checkpoint folder")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/publish_steps.json"))
    args = parser.parse_args()
    checkpoint = str(Path(args.checkpoint).resolve())

    with tempfile.TemporaryDirectory(prefix="quantmill-publish-bench-") as tmp:
        os.environ["QUANTMILL_MLFLOW_DIR"] = str(Path(tmp) / "mlruns")
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        from tests.support.hub_server import running_hub

        token = "hf_benchmark_token"
        with running_hub(Path(tmp), tokens={token: "bench"}) as hub:
            os.environ["HF_ENDPOINT"], os.environ["HF_TOKEN"] = hub.endpoint, token
            figures = run_steps(checkpoint, "bench/publish-steps")

    size = sum(p.stat().st_size for p in Path(checkpoint).rglob("*") if p.is_file())
    result = {
        "checkpoint": checkpoint,
        "checkpoint_mb": round(size / 2**20, 1),
        "steps_s": figures,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "hub": "stand-in server on loopback (tests/support/hub_server.py)",
    }
    print(f"checkpoint: {checkpoint} ({result['checkpoint_mb']} MB)")
    print("| step | seconds |\n|---|---|")
    for step, seconds in figures.items():
        print(f"| {step} | {seconds:.2f} |")
    print(f"peak RSS of this process: {result['peak_rss_mb']} MB")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def run_steps(checkpoint: str, repo: str) -> dict[str, float]:
    from tasks.publish import publish_to_hub, verify_hub_upload, write_model_card
    from tasks.registry import register_model
    from tracking.adapter import mlflow_run

    figures: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        figures[name] = time.perf_counter() - start
        return out

    timed("model card", write_model_card.fn, checkpoint, repo)
    hub = timed("hub upload (one commit)", publish_to_hub.fn, checkpoint, repo, True, None)
    again = timed("hub upload again (no commit)", publish_to_hub.fn, checkpoint, repo, True, None)
    assert hub["new_revision"] and not again["new_revision"], (hub, again)
    check = timed(
        "verify (download, load, compare)",
        verify_hub_upload.fn,
        checkpoint,
        repo,
        hub["commit"],
        None,
    )
    assert check["match"], check
    with mlflow_run("publish-bench") as run:
        timed("mlflow registry (log + register)", register_model.fn, run, checkpoint)
        timed("mlflow registry again (reused)", register_model.fn, run, checkpoint)
    return figures


if __name__ == "__main__":
    main()
