"""The training loop every quantization-aware method shares.

Adam on the method's trainable tensors, a warmup + cosine (or constant)
learning rate computed from the step number, batches of token windows drawn
by a seeded generator, and a checkpoint every ``checkpoint_every`` steps
holding everything the next step depends on (tensors, optimizer moments,
generator state, history). A run started again with the same work folder
resumes from the latest checkpoint and takes the same batches an
uninterrupted run would. A checkpoint is written only once the loss at its
parameters is known to be finite (at the next step, or by the final held-out
score), so when a non-finite loss stops the run with ``TrainingDivergedError``
the last checkpoint on disk is a good one.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from quantmill.config import TrainSpec
from quantmill.errors import CheckpointError, TrainingDivergedError

log = logging.getLogger(__name__)
progress_log = logging.getLogger("quantmill.progress")

CHECKPOINT = re.compile(r"step-(\d+)\.pt")
KEEP_CHECKPOINTS = 2
LOG_EVERY = 10  # progress log lines (the CLI shows a bar instead)


@dataclass
class TrainContext:
    """What a training step gets beside the model, from ``quantmill.api``."""

    calib_ids: Tensor | None  # [rows, tokens] training text (PEQA, L4Q)
    workdir: Path | None = None  # checkpoints; None: none written, nothing resumed
    cache: bool = False  # keep generated text (LLM-QAT) in quantmill.cache
    model_key: str = ""  # names the model in cache keys
    progress: bool = True


@dataclass
class TrainResult:
    """What one training run did; saved in ``quantmill_training.json``."""

    method: str
    steps: int
    resumed_from: int  # 0: started fresh
    tokens_seen: int
    seconds: float  # this process's training time (not counting a run before a resume)
    eval_loss_before: float | None
    eval_loss_after: float | None
    history: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    span = max(1, spec.steps - spec.warmup_steps)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * (step - spec.warmup_steps) / span))


def split_rows(data: Tensor, spec: TrainSpec) -> tuple[Tensor, Tensor]:
    """(training rows, held-out rows): the last ``eval_samples`` rows are held out."""
    held = min(spec.eval_samples, max(0, data.shape[0] - 1))
    return data[: data.shape[0] - held], data[data.shape[0] - held :]


def draw_batch(rows: Tensor, spec: TrainSpec, generator: torch.Generator) -> Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random rows and offsets."""
    n, length = rows.shape
    seq_len = min(spec.seq_len, length)
    picks = torch.randint(n, (spec.batch_size,), generator=generator).tolist()
    starts = torch.randint(length - seq_len + 1, (spec.batch_size,), generator=generator).tolist()
    return torch.stack([rows[r, s : s + seq_len] for r, s in zip(picks, starts, strict=True)])


