"""Perplexity (GPTQ-paper protocol), size on disk and bits per weight."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantmill.blocks import BlockInputs, capture_block_inputs, run_block
from quantmill.folder import CONFIG_FILE, weight_files
from quantmill.lazy import LazyModel

# Cross-entropy is computed over this many positions at a time, so a 2048-token
# window never materialises its full [2048, vocab] logits.
LOGIT_CHUNK = 512
progress_log = logging.getLogger("quantmill.progress")


@dataclass
class Perplexity:
    perplexity: float
    windows: int
    seq_len: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, progress: bool = True) -> Perplexity:
    """exp(mean next-token NLL) over ``windows`` ``[n, seq_len]``, each scored independently."""
    start = time.perf_counter()
    model.eval()
    body, head = model.get_decoder(), model.get_output_embeddings()
    device = head.weight.device
    total, count = 0.0, 0
    for index, window in enumerate(tqdm(windows, desc="perplexity windows", disable=not progress)):
        ids = window[None].to(device)
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        total += window_nll(head, hidden, ids[0, 1:])
        count += ids.shape[1] - 1
        progress_log.info("perplexity: window %d/%d", index + 1, len(windows))
    return _result(total, count, windows, time.perf_counter() - start)


def window_nll(head: nn.Module, hidden: Tensor, targets: Tensor) -> float:
    """Σ next-token NLL of one window, ``LOGIT_CHUNK`` positions of logits at a time."""
    total = 0.0
    for s in range(0, hidden.shape[0], LOGIT_CHUNK):
        logits = head(hidden[s : s + LOGIT_CHUNK]).float()
        total += float(
            nn.functional.cross_entropy(logits, targets[s : s + LOGIT_CHUNK], reduction="sum")
        )
    return total


def _result(total: float, count: int, windows: Tensor, seconds: float) -> Perplexity:
    value = math.exp(total / count) if math.isfinite(total) else float("nan")
    return Perplexity(value, len(windows), windows.shape[1], count, seconds)


@torch.no_grad()
def streamed_perplexity(lazy: LazyModel, windows: Tensor, progress: bool = True) -> Perplexity:
    """``perplexity`` of a model whose weights stream block by block (``LazyModel``).

    Every window goes through one block at a time, so memory holds one block and the
    windows' hidden states, whatever the model's size. The same operations run as in
    a whole-model forward (the decoder's own tail replays the last block's output),
    so the figure is the one ``perplexity`` gives on the loaded model.
    """
    start = time.perf_counter()
    blocks = lazy.blocks
    with lazy.embedded() as model:
        inputs = capture_block_inputs(model, blocks[0], windows, 1, lazy.device)
    for index in tqdm(range(len(blocks)), desc="perplexity blocks", disable=not progress):
        block = lazy.load_block(index)
        inputs.enter(index)
        run_block(block, inputs, keep_outputs=True)
        lazy.release_block(index)
        progress_log.info("perplexity: block %d/%d", index + 1, len(blocks))
    total, count = 0.0, 0
    with lazy.embedded() as model, lazy.output() as head, _replaying(lazy, inputs) as cursor:
        for b, window in enumerate(windows):
            cursor[0] = b
            ids = window[None].to(lazy.device)
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            total += window_nll(head, hidden[0, :-1], ids[0, 1:])
            count += ids.shape[1] - 1
    return _result(total, count, windows, time.perf_counter() - start)


class _Replay(nn.Module):
    """Stands in for the decoder blocks: returns the stored output of the last one."""

    def __init__(self, inputs: BlockInputs, cursor: list[int], as_tuple: bool) -> None:
        super().__init__()
        self.inputs, self.cursor, self.as_tuple = inputs, cursor, as_tuple

    def forward(self, *args, **kwargs):
        hidden = self.inputs.batch(self.cursor[0])
        return (hidden,) if self.as_tuple else hidden


@contextmanager
def _replaying(lazy: LazyModel, inputs: BlockInputs) -> Iterator[list[int]]:
    """The decoder with its blocks replaced by a replay of ``inputs`` (batch ``cursor[0]``)."""
    path = lazy.spec.blocks
    owner, _, leaf = path.rpartition(".")
    parent = lazy.model.get_submodule(owner) if owner else lazy.model
    blocks = getattr(parent, leaf)
    cursor = [0]
    setattr(parent, leaf, nn.ModuleList([_Replay(inputs, cursor, inputs.returns_tuple)]))
    try:
        yield cursor
    finally:
        setattr(parent, leaf, blocks)


def size_on_disk(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in ``folder``."""
    return sum(p.stat().st_size for p in weight_files(Path(folder)))


def bits_per_weight(folder: Path) -> float | None:
    """Stored bits per weight of the quantized layers, counting scales and zero points.

    Read from ``config.json`` (which layers are quantized) and the safetensors
    headers: every ``<layer>.weight*`` tensor counts, divided by the layer's
    number of weights. ``None`` for an unquantized checkpoint.
    """
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    groups = config.get("quantization_config", {}).get("config_groups", {})
    layers = {target for group in groups.values() for target in group.get("targets", [])}
    bits, weights = 0, 0
    for file in weight_files(Path(folder)):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                layer, _, leaf = name.rpartition(".")
                if layer not in layers or not leaf.startswith("weight"):
                    continue
                tensor = fh.get_slice(name)
                bits += math.prod(tensor.get_shape()) * _dtype_bits(tensor.get_dtype())
                if leaf == "weight_shape":
                    weights += math.prod(fh.get_tensor(name).tolist())
                elif leaf == "weight":  # int8 weights stored unpacked
                    weights += math.prod(tensor.get_shape())
    return bits / weights if weights else None


def _dtype_bits(dtype: str) -> int:
    return {"I8": 8, "U8": 8, "I16": 16, "F16": 16, "BF16": 16, "I32": 32, "F32": 32, "I64": 64}[
        dtype
    ]
