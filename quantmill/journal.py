"""One writer per output folder, a journal of finished work, and resume after a crash.

A run into ``OUT`` holds a lock in ``.OUT.journal/`` (a second run into the
same folder is refused and told who holds it), builds the checkpoint in
``.OUT.partial/`` and records what it finished in ``.OUT.journal/journal.json``
together with a fingerprint of everything that decides the output. Run the
same command again after a crash or ``kill -9`` and the journal says where to
continue; a changed fingerprint starts afresh and says what changed. When the
run ends well ``.OUT.partial`` becomes ``OUT`` (an existing ``OUT`` is replaced
only then, with ``--overwrite``) and the journal goes. A run that fails before
it finished anything leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill import __version__
from quantmill.errors import ExportError, RunLockedError
from quantmill.folder import JOURNAL_FILE, LOCK_FILE, RECIPE_FILE, RunFolders

log = logging.getLogger(__name__)
JOURNAL_FORMAT = 1
# Modules that only present results: a change to them cannot change a checkpoint.
_PRESENTATION = {"cli.py", "report.py", "card.py", "plots.py", "compare.py", "gate.py",
                 "digest.py", "storage.py", "outliers.py"}  # fmt: skip


def code_version() -> str:
    """quantmill's version and a digest of every library module that shapes an output."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.name not in _PRESENTATION:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


@dataclass
class Stage:
    """A run's working folders and what an earlier run into the same output left."""

    folders: RunFolders
    fingerprint: dict[str, Any]
    state: dict[str, Any] | None = None  # the journal's state when resuming, else None
    progress: bool = False  # True once something worth resuming is journaled
    notes: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """Where the checkpoint is built (it becomes ``out``)."""
        return self.folders.staging

    @property
    def work(self) -> Path:
        """Where run state that never reaches the checkpoint is kept (saved activations)."""
        return self.folders.journal

    def save(self, state: dict[str, Any]) -> None:
        """Journal ``state`` atomically (after what it describes is on disk)."""
        data = {"format": JOURNAL_FORMAT, "fingerprint": self.fingerprint, "state": state}
        _write_atomic(self.work / JOURNAL_FILE, json.dumps(data, indent=1))  # order kept
        self.progress = True


@contextmanager
def staged_run(
    out: Path, fingerprint: dict[str, Any], *, resume: bool = True, overwrite: bool = False
) -> Iterator[Stage]:
    """Lock ``out``, decide between resuming and a fresh start, and yield the stage.

    On success the staging folder becomes ``out``. On failure the stage is kept
    when it journaled progress (the same command resumes), else removed.
    """
    folders = RunFolders(Path(out))
    check_output(folders.out, overwrite)  # before anything is created
    existed = folders.journal.exists()
    _make_dir(folders.journal)
    with _locked(folders.journal / LOCK_FILE, folders.out):
        try:
            check_output(folders.out, overwrite)  # again: another run may have just finished
        except ExportError:
            if not existed:
                shutil.rmtree(folders.journal, ignore_errors=True)
            raise
        _clean_leftovers(folders)
        stage = Stage(folders, fingerprint)
        stage.state = _previous_state(folders, fingerprint, resume)
        stage.progress = stage.state is not None
        if stage.state is None:
            shutil.rmtree(folders.staging, ignore_errors=True)
            _make_dir(folders.staging)
        try:
            yield stage
        except BaseException:
            if stage.progress:
                log.warning(
                    "the unfinished run is kept in %s (with its journal in %s); run the same "
                    "command again to resume it, or pass --no-resume to start afresh",
                    folders.staging, folders.journal,
                )  # fmt: skip
            else:
                shutil.rmtree(folders.staging, ignore_errors=True)
                shutil.rmtree(folders.journal, ignore_errors=True)
            raise
        _finalize(folders)


def check_output(out: Path, overwrite: bool) -> None:
    """``out`` must be a folder that is absent, empty or (with ``overwrite``) replaceable,
    somewhere this process can write (tried, not guessed from permission bits)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"output folder {out} already exists and is not empty; "
                "choose another --out or pass --overwrite"
            )
        if not (out / RECIPE_FILE).is_file():
            raise ExportError(
                f"output folder {out} was not written by quantmill (it has no {RECIPE_FILE}); "
                "--overwrite replaces only quantmill's checkpoints: choose another --out or "
                "empty it yourself"
            )
    check_writable(out)


def check_outputs(folders: list[str | Path], overwrite: bool) -> None:
    """``check_output`` on each folder a run or a sweep writes."""
    for folder in folders:
        check_output(Path(folder), overwrite)


def check_writable(out: Path) -> None:
    """Create and remove a folder beside ``out``: a read-only disk, a missing permission or
    a path under a file fails here, before any work, naming the place."""
    where = next((p for p in [out.parent, *out.parents] if p.exists()), Path("."))
    if not where.is_dir():
        raise ExportError(f"--out {out} is inside {where}, which is a file; choose another --out")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".quantmill-probe-", dir=where))
    except OSError as exc:
        raise ExportError(
            f"--out {out}: cannot write in {where} ({exc.strerror}); choose an --out where "
            "you can write"
        ) from None
    probe.rmdir()


def _previous_state(folders: RunFolders, fingerprint: dict, resume: bool) -> dict | None:
    """The journaled state to resume from, or None (saying why when one is discarded)."""
    path = folders.journal / JOURNAL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("the journal %s is unreadable; starting afresh", path)
        return None
    if not resume:
        log.warning("--no-resume: discarding the unfinished run in %s", folders.staging)
        return None
    if data.get("format") != JOURNAL_FORMAT or not folders.staging.is_dir():
        log.warning("the unfinished run in %s cannot be resumed; starting afresh", folders.staging)
        return None
    changed = differences(data.get("fingerprint") or {}, fingerprint)
    if changed:
        log.warning(
            "not resuming the unfinished run in %s: %s changed since it started; starting afresh",
            folders.staging, ", ".join(changed),
        )  # fmt: skip
        return None
    return data["state"]


def differences(before: Any, now: Any, path: str = "") -> list[str]:
    """Dotted names of the fingerprint parts that differ, down to the field
    (``recipe.steps.0.weights.bits``)."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(set(before) | set(now))
        pairs = [(f"{path}{k}", before.get(k), now.get(k)) for k in keys]
    elif isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        pairs = [(f"{path}{i}", a, b) for i, (a, b) in enumerate(zip(before, now, strict=True))]
    else:
        return [path.rstrip(".")] if before != now else []
    changed = []
    for name, a, b in pairs:
        if a != b:
            changed += differences(a, b, name + ".") or [name]
    return changed


def _finalize(folders: RunFolders) -> None:
    """Move the finished checkpoint into place, replacing an old one only now."""
    out, staging = folders.out, folders.staging
    if out.exists():
        shutil.rmtree(folders.replaced, ignore_errors=True)
        os.replace(out, folders.replaced)
    os.replace(staging, out)
    shutil.rmtree(folders.replaced, ignore_errors=True)
    shutil.rmtree(folders.journal, ignore_errors=True)


def _clean_leftovers(folders: RunFolders) -> None:
    """Staging folders of older versions and a replaced output a crash left behind."""
    for path in [*folders.legacy(), folders.replaced]:
        if path.exists():
            log.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(path: Path, out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released when the process dies, even by kill -9)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise RunLockedError(
                f"output folder {out} is being written by another quantmill run ({holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"cannot create {path}: {exc.strerror}; choose an --out where you can write"
        ) from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
