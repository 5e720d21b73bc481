"""Resolve a model source to local files: the Hub (revision pinned to a commit hash),
a local folder, a GGUF file or a preset."""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from quantmill.errors import QuantmillError
from quantmill.sources import resolve_model

DOWNLOAD_RETRIES = 2
DOWNLOAD_TIMEOUT_S = 3600


def retry_transient(task, task_run, state) -> bool:
    """Retry network and server failures; a wrong id or path fails at once."""
    exc = state.data
    if isinstance(exc, QuantmillError):
        return bool(getattr(exc, "transient", False))
    return isinstance(exc, (OSError, TimeoutError))


# Task options for work that talks to a remote service (the Hub): transient
# failures are retried twice, after about 5 s and 10 s.
TRANSIENT_RETRIES = {
    "retries": DOWNLOAD_RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}


@task(name="download-model", timeout_seconds=DOWNLOAD_TIMEOUT_S, **TRANSIENT_RETRIES)
def download_model(model: str, revision: str | None = None) -> dict[str, Any]:
    """``ResolvedModel.to_dict()`` plus ``seconds``; ``revision`` is a commit or content hash."""
    start = time.perf_counter()
    resolved = resolve_model(model, revision)
    return {**resolved.to_dict(), "seconds": time.perf_counter() - start}
