"""ZeroQuant: group-wise weights, per-token activations, layer-wise distillation.

Paper: Yao et al., "ZeroQuant: Efficient and Affordable Post-Training
Quantization for Large-Scale Transformers", NeurIPS 2022. Weights are rounded
on a fine-grained group grid, activations quantized per token at run time,
and then each block is distilled (LKD, ``quantmill.methods.lkd``) towards the
original block's outputs; ``lkd_steps: 0`` turns distillation off.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from quantmill.config import ActScheme, MethodConfig
from quantmill.layers import LayerQuant, LayerReport, get_weight
from quantmill.methods.base import Method
from quantmill.methods.lkd import distill_block
from quantmill.methods.rtn import round_layer
from quantmill.registry import Needs, register_method


class ZeroQuantConfig(MethodConfig):
    method: Literal["zeroquant"] = "zeroquant"
    activations: ActScheme | None = Field(default_factory=ActScheme)
    lkd_steps: int = Field(50, ge=0, description="distillation steps per block; 0: no LKD")
    lkd_lr: float = Field(5e-5, gt=0, le=1, description="Adam learning rate")
    lkd_batch_size: int = Field(4, ge=1, description="calibration samples per step")
    seed: int = 0


@register_method(
    "zeroquant",
    config=ZeroQuantConfig,
    needs=Needs(
        metrics={"zeroquant-lkd.loss": "lkd_loss", "zeroquant-lkd.initial_loss": "lkd_loss_before"}
    ),
    varies=lambda step: {"calibration": step.lkd_steps > 0, "targets": step.lkd_steps > 0},
)
class ZeroQuant(Method):
    config: ZeroQuantConfig

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._originals: dict[str, Tensor] = {}

    def check_model(self, model: nn.Module, spec) -> None:
        if spec.conv1d and self.config.lkd_steps > 0:
            from quantmill.errors import ConfigError

            raise ConfigError(
                "lkd_steps: layer-wise distillation needs nn.Linear layers; "
                f"{model.config.model_type} uses Conv1D. Set lkd_steps: 0"
            )

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        start = time.perf_counter()
        if self.config.lkd_steps > 0:
            self._originals[name] = get_weight(layer, self.conv1d).detach().clone()
        scale, zero, loss = round_layer(layer, self.config.weights, self.conv1d)
        return self.layer_quant(scale, zero), self._timed_report(name, "zeroquant", loss, start)

    def finish_block(self, block, prefix, inputs, targets, layers) -> list[LayerReport]:
        if not layers:
            return []
        start = time.perf_counter()
        cfg = self.config
        originals = {name: self._originals.pop(name) for name in layers}
        result = distill_block(
            block, prefix, layers, originals, inputs, targets,
            cfg.lkd_steps, cfg.lkd_lr, cfg.lkd_batch_size, cfg.seed,
        )  # fmt: skip
        name = prefix.rstrip(".")
        extra = {
            "initial_loss": result.initial_loss,
            "steps": result.steps,
            "kept": "distilled" if result.kept else "rounded",
        }
        return [self._timed_report(name, "zeroquant-lkd", result.final_loss, start, **extra)]
