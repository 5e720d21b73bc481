"""A content-keyed file cache for work worth doing once: prepared calibration
data and calibration statistics.

Keys hash the inputs that determine the result (model commit hash,
calibration spec, code version); an entry appears only when complete, so an
interrupted run never leaves a half-written file that a later run would trust.
With S3 storage configured (``quantmill.storage``) the bucket mirrors the
cache: a local miss is looked up there before any work, and a file made here
is uploaded, so other machines reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantmill import __version__
from quantmill.sources import cache_root
from quantmill.storage import remote_store

# The modules whose code decides what a cached file holds: a change to any of
# them changes the code version and so every key.
_KEYED_MODULES = ("data", "stats", "driver", "arch", "models", "quant/gptq")


def code_version() -> str:
    """quantmill's version plus a digest of the modules that produce cached files."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KEYED_MODULES:
        digest.update((root / f"{name}.py").read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def cache_key(**parts: Any) -> str:
    """A short stable hash of ``parts`` (JSON-serialisable values)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_file(
    kind: str, key: str, name: str, produce: Callable[[Path], None]
) -> tuple[Path, bool]:
    """``(path, hit)``: the cached ``<kind>/<key>/<name>``, made by ``produce(tmp)`` on a miss.

    ``produce`` writes a temporary file that is renamed into place only when it
    returns, so concurrent or interrupted runs never expose a partial file.
    A hit in the S3 mirror counts as a hit.
    """
    path = cache_root() / kind / key / name
    if path.is_file():
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    store = remote_store()
    remote_key = f"cache/{kind}/{key}/{name}"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        hit = store is not None and store.download(remote_key, Path(tmp))
        if not hit:
            produce(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if store is not None and not hit:
        store.upload(path, remote_key)
    return path, hit
