"""The streaming engine: one block's weights in memory, shards written as blocks finish,
and a journal that lets a killed run continue where it stopped.

``StreamingStore`` is the driver's block store for a ``LazyModel``: it reads a
block from the checkpoint's files when the driver needs it, and when the
block is quantized it writes the block's tensors into the output shards,
drops its weights and, at resume points, saves the hidden states entering the
next block and journals everything written so far. A run started again with
the same fingerprint (``quantmill.journal``) begins at the first unfinished
block with those hidden states and produces byte-identical output.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from quantmill.arch import stored_name
from quantmill.blocks import BlockInputs, BlockStore, capture_block_inputs
from quantmill.config import ActScheme, QuantScheme
from quantmill.devices import offload_to
from quantmill.export.checkpoint import ExportFormat, module_tensors, split_around_blocks
from quantmill.export.shards import ShardWriter
from quantmill.journal import Stage
from quantmill.layers import LayerQuant, LayerReport
from quantmill.lazy import LazyModel
from quantmill.tensorfile import read_file, write_file

log = logging.getLogger(__name__)
# A resume point (saved hidden states and journal) is taken after a block once the
# work since the last one is at least this many times what saving costs: resuming
# then loses little work, and saving stays a small share of the run.
RESUME_COST_FACTOR = 10.0


def layer_meta(quant: LayerQuant, in_features: int) -> dict[str, Any]:
    """What the journal keeps of a written layer (its tensors are in the shards)."""
    return {
        "scheme": quant.scheme.model_dump(),
        "activations": None if quant.activations is None else quant.activations.model_dump(),
        "outlier_threshold": quant.outlier_threshold,
        "asymmetric": quant.zero is not None,
        "in_features": in_features,
    }


def layer_from_meta(meta: dict[str, Any]) -> LayerQuant:
    """A written layer's grid description, without its (already written) tensors."""
    acts = meta["activations"]
    empty = torch.empty(0)  # host: placeholders; the layer's scales are in the shards
    return LayerQuant(
        scheme=QuantScheme.model_validate(meta["scheme"]),
        scale=empty,
        zero=empty if meta["asymmetric"] else None,
        activations=None if acts is None else ActScheme.model_validate(acts),
        outlier_threshold=meta["outlier_threshold"],
    )


class LazyStore(BlockStore):
    """Blocks read from ``lazy``'s files when needed and dropped after: a pass over the
    model (statistics, outliers) that holds one block at a time and changes nothing."""

    def __init__(self, lazy: LazyModel, offload: str = "auto") -> None:
        super().__init__(lazy.model)
        self.lazy, self.offload = lazy, offload

    @property
    def device(self) -> torch.device:
        return self.lazy.device

    def capture(self, model: nn.Module, first_block: nn.Module, ids: Tensor, batch_size: int):
        hidden = getattr(model.config, "hidden_size", None) or first_block_width(first_block)
        nbytes = 2 * ids.numel() * hidden * self.lazy.dtype.itemsize  # inputs and targets
        storage = offload_to(self.offload, self.device, nbytes)
        with self.lazy.embedded() as embedded:
            return capture_block_inputs(
                embedded, first_block, ids, batch_size, self.device, storage
            )

    def load(self, index: int, block: nn.Module) -> None:
        self.lazy.load_block(index)

    def release(self, index: int, block: nn.Module) -> None:
        self.lazy.release_block(index)


