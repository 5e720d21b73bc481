"""AutoRound: per-block signed gradient descent on rounding offsets and ranges.

Cheng et al., 2023 (Intel's auto-round); the grid math is in
``quantmill.quant.autoround``. Each selected layer starts on its min-max grid
(plain RTN); then, block by block, the offsets and range factors of the block's
layers are trained for ``iters`` signed-gradient steps (learning rate decaying
linearly from ``lr`` to 0) so the quantized block reproduces the original
block's outputs on calibration batches. The parameters of the step with the
lowest batch loss are kept, and a block whose mean output error did not fall
below RTN's keeps RTN's grid. Each block reports its output error before
(RTN) and after.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from quantmill.config import MethodConfig, QuantScheme
from quantmill.errors import TrainingDivergedError
from quantmill.layers import LayerQuant, LayerReport, get_weight
from quantmill.methods.base import Method
from quantmill.methods.lkd import calibration_batches, mean_block_loss, on_device
from quantmill.methods.rtn import round_layer
from quantmill.quant.autoround import autoround_grid, autoround_weight, signed_step
from quantmill.quant.grid import group_count
from quantmill.registry import Needs, register_method
from quantmill.runtime import activation_hooks, runtime_spec


class AutoRoundConfig(MethodConfig):
    method: Literal["autoround"] = "autoround"
    iters: int = Field(200, ge=1, description="signed-gradient steps per block")
    # the paper's step size is 1/iters; the range factors take the same unless set
    lr: float | None = Field(None, gt=0, le=1, description="offset step size; null: 1/iters")
    factor_lr: float | None = Field(None, gt=0, le=1, description="null: lr")
    batch_size: int = Field(8, ge=1, description="calibration samples per step")
    # False: only the rounding offsets train, each group keeps its full min-max range
    tune_range: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _start(self) -> AutoRoundConfig:
        if self.weights.observer != "minmax":
            raise ValueError(
                f"weights.observer: {self.weights.observer} does not apply to autoround, which "
                "starts from the min-max grid and trains each group's range itself; use minmax"
            )
        return self


class Rounded(nn.Module):
    """Parametrization: the layer's weight is its original ``W0`` on the trained grid."""

    def __init__(self, W0: Tensor, scheme: QuantScheme, dtype: torch.dtype) -> None:
        super().__init__()
        groups = group_count(W0.shape[1], scheme.group_size)
        self.scheme, self.dtype = scheme, dtype
        self.register_buffer("W0", W0)
        self.V = nn.Parameter(torch.zeros_like(W0))
        self.alpha = nn.Parameter(torch.ones(W0.shape[0], groups, device=W0.device))
        self.beta = nn.Parameter(torch.ones(W0.shape[0], groups, device=W0.device))

    def forward(self, _: Tensor) -> Tensor:
        return autoround_weight(self.W0, self.V, self.alpha, self.beta, self.scheme).to(self.dtype)

    def state(self) -> list[Tensor]:
        return [self.V.detach().clone(), self.alpha.detach().clone(), self.beta.detach().clone()]

    @torch.no_grad()
    def restore(self, state: list[Tensor]) -> None:
        for p, value in zip((self.V, self.alpha, self.beta), state, strict=True):
            p.copy_(value)


