"""Inputs of a block's linear groups, recorded while calibrating: per-channel
statistics over every token and a random sample of token rows for scoring."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quantmill.blocks import StopForward
from quantmill.hooks import hooks_removed


@dataclass
class InputRecord:
    absmax: Tensor | None = None  # [in] largest |x| per channel
    abssum: Tensor | None = None  # [in] Σ|x| per channel (float64)
    tokens: int = 0
    sample: list[Tensor] = field(default_factory=list)  # rows kept for scoring

    def mean_abs(self) -> Tensor:
        return (self.abssum / max(self.tokens, 1)).float()

    def rows(self) -> Tensor:
        if self.sample:
            return torch.cat(self.sample)
        return torch.empty(0, device=None if self.absmax is None else self.absmax.device)

    def add(self, x: Tensor, keep: int, generator: torch.Generator) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        peak = flat.abs().amax(dim=0)
        total = flat.abs().sum(dim=0, dtype=torch.float64)
        self.absmax = peak if self.absmax is None else torch.maximum(self.absmax, peak)
        self.abssum = total if self.abssum is None else self.abssum + total
        self.tokens += flat.shape[0]
        if keep > 0:
            pick = torch.randperm(flat.shape[0], generator=generator)[:keep].to(flat.device)
            self.sample.append(flat[pick].clone())


@contextmanager
def record_inputs(
    groups: list[list[tuple[str, nn.Module]]],
    records: dict[str, InputRecord],
    rows_per_batch: int,
    stop_after_last: bool,
    seed: int = 0,
) -> Iterator[None]:
    """Record each group's input into ``records[name]`` for every layer name of the group."""
    generator = torch.Generator().manual_seed(seed)
    handles = []
    for index, group in enumerate(groups):
        record = InputRecord()
        for name, _ in group:
            records[name] = record
        stop = stop_after_last and index == len(groups) - 1
        handles.append(
            group[0][1].register_forward_pre_hook(_hook(record, rows_per_batch, generator, stop))
        )
    with hooks_removed(handles):
        yield


def _hook(record: InputRecord, keep: int, generator: torch.Generator, stop: bool):
    def hook(module: nn.Module, args: tuple) -> None:
        record.add(args[0], keep, generator)
        if stop:
            raise StopForward

    return hook