class StreamingStore(LazyStore):
    """Blocks from ``lazy``'s files, written to ``stage``'s shards; see the module docstring."""

    def __init__(
        self, lazy: LazyModel, stage: Stage, fmt: ExportFormat, max_shard_bytes: int,
        offload: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__(lazy, offload)
        self.stage, self.fmt = stage, fmt
        state = stage.state or {}
        self.writer = ShardWriter(stage.folder, max_shard_bytes, state.get("writer"))
        self.start = int(state.get("blocks_done", 0))
        self.meta: dict[str, dict[str, Any]] = dict(state.get("layers", {}))
        self.reports = [LayerReport(**r) for r in state.get("reports", [])]
        self.hidden_file: str | None = state.get("hidden")
        self.seconds_before = float(state.get("seconds", 0.0))  # the earlier runs' work
        self._started = self._since_save = time.perf_counter()
        self._save_cost = 0.0
        self.before, self.after = split_around_blocks(lazy.model)
        if not state:
            for name in self.before:  # embeddings: copied as they are stored
                self._copy(name)

    @property
    def resumed(self) -> bool:
        return self.start > 0

    def capture(self, model: nn.Module, first_block: nn.Module, ids: Tensor, batch_size: int):
        inputs = super().capture(model, first_block, ids, batch_size)
        if self.start > 0 and self.hidden_file is not None:
            saved = read_file(self.stage.work / self.hidden_file)
            where = inputs.storage or inputs.device
            inputs.hidden = [saved[str(b)].to(where) for b in range(len(inputs.hidden))]
        return inputs

    def finish(self, index, block, layers, reports, inputs: BlockInputs | None) -> dict:
        prefix = self.lazy.block_prefix(index)
        conv1d = self.lazy.spec.conv1d
        spec = self.lazy.spec
        for name, tensor in module_tensors(block, prefix, layers, self.fmt, self.dtype_of, conv1d):
            self.writer.add(stored_name(spec, name), tensor)
        for name, quant in layers.items():
            module = self.lazy.model.get_submodule(name)
            width = module.weight.shape[0 if conv1d else 1]
            self.meta[name] = layer_meta(quant, width)
        self.reports += reports
        self.lazy.release_block(index)
        last = index + 1 == len(self.lazy.blocks)
        if last or self._worth_saving():
            self._resume_point(index + 1, None if last else inputs)
        return {name: layer_from_meta(self.meta[name]) for name in layers}

    def done(self) -> tuple[dict, list]:
        return {n: layer_from_meta(m) for n, m in self.meta.items()}, list(self.reports)

    def finish_weights(self) -> dict[str, str]:
        """Copy what follows the blocks (final norm, head), close the shards."""
        for name in self.after:
            self._copy(name)
        return self.writer.finish()

    def in_features(self) -> dict[str, int]:
        return {name: meta["in_features"] for name, meta in self.meta.items()}

    def dtype_of(self, name: str) -> torch.dtype:
        return self.lazy.stored_dtype(name)

    # --- internals -----------------------------------------------------------------
    def _copy(self, name: str) -> None:
        if name in self.lazy.names:
            located = self.lazy.files.tensors[self.lazy.names[name]]
            self.writer.add_raw(name, located.entry, located.file, located.data_start)
        else:  # a persistent buffer the files do not hold: the model's own value
            self.writer.add(name, self.lazy.model.get_buffer(name))

    def _worth_saving(self) -> bool:
        return time.perf_counter() - self._since_save >= RESUME_COST_FACTOR * self._save_cost

    def _resume_point(self, blocks_done: int, inputs: BlockInputs | None) -> None:
        """Save the next block's inputs, then journal: the journal never names a file
        that is not complete."""
        began = time.perf_counter()
        hidden = None
        if inputs is not None:
            hidden = f"hidden-{blocks_done:05d}.safetensors"
            write_file(self.stage.work / hidden, {str(b): h for b, h in enumerate(inputs.hidden)})
        self.stage.save(
            {
                "blocks_done": blocks_done,
                "writer": self.writer.state(),
                "layers": self.meta,
                "reports": [vars(r) for r in self.reports],
                "hidden": hidden,
                "seconds": self.seconds_before + time.perf_counter() - self._started,
            }
        )
        if self.hidden_file and self.hidden_file != hidden:
            (self.stage.work / self.hidden_file).unlink(missing_ok=True)
        self.hidden_file = hidden
        self._since_save = time.perf_counter()
        self._save_cost = self._since_save - began


def first_block_width(block: nn.Module) -> int:
    """The hidden size a block takes, from its first norm or linear."""
    for module in block.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[-1])
    raise ValueError("cannot tell the hidden size of the decoder block")