@register_method(
    "autoround",
    config=AutoRoundConfig,
    needs=Needs(
        calibration=True,
        targets=True,
        metrics={
            "autoround-block.loss": "autoround_loss",
            "autoround-block.initial_loss": "autoround_loss_rtn",
        },
    ),
)
class AutoRound(Method):
    config: AutoRoundConfig

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._originals: dict[str, Tensor] = {}

    def check_model(self, model: nn.Module, spec) -> None:
        if spec.conv1d:
            from quantmill.errors import ConfigError

            raise ConfigError(
                f"method: autoround trains nn.Linear layers; {model.config.model_type} uses "
                "Conv1D. Use gptq or rtn"
            )

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        """The starting point: the layer on its min-max grid, RTN's (which is AutoRound's
        at zero offsets and full ranges: the observer is min-max by validation)."""
        start = time.perf_counter()
        self._originals[name] = get_weight(layer, self.conv1d).detach().float().clone()
        scale, zero, loss = round_layer(layer, self.config.weights, self.conv1d)
        return self.layer_quant(scale, zero), self._timed_report(name, "autoround", loss, start)

    def finish_block(self, block, prefix, inputs, targets, layers) -> list[LayerReport]:
        """Train the block's offsets and ranges; ``layers`` gets the grids found."""
        if not layers:
            return []
        start = time.perf_counter()
        cfg = self.config
        modules = {name: block.get_submodule(name.removeprefix(prefix)) for name in layers}
        frozen = {p: p.requires_grad for p in block.parameters()}
        for p in frozen:
            p.requires_grad_(False)
        rounders = {}
        for name, module in modules.items():
            rounders[name] = Rounded(self._originals.pop(name), cfg.weights, module.weight.dtype)
            parametrize.register_parametrization(module, "weight", rounders[name])
        try:
            initial, final, best_step = self._tune(block, prefix, rounders, layers, inputs, targets)
        finally:
            for module in modules.values():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            for p, flag in frozen.items():
                p.requires_grad_(flag)
        with torch.no_grad():
            for name, rounder in rounders.items():
                scale, zero = autoround_grid(rounder.W0, rounder.alpha, rounder.beta, cfg.weights)
                layers[name] = self.layer_quant(scale.detach(), _detached(zero))
        extra = {"initial_loss": initial, "steps": cfg.iters, "best_step": best_step,
                 "kept": "tuned" if final < initial else "rounded"}  # fmt: skip
        loss = min(initial, final)
        return [self._timed_report(prefix.rstrip("."), "autoround-block", loss, start, **extra)]

    def _tune(self, block, prefix, rounders, layers, inputs, targets) -> tuple[float, float, int]:
        cfg = self.config
        lr = cfg.lr or 1.0 / cfg.iters
        factor_lr = cfg.factor_lr or lr
        offsets = [r.V for r in rounders.values()]
        factors = (
            [p for r in rounders.values() for p in (r.alpha, r.beta)] if cfg.tune_range else []
        )
        batches = calibration_batches(inputs, targets, cfg.batch_size)
        generator = torch.Generator().manual_seed(cfg.seed)
        device = inputs.device
        with torch.enable_grad(), activation_hooks(block, runtime_spec(layers), prefix):
            initial = mean_block_loss(block, batches, device)
            start_state = {n: r.state() for n, r in rounders.items()}
            best, best_state, best_step = math.inf, start_state, 0
            for step in range(cfg.iters):
                pick = int(torch.randint(len(batches), (1,), generator=generator))
                hidden, args, kwargs, target = batches[pick]
                out = block(on_device(hidden, device), *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = nn.functional.mse_loss(out.float(), on_device(target, device).float())
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"{prefix.rstrip('.')}: AutoRound's loss became {value} at step "
                        f"{step + 1} (lr {lr:g}); lower lr"
                    )
                if value < best:
                    best, best_step = value, step
                    best_state = {n: r.state() for n, r in rounders.items()}
                for p in offsets + factors:
                    p.grad = None
                loss.backward()
                decay = 1.0 - step / cfg.iters  # linear to 0, as auto-round's schedule
                signed_step(offsets, factors, lr * decay, factor_lr * decay)
            for name, rounder in rounders.items():
                rounder.restore(best_state[name])
            final = mean_block_loss(block, batches, device)
            if not final < initial:  # never leave a block worse than plain rounding
                for name, rounder in rounders.items():
                    rounder.restore(start_state[name])
        return initial, final, best_step


def _detached(zero: Tensor | None) -> Tensor | None:
    return None if zero is None else zero.detach()
