"""The safetensors file format, read and written a tensor at a time.

A file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``, padded with
spaces), then the tensors' bytes, back to back with no gaps. ``encode_header``
and ``decode_header`` are a pure pair; readers here never map a whole file, so
reading one tensor costs that tensor's bytes and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
ITEM_BYTES = {code: dtype.itemsize for dtype, code in DTYPE_CODES.items()}
HEADER_ALIGN = 8  # the data section starts 8-byte aligned, as safetensors' own writer does
FORMAT_METADATA = {"format": "pt"}  # what transformers checks before loading a file


class HeaderError(ValueError):
    """A file's header is not a valid safetensors header (or does not match its size)."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie inside a file's data section."""

    dtype: str  # safetensors dtype code ("BF16", "I32", ...)
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        offsets = [self.start, self.end]
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": offsets}

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        start, end = data["data_offsets"]
        return cls(data["dtype"], tuple(data["shape"]), int(start), int(end))


def encode_header(entries: dict[str, Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for ``entries``, padded so the data is aligned."""
    body: dict = {"__metadata__": dict(metadata or FORMAT_METADATA)}
    body.update({name: entries[name].to_json() for name in sorted(entries)})
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def decode_header(blob: bytes) -> tuple[dict[str, Entry], dict[str, str], int]:
    """``(entries, metadata, data_start)`` from the first bytes of a file (at least the header)."""
    if len(blob) < 8:
        raise HeaderError("the file is shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise HeaderError(f"the header claims {length} bytes but the file is shorter")
    try:
        body = json.loads(blob[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"the header is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise HeaderError("the header is not a JSON object")
    metadata = body.pop("__metadata__", None) or {}
    try:
        entries = {name: Entry.from_json(value) for name, value in body.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise HeaderError(f"a header entry is malformed ({exc})") from None
    return entries, metadata, 8 + length


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str], int]:
    """Decode ``path``'s header and check that its data section is exactly covered."""
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"{path.stat().st_size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 << 20:
            raise HeaderError(f"the header length {length} is implausible (corrupted file)")
        entries, metadata, data_start = decode_header(prefix + fh.read(length))
    check_coverage(entries, path.stat().st_size - data_start)
    return entries, metadata, data_start


def check_coverage(entries: dict[str, Entry], data_bytes: int) -> None:
    """Entries must tile the data section without gaps, each its dtype × shape in size."""
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        if entry.dtype not in ITEM_BYTES:
            raise HeaderError(f"tensor {name} has unknown dtype {entry.dtype!r}")
        if entry.start != end or entry.nbytes != math.prod(entry.shape) * ITEM_BYTES[entry.dtype]:
            raise HeaderError(f"tensor {name}'s offsets do not fit its shape and place")
        end = entry.end
    if end != data_bytes:
        raise HeaderError(
            f"the header describes {end} bytes of tensor data but the file holds {data_bytes}"
            + (" (the file is truncated)" if data_bytes < end else "")
        )


def read_tensor(path: Path, entry: Entry, data_start: int, rows: slice | None = None) -> Tensor:
    """One tensor (or a range of its first dimension) read into a fresh CPU tensor."""
    start, shape = entry.start, list(entry.shape)
    if rows is not None:
        row_bytes = entry.nbytes // max(shape[0], 1)
        first, last, _ = rows.indices(shape[0])
        start += first * row_bytes
        shape[0] = max(0, last - first)
    nbytes = math.prod(shape) * ITEM_BYTES[entry.dtype]
    buffer = bytearray(nbytes)
    with path.open("rb") as fh:
        fh.seek(data_start + start)
        if fh.readinto(buffer) != nbytes:
            raise HeaderError(f"{path} ended while reading a tensor (truncated)")
    dtype = CODE_DTYPES[entry.dtype]
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def entry_for(tensor: Tensor, start: int) -> Entry:
    nbytes = tensor.numel() * tensor.element_size()
    return Entry(DTYPE_CODES[tensor.dtype], tuple(tensor.shape), start, start + nbytes)


def write_file(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` as one safetensors file, one tensor in CPU memory at a time."""
    entries, start = {}, 0
    for name, tensor in tensors.items():
        entries[name] = entry_for(tensor, start)
        start = entries[name].end
    with path.open("wb") as fh:
        fh.write(encode_header(entries))
        for name in sorted(entries, key=lambda n: entries[n].start):
            fh.write(tensor_bytes(tensors[name].detach().cpu()))
        fh.flush()
        os.fsync(fh.fileno())


def read_file(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (checked against its header first)."""
    entries, _, data_start = read_header(path)
    return {name: read_tensor(path, entry, data_start) for name, entry in entries.items()}
