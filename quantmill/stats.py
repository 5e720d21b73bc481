"""Calibration statistics of the original model, collected once and reused.

For every group of linear layers that share an input (q/k/v, gate/up, ...):
the Gram matrix ``H = 2 X Xᵀ / n`` of that input (GPTQ's Hessian) and, per
layer, the largest ``|x|`` of each input channel (what outlier-aware methods
read). They are collected with the *original* weights, one pass per block, so
they depend only on the model, the calibration data and the code, never on a
recipe: every recipe that does not need statistics of a partly quantized
model (``sequential: false``) shares them, and the pipeline caches them.

The file is one safetensors file: ``hessian/<first layer of group>``,
``absmax/<layer>``, with the group map and sample count in its metadata.
Layers are read one at a time, so using it never holds every Hessian.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantmill.arch import arch_for, block_linears, decoder_blocks
from quantmill.blocks import BlockStore, run_block
from quantmill.hooks import hooks_removed
from quantmill.layers import in_features
from quantmill.moe import calibrating_all_experts, unfuse_experts
from quantmill.quant.gptq import HessianAccumulator


@dataclass
class Statistics:
    """In-memory statistics; ``groups`` maps each layer to the layer holding its Hessian."""

    hessians: dict[str, Tensor] = field(default_factory=dict)
    absmax: dict[str, Tensor] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    samples: int = 0

    def hessian(self, layer: str) -> Tensor:
        return self.hessians[self.groups.get(layer, layer)]


def collect_statistics(
    model: nn.Module,
    calib_ids: Tensor,
    batch_size: int = 8,
    progress: bool = True,
    store: BlockStore | None = None,
    all_experts: bool = True,
) -> Statistics:
    """Run the calibration ids through ``model`` block by block and record statistics.

    ``store`` provides each block's weights (default: the model is in memory);
    statistics are float32 on the CPU whatever the compute device.
    """
    store = store or BlockStore(model)
    spec = arch_for(model)
    unfuse_experts(model, spec)
    blocks = decoder_blocks(model, spec)
    inputs = store.capture(model, blocks[0], calib_ids, batch_size)
    stats = Statistics(samples=int(calib_ids.shape[0]))
    for index, block in enumerate(tqdm(blocks, desc="statistics", disable=not progress)):
        store.load(index, block)
        inputs.enter(index)
        prefix = f"{spec.blocks}.{index}."
        linears = block_linears(block, spec)
        accumulators: dict[str, HessianAccumulator] = {}
        handles = []
        for group in spec.linear_groups:
            names = [n for n in group if n in linears]
            if not names:
                continue
            first = prefix + names[0]
            acc = HessianAccumulator(in_features(linears[names[0]], spec.conv1d))
            accumulators[first] = acc
            handles.append(linears[names[0]].register_forward_pre_hook(_hessian_hook(acc)))
            for name in names:
                stats.groups[prefix + name] = first
        for name, layer in linears.items():
            handles.append(layer.register_forward_pre_hook(_absmax_hook(stats, prefix + name)))
        with hooks_removed(handles), calibrating_all_experts(block, all_experts):
            run_block(block, inputs, keep_outputs=index + 1 < len(blocks))
        store.release(index, block)
        for first, acc in accumulators.items():
            if acc.count:  # an expert no token reached has none (its layers fall back)
                stats.hessians[first] = acc.hessian().cpu()
    return stats


def save_statistics(stats: Statistics, path: str | Path) -> None:
    tensors = {f"hessian/{k}": v.contiguous() for k, v in stats.hessians.items()}
    tensors.update({f"absmax/{k}": v.contiguous() for k, v in stats.absmax.items()})
    meta = {"groups": json.dumps(stats.groups), "samples": str(stats.samples)}
    save_file(tensors, str(path), metadata=meta)


class StatisticsFile:
    """Read access to a saved statistics file, one tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            self.keys = set(f.keys())
        self.groups: dict[str, str] = json.loads(meta.get("groups", "{}"))
        self.samples = int(meta.get("samples", 0))

    def hessian(self, layer: str) -> Tensor:
        return self._tensor(f"hessian/{self.groups.get(layer, layer)}", layer)

    def absmax(self, layer: str) -> Tensor:
        return self._tensor(f"absmax/{layer}", layer)

    def _tensor(self, key: str, layer: str) -> Tensor:
        if key not in self.keys:
            raise KeyError(f"{self.path} has no statistics for layer {layer!r}")
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)


def _hessian_hook(acc: HessianAccumulator):
    def hook(module: nn.Module, args: tuple) -> None:
        acc.add(args[0])

    return hook


def _absmax_hook(stats: Statistics, name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        peak = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
        seen = stats.absmax.get(name)
        stats.absmax[name] = peak if seen is None else torch.maximum(seen, peak)

    return hook
