"""Content digests of a checkpoint folder, in the forms the Hub reports them:
sha256 (LFS files) and the git blob sha1 (files kept in git), so a local folder
can be compared with a Hub revision without downloading it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    path: str  # relative, with forward slashes
    size: int
    sha256: str
    git_sha1: str

    def matches(self, blob_id: str | None, lfs_sha256: str | None) -> bool:
        """True when a remote file with these ids holds this file's bytes."""
        if lfs_sha256:
            return lfs_sha256 == self.sha256
        return blob_id == self.git_sha1


def file_digest(path: Path, name: str) -> FileDigest:
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return FileDigest(name, size, sha256.hexdigest(), sha1.hexdigest())


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of every file, hidden files and folders left out."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in name.split("/")):
            out.append((name, path))
    return out


def folder_digests(folder: Path) -> dict[str, FileDigest]:
    return {name: file_digest(path, name) for name, path in folder_files(folder)}


def folder_digest(folder: Path) -> str:
    """One sha256 over the names and contents of every file: the checkpoint's identity."""
    total = hashlib.sha256()
    for name, digest in folder_digests(folder).items():
        total.update(f"{name}\0{digest.sha256}\n".encode())
    return total.hexdigest()
