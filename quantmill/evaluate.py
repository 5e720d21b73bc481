"""Perplexity (GPTQ-paper protocol), size on disk and bits per weight."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

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
    total, count = 0.0, 0
    for index, window in enumerate(tqdm(windows, desc="perplexity windows", disable=not progress)):
        ids = window[None]
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        targets = ids[0, 1:]
        for s in range(0, hidden.shape[0], LOGIT_CHUNK):
            logits = head(hidden[s : s + LOGIT_CHUNK]).float()
            total += float(
                nn.functional.cross_entropy(logits, targets[s : s + LOGIT_CHUNK], reduction="sum")
            )
        count += targets.numel()
        progress_log.info("perplexity: window %d/%d", index + 1, len(windows))
    seconds = time.perf_counter() - start
    if not math.isfinite(total):
        return Perplexity(float("nan"), len(windows), windows.shape[1], count, seconds)
    return Perplexity(math.exp(total / count), len(windows), windows.shape[1], count, seconds)


def size_on_disk(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def bits_per_weight(folder: Path) -> float | None:
    """Stored bits per weight of the quantized layers, counting scales and zero points.

    Read from ``config.json`` (which layers are quantized) and the safetensors
    headers: every ``<layer>.weight*`` tensor counts, divided by the layer's
    number of weights. ``None`` for an unquantized checkpoint.
    """
    config = json.loads((Path(folder) / "config.json").read_text())
    groups = config.get("quantization_config", {}).get("config_groups", {})
    layers = {target for group in groups.values() for target in group.get("targets", [])}
    bits, weights = 0, 0
    for file in Path(folder).glob("*.safetensors"):
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