def train(
    label: str,
    params: dict[str, Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    data: Tensor,
    spec: TrainSpec,
    workdir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``params`` (leaf tensors, updated in place) to lower ``loss_fn(batch)``.

    ``data`` is ``[rows, tokens]`` token ids; ``workdir`` holds checkpoints
    (``None``: none are written and nothing resumes).
    """
    tensors = list(params.values())
    for t in tensors:
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(tensors, lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    rows, held = split_rows(data.to(tensors[0].device), spec)
    history: list[dict[str, float]] = []
    start_step, eval_before = 0, None
    state = latest_checkpoint(workdir) if workdir is not None else None
    if state is not None:
        _restore(state, params, optimizer, generator)
        start_step, history, eval_before = state["step"], state["history"], state["eval_before"]
        log.info("%s: resuming from step %d (%s)", label, start_step, workdir)
    elif held.numel():
        eval_before = evaluate(loss_fn, held, spec)
    tokens_per_step = spec.batch_size * min(spec.seq_len, rows.shape[1])
    began = time.perf_counter()
    bar = tqdm(
        total=spec.steps, initial=min(start_step, spec.steps), desc=f"{label} training",
        disable=not progress,
    )  # fmt: skip
    pending = False  # a checkpoint is due for the current parameters
    with bar:
        for step in range(start_step, spec.steps):
            lr = lr_at(step, spec)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator_state = generator.get_state()
            batch = draw_batch(rows, spec, generator)
            with torch.enable_grad():
                loss = loss_fn(batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDivergedError(_diverged(label, value, step, lr, workdir))
                if pending:  # these parameters give a finite loss: a good checkpoint
                    save_checkpoint(workdir, step, params, optimizer, generator_state,
                                    history, eval_before)  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if spec.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(tensors, spec.max_grad_norm)
            optimizer.step()
            history.append({"step": step + 1, "loss": value, "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            done = step + 1
            if done % LOG_EVERY == 0 or done == spec.steps:
                progress_log.info("%s: step %d/%d loss %.4f", label, done, spec.steps, value)
            pending = workdir is not None and done % spec.checkpoint_every == 0
    with torch.no_grad():
        eval_after = evaluate(loss_fn, held, spec) if held.numel() else None
        final = (
            eval_after
            if eval_after is not None
            else float(loss_fn(draw_batch(rows, spec, generator)))
        )
    if not math.isfinite(final):
        raise TrainingDivergedError(
            _diverged(label, final, spec.steps - 1, lr_at(spec.steps - 1, spec), workdir)
        )
    if workdir is not None and start_step < spec.steps:  # kept until the export is complete
        save_checkpoint(workdir, spec.steps, params, optimizer, generator.get_state(),
                        history, eval_before)  # fmt: skip
    for t in tensors:
        t.requires_grad_(False)
    return TrainResult(
        method=label,
        steps=spec.steps,
        resumed_from=start_step,
        tokens_seen=spec.steps * tokens_per_step,
        seconds=time.perf_counter() - began,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        history=history,
    )


@torch.no_grad()
def evaluate(loss_fn: Callable[[Tensor], Tensor], held: Tensor, spec: TrainSpec) -> float:
    """Mean loss over the held-out rows, each cut to ``seq_len`` tokens."""
    seq_len = min(spec.seq_len, held.shape[1])
    losses = [float(loss_fn(row[None, :seq_len])) for row in held]
    return sum(losses) / len(losses)


def _diverged(label: str, value: float, step: int, lr: float, workdir: Path | None) -> str:
    kept = latest_step(workdir) if workdir is not None else 0
    where = (
        f"The last good checkpoint (step {kept}) is kept in {workdir}; "
        "the same recipe with a lower training.lr resumes from it."
        if kept
        else "No checkpoint had been written yet."
    )
    return (
        f"{label}: the training loss became {value} at step {step + 1} "
        f"(learning rate {lr:.3g}); lower training.lr. {where}"
    )


def save_checkpoint(
    workdir: Path,
    step: int,
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    generator_state: Tensor,
    history: list[dict[str, float]],
    eval_before: float | None,
) -> Path:
    """Write ``step-N.pt`` atomically and drop all but the latest few."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "params": {name: t.detach().clone() for name, t in params.items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator_state,
        "history": history,
        "eval_before": eval_before,
    }
    path = workdir / f"step-{step:06d}.pt"
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    for old in _checkpoints(workdir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def latest_step(workdir: Path) -> int:
    found = _checkpoints(workdir)
    return int(CHECKPOINT.fullmatch(found[-1].name).group(1)) if found else 0  # type: ignore[union-attr]


def latest_checkpoint(workdir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``workdir`` (an unreadable one is skipped)."""
    for path in reversed(_checkpoints(workdir)):
        try:
            return torch.load(path, weights_only=False)
        except Exception as exc:
            log.warning("skipping unreadable training checkpoint %s: %s", path, exc)
    return None


def _checkpoints(workdir: Path) -> list[Path]:
    if not workdir.is_dir():
        return []
    found = [p for p in workdir.iterdir() if CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))  # type: ignore[union-attr]


def _restore(
    state: dict[str, Any],
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    saved = state["params"]
    if set(saved) != set(params):
        raise CheckpointError(
            "the training checkpoint holds other tensors than this run trains; "
            "delete the training folder to start again"
        )
    with torch.no_grad():
        for name, t in params.items():
            t.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
