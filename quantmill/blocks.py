"""Running decoder blocks on calibration data: capture what the first block is
called with (and, where blocks differ in kind, what the first block of each kind
is called with), run a block over every batch, keep its outputs.

Hidden states live on ``BlockInputs.storage`` (the compute device, or CPU
memory when they are offloaded) and each batch is moved to the block's device
only while it runs. Call arguments (position embeddings, masks) are small and
stay on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quantmill.hooks import hooks_removed


class StopForward(Exception):
    """Raised by a hook once every statistic it needs for this batch is collected."""


@dataclass
class BlockInputs:
    """Hidden states entering the current block, per batch, with the other call arguments."""

    hidden: list[Tensor]  # each [batch, seq, hidden], on ``storage``
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    device: torch.device | None = None  # where blocks run; None: wherever hidden is
    storage: torch.device | None = None  # where hidden states wait; None: ``device``
    returns_tuple: bool = False  # the block's output is a tuple (older architectures)
    # Models whose blocks differ in kind (Gemma's sliding and full attention: another
    # mask, other rotary embeddings) call each kind with its own arguments:
    # ``config.layer_types`` by block, and each kind's arguments per batch.
    layer_types: tuple[str, ...] = ()
    by_type: dict[str, list[dict]] = field(default_factory=dict)

    def enter(self, index: int) -> None:
        """Block ``index`` runs next: ``kwargs`` become its kind's call arguments."""
        if self.layer_types:
            self.kwargs = self.by_type[self.layer_types[index]]

    def batch(self, b: int) -> Tensor:
        """Batch ``b``'s hidden states on the compute device."""
        hidden = self.hidden[b]
        return hidden if self.device is None else hidden.to(self.device, non_blocking=True)

    def keep(self, b: int, out: Tensor) -> None:
        """Replace batch ``b`` by a block's output, stored where hidden states wait."""
        where = self.storage or self.device
        self.hidden[b] = out if where is None else out.to(where)

    def stored(self, out: Tensor) -> Tensor:
        where = self.storage or self.device
        return out if where is None else out.to(where)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def _first(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    ids: Tensor,
    batch_size: int,
    device: torch.device | None = None,
    storage: torch.device | None = None,
) -> BlockInputs:
    """Run the model up to its first block and keep what the block is called with.

    ``ids`` ``[samples, seq]`` go to ``device`` batch by batch; the hidden states are
    kept on ``storage`` (default: ``device``).
    """
    inputs = BlockInputs(hidden=[], device=device, storage=storage)
    types = tuple(getattr(model.config, "layer_types", None) or ())
    if len(set(types)) > 1:
        return _capture_each_kind(model, first_block, ids, batch_size, inputs, types)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest = _split(args, kwargs)
        inputs.hidden.append(inputs.stored(hidden))
        inputs.args.append(rest)
        inputs.kwargs.append(kwargs)
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    with hooks_removed([handle]):
        _run_batches(model, ids, batch_size, device)
    return inputs


def _split(args: tuple, kwargs: dict) -> tuple[Tensor, tuple]:
    """The hidden states a block is called with, and its other positional arguments
    (``kwargs`` loses ``hidden_states`` where it was passed by name)."""
    if args:
        return args[0], args[1:]
    return kwargs.pop("hidden_states"), ()


def _run_batches(model: nn.Module, ids: Tensor, batch_size: int, device) -> None:
    for batch in ids.split(batch_size):
        if device is not None:
            batch = batch.to(device)
        try:
            model(input_ids=batch, use_cache=False)
        except StopForward:
            pass


class _Catcher(nn.Module):
    """Stands in for a decoder block while its call arguments are captured: records
    them, passes the hidden states on unchanged, and stops the forward at ``last``."""

    def __init__(self, index: int, last: int, record) -> None:
        super().__init__()
        self.index, self.last, self.record = index, last, record

    def forward(self, *args, **kwargs):
        hidden, rest = _split(args, kwargs)
        self.record(self.index, hidden, rest, kwargs)
        if self.index == self.last:
            raise StopForward
        return hidden


def _capture_each_kind(
    model: nn.Module, first_block: nn.Module, ids: Tensor, batch_size: int,
    inputs: BlockInputs, types: tuple[str, ...],
) -> BlockInputs:  # fmt: skip
    """The first block's hidden states and the call arguments of the first block of
    each kind, from one pass in which stand-ins replace the blocks (no block runs)."""
    blocks = next(
        m for m in model.modules()
        if isinstance(m, nn.ModuleList) and any(b is first_block for b in m)
    )  # fmt: skip
    first_of = {kind: types.index(kind) for kind in dict.fromkeys(types)}
    wanted = set(first_of.values())
    inputs.layer_types = types
    inputs.by_type = {kind: [] for kind in first_of}

    def record(index: int, hidden: Tensor, rest: tuple, kwargs: dict) -> None:
        if index == 0:
            inputs.hidden.append(inputs.stored(hidden))
            inputs.args.append(rest)
        if index in wanted:
            inputs.by_type[types[index]].append(kwargs)

    originals = list(blocks)
    last = max(wanted)
    try:
        for index in range(len(originals)):
            blocks[index] = _Catcher(index, last, record)
        _run_batches(model, ids, batch_size, inputs.device)
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    inputs.enter(0)
    return inputs


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """The block's output hidden states for every batch of ``inputs`` (stored like them)."""
    outputs = []
    for b in range(len(inputs.hidden)):
        out = block(inputs.batch(b), *inputs.args[b], **inputs.kwargs[b])
        inputs.returns_tuple = isinstance(out, tuple)
        outputs.append(inputs.stored(_first(out)))
    return outputs


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, keep_outputs: bool) -> None:
    """Run every batch through ``block``; with ``keep_outputs`` replace inputs by outputs."""
    for b in range(len(inputs.hidden)):
        try:
            out = block(inputs.batch(b), *inputs.args[b], **inputs.kwargs[b])
        except StopForward:
            continue
        inputs.returns_tuple = isinstance(out, tuple)
        if keep_outputs:
            inputs.keep(b, _first(out))


class BlockStore:
    """Where the driver finds each block's weights and what it does with a finished block.

    This one holds the whole model in memory: nothing to load or release, and a
    finished block stays as it is (the model is written once at the end). The
    engine's store reads each block from the checkpoint's files, writes it out
    when finished and lets the run resume (``quantmill.engine``).
    """

    start = 0  # the first block to process (later when a run resumes)

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    @property
    def device(self) -> torch.device | None:
        params = iter(self.model.parameters()) if self.model is not None else iter(())
        first = next(params, None)
        return None if first is None else first.device

    def capture(self, model: nn.Module, first_block: nn.Module, ids: Tensor, batch_size: int):
        """The inputs of block ``start`` for every calibration batch."""
        return capture_block_inputs(model, first_block, ids, batch_size, self.device)

    def load(self, index: int, block: nn.Module) -> None:
        """Make block ``index``'s weights available."""

    def release(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is not needed for now (a pass that changes nothing)."""

    def finish(self, index: int, block: nn.Module, layers: dict, reports: list, inputs) -> dict:
        """Block ``index`` is quantized (``inputs`` now enter the next block); returns
        the layer grids the driver keeps for the rest of the run."""
        return layers

    def done(self) -> tuple[dict, list]:
        """Layers and reports of blocks finished before ``start`` (an earlier run's)."""
        return {}, []
