"""Content identities of files and folders, recorded so that a run can be reproduced."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file's contents, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def folder_hash(path: Path) -> str:
    """A cheap identity for a local folder: names, sizes, modification times and
    config contents (rewritten weights change it; hashing gigabytes would not pay)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return "sha256:" + digest.hexdigest()
