"""Layer-wise knowledge distillation (ZeroQuant's LKD), one decoder block at a time.

The block's quantized linears keep a float "latent" weight, initialised from
the original weights; the forward pass uses its fake-quantized value on the
layer's fixed grid (straight-through gradient), inputs are quantized as they
will be at run time, and the latent weights are trained so the block
reproduces the original block's outputs on the calibration inputs. At the
end the weights are put back on the grid, so the grid found before LKD is
the one exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from quantmill.errors import TrainingDivergedError
from quantmill.layers import LayerQuant
from quantmill.quant.grid import expand_groups
from quantmill.runtime import activation_hooks, runtime_spec


class OnGrid(nn.Module):
    """Parametrization: the weight as seen by the forward pass is its fake-quantized value."""

    def __init__(self, quant: LayerQuant, cols: int) -> None:
        super().__init__()
        scheme = quant.scheme
        self.register_buffer("scale", expand_groups(quant.scale, cols, scheme.group_size).float())
        zero = None if quant.zero is None else expand_groups(quant.zero, cols, scheme.group_size)
        self.register_buffer("zero", None if zero is None else zero.float())
        self.q_min, self.q_max = scheme.q_min, scheme.q_max

    def forward(self, W: Tensor) -> Tensor:
        offset = 0.0 if self.zero is None else self.zero
        q = torch.clamp(torch.round(W / self.scale) + offset, self.q_min, self.q_max)
        return W + ((q - offset) * self.scale - W).detach()


@dataclass
class DistillResult:
    initial_loss: float
    final_loss: float
    steps: int
    kept: bool  # False: distillation did not lower the loss, the rounded weights were kept


def distill_block(
    block: nn.Module,
    prefix: str,
    layers: dict[str, LayerQuant],
    originals: dict[str, Tensor],
    inputs,
    targets: list[Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> DistillResult:
    """Train the block's quantized linears (``layers``, full names) against ``targets``.

    ``originals`` holds each layer's weight before quantization (the latent start).
    """
    modules = {name: block.get_submodule(name.removeprefix(prefix)) for name in layers}
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    for name, module in modules.items():
        with torch.no_grad():
            module.weight.copy_(originals[name])
        parametrize.register_parametrization(
            module, "weight", OnGrid(layers[name], module.in_features)
        )
    latents = [m.parametrizations.weight.original for m in modules.values()]
    for latent in latents:
        latent.requires_grad_(True)
    optimizer = torch.optim.Adam(latents, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = calibration_batches(inputs, targets, batch_size)
    device = inputs.device
    initial = final = float("nan")
    kept = True
    try:
        with torch.enable_grad(), activation_hooks(block, runtime_spec(layers), prefix):
            initial = mean_block_loss(block, batches, device)
            for step in range(steps):
                hidden, args, kwargs, target = batches[
                    int(torch.randint(len(batches), (1,), generator=generator))
                ]
                out = block(on_device(hidden, device), *args, **kwargs)
                loss = nn.functional.mse_loss(
                    (out[0] if isinstance(out, tuple) else out).float(),
                    on_device(target, device).float(),
                )
                if not math.isfinite(loss.item()):
                    raise TrainingDivergedError(
                        f"{prefix.rstrip('.')}: the distillation loss became {float(loss)} at "
                        f"step {step + 1} (lkd_lr {lr:g}); lower lkd_lr or set lkd_steps: 0"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            final = mean_block_loss(block, batches, device)
            if not final < initial:  # never leave a block worse than plain rounding
                kept = False
                with torch.no_grad():
                    for name, latent in zip(modules, latents, strict=True):
                        latent.copy_(originals[name])
    finally:
        for module in modules.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return DistillResult(initial, min(initial, final), steps, kept)


@torch.no_grad()
def mean_block_loss(block: nn.Module, batches, device: torch.device | None) -> float:
    total = 0.0
    for hidden, args, kwargs, target in batches:
        out = block(on_device(hidden, device), *args, **kwargs)
        total += float(
            nn.functional.mse_loss(
                (out[0] if isinstance(out, tuple) else out).float(),
                on_device(target, device).float(),
            )
        )
    return total / len(batches)


def on_device(tensor: Tensor, device: torch.device | None) -> Tensor:
    """A batch on the compute device (calibration activations may wait in CPU memory)."""
    return tensor if device is None else tensor.to(device, non_blocking=True)


def calibration_batches(inputs, targets: list[Tensor], size: int) -> list[tuple]:
    """The calibration batches cut to ``size`` samples each, with their call arguments."""
    out = []
    for b, hidden in enumerate(inputs.hidden):
        for start in range(0, hidden.shape[0], size):
            rows = slice(start, start + size)
            kwargs = {k: _rows(v, rows, hidden.shape[0]) for k, v in inputs.kwargs[b].items()}
            args = tuple(_rows(a, rows, hidden.shape[0]) for a in inputs.args[b])
            out.append((hidden[rows], args, kwargs, targets[b][rows]))
    return out


def _rows(value, rows: slice, batch: int):
    """Slice a per-sample argument; leave shared ones (batch dim 1, tuples of those) alone."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch and batch > 1:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    return value
