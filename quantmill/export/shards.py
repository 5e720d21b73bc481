"""Write a checkpoint's tensors into safetensors shards as they are produced.

Tensors are appended, one at a time, to the data file of the shard being
filled; when the next tensor would take it past ``max_shard_bytes`` the shard
is closed: its header (known only now) and its data become the shard file.
So memory never holds more than the tensor being written, and an 80-block
model needs no more disk than its output and one shard.

``state()`` describes everything written so far in a small dict; a writer
built from that dict continues exactly where it was (the data file is cut
back to the recorded length), which is how an interrupted run resumes with
byte-identical output. ``finish()`` names the shards the way transformers
does (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from quantmill.errors import OutOfSpaceError
from quantmill.folder import INDEX_FILE, SINGLE_WEIGHTS_FILE, shard_name
from quantmill.tensorfile import DTYPE_CODES, Entry, encode_header, entry_for, tensor_bytes

COPY_CHUNK = 16 << 20  # bytes per read/write when copying raw tensor data


@dataclass
class Shard:
    number: int  # 1-based
    entries: dict[str, Entry] = field(default_factory=dict)
    closed: bool = False

    @property
    def data_bytes(self) -> int:
        return max((e.end for e in self.entries.values()), default=0)

    def to_dict(self) -> dict[str, Any]:
        entries = {name: e.to_json() for name, e in self.entries.items()}
        return {"number": self.number, "closed": self.closed, "entries": entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        entries = {name: Entry.from_json(e) for name, e in data["entries"].items()}
        return cls(data["number"], entries, data["closed"])


class ShardWriter:
    """Append tensors to shards in ``folder``; see the module docstring."""

    def __init__(
        self, folder: Path, max_shard_bytes: int, state: dict[str, Any] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        shards = [Shard.from_dict(s) for s in (state or {}).get("shards", [])]
        self.shards = shards or [Shard(1)]
        self.written = 0  # bytes of tensor data written by this process
        self._open_data()

    # --- writing -------------------------------------------------------------------
    def add(self, name: str, tensor: Tensor) -> None:
        """Append one tensor (moved to CPU memory first)."""
        tensor = tensor.detach().cpu().contiguous()
        self._make_room(tensor.numel() * tensor.element_size())
        entry = entry_for(tensor, self.current.data_bytes)
        self._write(tensor_bytes(tensor), entry.nbytes)
        self.current.entries[name] = entry

    def add_raw(self, name: str, entry: Entry, source: Path, data_start: int) -> None:
        """Append a tensor copied byte for byte from another safetensors file."""
        self._make_room(entry.nbytes)
        start = self.current.data_bytes
        placed = Entry(entry.dtype, entry.shape, start, start + entry.nbytes)
        with source.open("rb") as fh:
            fh.seek(data_start + entry.start)
            left = entry.nbytes
            while left:
                chunk = fh.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise OSError(errno.EIO, f"{source} ended while copying {name}")
                self._write(memoryview(chunk), len(chunk))
                left -= len(chunk)
        self.current.entries[name] = placed

    def add_rows(self, name: str, shape: tuple[int, ...], parts: Iterator[Tensor]) -> None:
        """Append one tensor of ``shape`` given as consecutive row blocks (never whole)."""
        start = self.current.data_bytes
        dtype = None
        for part in parts:
            part = part.detach().cpu().contiguous()
            if dtype is None:
                dtype = part.dtype
                self._make_room(math.prod(shape) * part.element_size())
                start = self.current.data_bytes
            self._write(tensor_bytes(part), part.numel() * part.element_size())
        if dtype is None:
            raise ValueError(f"{name}: no rows given")
        entry = Entry(DTYPE_CODES[dtype], tuple(shape), start, 0)
        end = start + math.prod(shape) * dtype.itemsize
        if self._data.tell() != end:
            raise ValueError(f"{name}: the rows given do not make a {list(shape)} tensor")
        self.current.entries[name] = Entry(entry.dtype, entry.shape, start, end)

    def state(self) -> dict[str, Any]:
        """Everything written so far, for the journal (after ``flush``)."""
        self.flush()
        return {"shards": [s.to_dict() for s in self.shards]}

    def flush(self) -> None:
        self._data.flush()
        os.fsync(self._data.fileno())

    def finish(self) -> dict[str, str]:
        """Close the last shard, give every shard its final name, write the index.

        Returns the weight map (tensor name → file name).
        """
        if self.current.entries or len(self.shards) == 1:
            self._close_current()
        else:  # an empty shard opened after the last close: drop it
            self._data.close()
            self._data_path(self.current).unlink(missing_ok=True)
            self.shards.pop()
        total = len(self.shards)
        weight_map: dict[str, str] = {}
        for shard in self.shards:
            final = SINGLE_WEIGHTS_FILE if total == 1 else shard_name(shard.number, total)
            os.replace(self._closed_path(shard), self.folder / final)
            weight_map.update({name: final for name in shard.entries})
        if total > 1:
            size = sum(e.nbytes for s in self.shards for e in s.entries.values())
            weights = dict(sorted(weight_map.items()))
            index = {"metadata": {"total_size": size}, "weight_map": weights}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()

    # --- internals -----------------------------------------------------------------
    @property
    def current(self) -> Shard:
        return self.shards[-1]

    def _data_path(self, shard: Shard) -> Path:
        return self.folder / f"shard-{shard.number:05d}.data"

    def _closed_path(self, shard: Shard) -> Path:
        return self.folder / f"shard-{shard.number:05d}.safetensors"

    def _open_data(self) -> None:
        path = self._data_path(self.current)
        self._data = path.open("r+b" if path.exists() else "wb")
        self._data.truncate(self.current.data_bytes)  # drop what no journal entry covers
        self._data.seek(self.current.data_bytes)

    def _make_room(self, nbytes: int) -> None:
        full = self.current.data_bytes + nbytes > self.max_shard_bytes
        if full and self.current.entries:
            self._close_current()
            self.shards.append(Shard(len(self.shards) + 1))
            self._open_data()

    def _write(self, data: memoryview, nbytes: int) -> None:
        try:
            self._data.write(data)
        except OSError as exc:
            raise self._no_space(exc, nbytes) from exc
        self.written += nbytes

    def _close_current(self) -> None:
        """The shard file: its header, then its data file's bytes; the data file goes."""
        shard = self.current
        data_path, closed = self._data_path(shard), self._closed_path(shard)
        self.flush()
        self._data.close()
        partial = closed.with_suffix(".partial")
        try:
            with partial.open("wb") as out, data_path.open("rb") as data:
                out.write(encode_header(shard.entries))
                shutil.copyfileobj(data, out, COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise self._no_space(exc, shard.data_bytes) from exc
        os.replace(partial, closed)
        data_path.unlink()
        shard.closed = True

    def _no_space(self, exc: OSError, nbytes: int) -> Exception:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        free = shutil.disk_usage(self.folder).free
        return OutOfSpaceError(
            f"no space left on the device of {self.folder} while writing a checkpoint shard: "
            f"{nbytes / 1e6:.1f} MB more were needed at that moment and {free / 1e6:.1f} MB "
            "are free",
            folder=self.folder,
            needed=nbytes,
        )
