"""The one cache: work worth doing once, keyed by what decides its result.

Prepared calibration data, calibration statistics, the original model's
perplexity and text generated for data-free training all live here, under
``<cache root>/<kind>/<key>/<name>``. Keys hash the inputs that determine the
result plus the code version (``cache_key``). Each entry is written with a
sha256 checksum beside it (``<name>.sha256``, in place before the entry
itself), so an interrupted run never leaves a half-written file a later run
would trust, and an entry is verified on every read: a damaged one is dropped
with a warning naming it and made again. With S3 storage configured
(``quantmill.storage``) the bucket mirrors the cache, checksums included: a
local miss is looked up there before any work, and a file made here is
uploaded, so other machines reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantmill import __version__
from quantmill.hashing import file_sha256
from quantmill.sources import cache_root
from quantmill.storage import remote_store

log = logging.getLogger(__name__)

# The modules whose code decides what a cached entry holds: a change to any of
# them changes the code version and so every key.
_KEYED_MODULES = (
    "data", "stats", "driver", "arch", "models", "quant/gptq", "evaluate", "qat/data",
    "accuracy/harness",
)  # fmt: skip


def code_version() -> str:
    """quantmill's version plus a digest of the modules that produce cached entries."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KEYED_MODULES:
        digest.update((root / f"{name}.py").read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def cache_key(**parts: Any) -> str:
    """A short stable hash of ``parts`` (JSON-serialisable values) and the code version."""
    text = json.dumps({**parts, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_file(
    kind: str, key: str, name: str, produce: Callable[[Path], None]
) -> tuple[Path, bool]:
    """``(path, hit)``: the cached ``<kind>/<key>/<name>``, made by ``produce(tmp)`` on a miss.

    ``produce`` writes a temporary file that is renamed into place only when it
    returns. A hit is a file whose checksum matches; a hit in the S3 mirror counts.
    """
    path = cache_root() / kind / key / name
    if _verified(path):
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    store = remote_store()
    remote = f"cache/{kind}/{key}/{name}"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        checksum = _download(store, remote, Path(tmp)) if store is not None else None
        hit = checksum is not None
        if not hit:
            produce(Path(tmp))
        _place(Path(tmp), path, checksum or file_sha256(Path(tmp)))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if store is not None and not hit:
        store.upload(_checksum_file(path), remote + ".sha256")
        store.upload(path, remote)
    return path, hit


def cached_json(kind: str, key: str, produce: Callable[[], Any]) -> tuple[Any, bool]:
    """``(value, hit)``: a JSON value cached like a file (``<kind>/<key>/value.json``)."""

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(produce()))

    path, hit = cached_file(kind, key, "value.json", write)
    return json.loads(path.read_text()), hit


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path) -> bool:
    """True when ``path`` exists and matches its checksum; a damaged entry is dropped."""
    if not path.is_file():
        return False
    checksum = _checksum_file(path)
    expected = checksum.read_text().strip() if checksum.is_file() else None
    if expected == file_sha256(path):
        return True
    why = "has no checksum" if expected is None else "does not match its checksum"
    log.warning("cache entry %s %s: dropped, making it again", path, why)
    path.unlink(missing_ok=True)
    checksum.unlink(missing_ok=True)
    return False


def _place(tmp: Path, path: Path, checksum: str) -> None:
    """Checksum first, then the entry: a reader never sees an entry without its checksum."""
    sums = _checksum_file(path)
    fd, partial = tempfile.mkstemp(prefix=f".{sums.name}.", suffix=".partial", dir=sums.parent)
    with os.fdopen(fd, "w") as out:  # a name of its own: two writers of one entry may race
        out.write(checksum + "\n")
    os.replace(partial, sums)
    os.replace(tmp, path)


def _download(store, remote: str, tmp: Path) -> str | None:
    """The checksum of ``remote`` when the mirror holds it and it matches, else None."""
    sums = tmp.with_name(tmp.name + ".sha256")
    try:
        if not store.download(remote + ".sha256", sums) or not store.download(remote, tmp):
            return None
        checksum = sums.read_text().strip()
        if file_sha256(tmp) == checksum:
            return checksum
        log.warning("cache entry %s in the S3 mirror does not match its checksum: ignored", remote)
        return None
    finally:
        sums.unlink(missing_ok=True)
