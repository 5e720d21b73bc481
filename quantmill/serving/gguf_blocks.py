"""GGUF block types that hold our integer grids exactly: pure, paired pack/unpack.

Each function takes the integers of a ``[rows, cols]`` weight (``cols`` a
multiple of 32, one group per 32 columns) with their per-group float16 scale
and returns the bytes llama.cpp reads, ``[rows, cols / 32 * block_bytes]``:

- Q4_0 (18 bytes): ``d`` float16, 16 bytes of nibbles; ``w = (n - 8) · d``.
  Symmetric 4-bit ``q ∈ [-8, 7]``: ``n = q + 8``, ``d = scale``.
- Q4_1 (20 bytes): ``d``, ``m`` float16, 16 bytes of nibbles; ``w = n · d + m``.
  Asymmetric 4-bit ``w = (q - z) · s``: ``n = q + 8``, ``d = s``, ``m = -(z + 8) · s``,
  rounded to float16 (the only step that can change a value; counted).
- Q8_0 (34 bytes): ``d`` float16, 32 int8; ``w = q · d``.

Nibble order is ggml's: byte ``j`` of a block holds element ``j`` in its low
four bits and element ``j + 16`` in its high four.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def _blocks(a: np.ndarray) -> np.ndarray:
    rows, cols = a.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} columns are not a whole number of {BLOCK}-wide blocks")
    return a.reshape(rows, cols // BLOCK, BLOCK)


def _nibbles(n: np.ndarray) -> np.ndarray:
    """``[rows, blocks, 32]`` values in 0..15 → ``[rows, blocks, 16]`` bytes."""
    n = n.astype(np.uint8)
    return n[..., :16] | (n[..., 16:] << np.uint8(4))


def _unnibble(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & np.uint8(0x0F), b >> np.uint8(4)], axis=-1)


def _half_bytes(x: np.ndarray) -> np.ndarray:
    """float16 ``[rows, blocks]`` → ``[rows, blocks, 2]`` bytes (little-endian)."""
    return np.ascontiguousarray(x.astype("<f2"))[..., None].view(np.uint8)


def _half(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2")[..., 0]


def _join(rows: int, *parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_q4_0(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit integers ``q`` ``[rows, cols]`` and float16 ``scale``."""
    if q.min() < -8 or q.max() > 7:
        raise ValueError("Q4_0 holds 4-bit integers in [-8, 7]")
    return _join(q.shape[0], _half_bytes(scale), _nibbles(_blocks(q.astype(np.int16) + 8)))


def unpack_q4_0(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_q4_0``: ``(q, scale)``."""
    b = data.reshape(data.shape[0], -1, 18)
    q = _unnibble(b[..., 2:]).astype(np.int8) - 8
    return q.reshape(data.shape[0], -1), _half(b[..., :2])


def q4_1_minimum(scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, int]:
    """``m = -(zero + 8) · scale`` as float16, and how many groups rounding changed."""
    exact = -(zero.astype(np.float32) + 8) * scale.astype(np.float32)
    m = exact.astype(np.float16)
    return m, int((m.astype(np.float32) != exact).sum())


def pack_q4_1(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, int]:
    """Asymmetric 4-bit ``q`` with float16 ``scale`` and integer ``zero`` per group;
    returns the bytes and the number of groups whose minimum float16 rounded."""
    if q.min() < -8 or q.max() > 7:
        raise ValueError("Q4_1 holds 4-bit integers in [-8, 7]")
    m, rounded = q4_1_minimum(scale, zero)
    n = _blocks(q.astype(np.int16) + 8)
    return _join(q.shape[0], _half_bytes(scale), _half_bytes(m), _nibbles(n)), rounded


def unpack_q4_1(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``pack_q4_1``: ``(n, d, m)`` with ``n`` in 0..15 (``w = n · d + m``)."""
    b = data.reshape(data.shape[0], -1, 20)
    n = _unnibble(b[..., 4:]).reshape(data.shape[0], -1)
    return n, _half(b[..., :2]), _half(b[..., 2:4])


def pack_q8_0(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit integers ``q`` ``[rows, cols]`` and float16 ``scale``."""
    qb = _blocks(q.astype(np.int8)).view(np.uint8)
    return _join(q.shape[0], _half_bytes(scale), qb)


def unpack_q8_0(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_q8_0``: ``(q, scale)``."""
    b = data.reshape(data.shape[0], -1, 34)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(data.shape[0], -1)
    return q, _half(b[..., :2])
