"""Rotate a checkpoint's residual stream and value heads, folded into its weights.

QuaRot (Ashkboos et al., 2024) and SpinQuant (Liu et al., 2024): for an
orthogonal ``Q`` the model computes the same function when the residual stream
``x`` is carried as ``x Q`` — the embedding rows become ``E Q``, every linear
reading the stream ``W Q`` (after the RMS norm before it folds its weight into
``W``: the norm of ``x Q`` is that of ``x``), every linear writing to it
``Qᵀ W``, the head ``W diag(g) Q``. Each value head may be rotated by a second
``H`` (``v`` rows by ``Hᵀ``, ``o_proj``'s matching columns by ``H``). No
rotation is left to do at run time, so the result is a plain checkpoint of the
same architecture that transformers and vLLM load; the head is untied from the
embedding (they differ now). What the rotation buys is incoherence: outlier
channels are spread over all channels, so the grids that follow fit better.

``write_rotated`` streams the source one block at a time into a new folder;
the quantization then reads that folder as it would the source.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from quantmill.arch import RotationSpec
from quantmill.export.shards import ShardWriter
from quantmill.lazy import LazyModel
from quantmill.quant.hadamard import random_hadamard, random_orthogonal

DONE_FILE = "rotation.json"  # written last: a folder without it is incomplete
ROW_CHUNK = 8192  # embedding rows rotated at a time


@dataclass(frozen=True)
class Rotations:
    residual: Tensor  # [hidden, hidden], orthogonal: the stream x is carried as x @ residual
    head: Tensor | None  # [head_dim, head_dim], orthogonal, or None (values not rotated)


def make_rotations(
    kind: str, seed: int, hidden: int, head_dim: int | None, device: torch.device
) -> Rotations:
    """The residual and value-head rotations, the same for the same arguments."""
    generator = torch.Generator().manual_seed(seed)
    build = random_hadamard if kind == "hadamard" else random_orthogonal
    residual = build(hidden, generator).float().to(device)
    head = None if head_dim is None else build(head_dim, generator).float().to(device)
    return Rotations(residual, head)


def rotate_block(
    tensors: dict[str, Tensor], spec: RotationSpec, rot: Rotations, norm_offset: float = 0.0
) -> dict[str, Tensor]:
    """One decoder block's tensors (names inside the block, float32) rotated."""
    out = dict(tensors)
    Q = rot.residual
    for norm, readers in spec.norms:
        g = out[f"{norm}.weight"] + norm_offset
        for reader in readers:
            out[f"{reader}.weight"] = (out[f"{reader}.weight"] * g[None, :]) @ Q
        out[f"{norm}.weight"] = torch.full_like(g, 1.0 - norm_offset)
    for writer in spec.writers:
        out[f"{writer}.weight"] = Q.T @ out[f"{writer}.weight"]
        if f"{writer}.bias" in out:
            out[f"{writer}.bias"] = out[f"{writer}.bias"] @ Q
    if rot.head is not None and spec.values is not None:
        v, o = spec.values
        H = rot.head
        d = H.shape[0]
        W = out[f"{v}.weight"]
        out[f"{v}.weight"] = (H.T @ W.view(-1, d, W.shape[1])).reshape(W.shape)
        if f"{v}.bias" in out:
            out[f"{v}.bias"] = (out[f"{v}.bias"].view(-1, d) @ H).reshape(-1)
        W = out[f"{o}.weight"]
        out[f"{o}.weight"] = (W.view(W.shape[0], -1, d) @ H).reshape(W.shape)
    return out


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_rotated(
    lazy: LazyModel, folder: Path, kind: str, seed: int, heads: bool, progress: bool = True
) -> Path:
    """``lazy``'s checkpoint, rotated, written to ``folder`` (config and weights), one
    block in memory at a time; an earlier complete folder with the same rotation is kept."""
    settings = {"kind": kind, "seed": seed, "heads": heads}
    done = folder / DONE_FILE
    if done.is_file() and json.loads(done.read_text()) == settings:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    model, spec = lazy.model, lazy.spec
    assert spec.rotation is not None  # the rotate step's check refuses such models first
    config = model.config
    head_dim = head_dim_of(config) if heads and spec.rotation.values else None
    rot = make_rotations(kind, seed, config.hidden_size, head_dim, lazy.device)
    writer = ShardWriter(folder, 4 << 30)
    written: set[str] = set()

    def read(name: str) -> Tensor:
        return lazy.files.read(lazy.names[name], lazy.device, torch.float32)

    def add(name: str, tensor: Tensor) -> None:
        writer.add(name, tensor.to(lazy.stored_dtype(name)))
        written.add(name)

    embedding = model.get_input_embeddings()
    embed_name = _param_name(model, embedding.weight)
    embed_stored = lazy.names[embed_name]
    rows = lazy.files.shape(embed_stored)[0]
    dtype = lazy.stored_dtype(embed_name)
    parts = (
        (lazy.files.read(embed_stored, lazy.device, torch.float32, rows=slice(r, r + ROW_CHUNK))
         @ rot.residual).to(dtype)
        for r in range(0, rows, ROW_CHUNK)
    )  # fmt: skip
    writer.add_rows(embed_name, lazy.files.shape(embed_stored), parts)
    written.add(embed_name)
    for index in tqdm(range(len(lazy.blocks)), desc="rotate blocks", disable=not progress):
        prefix = lazy.block_prefix(index)
        local = [n for n, _ in lazy.blocks[index].named_parameters()]
        tensors = {n: read(prefix + n) for n in local}
        for name, tensor in rotate_block(tensors, spec.rotation, rot, spec.norm_offset).items():
            add(prefix + name, tensor)
    final = f"{spec.rotation.final_norm}.weight"
    g = read(final) + spec.norm_offset
    head = model.get_output_embeddings()
    head_name = _param_name(model, head.weight)  # the embedding's name when tied
    own_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    W = read(head_name)
    writer.add(own_name, ((W * g[None, :]) @ rot.residual).to(lazy.stored_dtype(head_name)))
    written.add(head_name)
    add(final, torch.full_like(g, 1.0 - spec.norm_offset))
    for name in lazy.names:
        if name not in written:  # anything else (biases outside blocks): as stored
            add(name, read(name))
    writer.finish()
    data = json.loads((lazy.files.folder / "config.json").read_text())
    data["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    done.write_text(json.dumps(settings) + "\n")
    return folder


def _param_name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)
