"""L4Q: LoRA adapters and the quantization scales trained together, under quantization.

Paper: Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on
Large Language Models" (2024). Each linear's weight in the forward pass is
``fake_quantize(W0 + B·A·(alpha/rank), s)``: the rounding is straight-through,
the scale ``s`` learnable (LSQ), the adapters ``A``, ``B`` trained by the same
loss. At the end the adapters are merged into ``W0`` and the sum is quantized
with the learned scales, so the checkpoint is an ordinary packed one with no
adapter left, and it computes exactly what the trained model computed.

The scale starts from the step's observer (min-max or MSE) on ``W0`` and is
trained as ``s0 · exp(g)``; zero points (asymmetric grids) stay as initialised.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from quantmill.config import QuantScheme
from quantmill.layers import LayerQuant
from quantmill.methods.base import Method
from quantmill.methods.qat_common import (
    LearnedScale,
    TrainingConfig,
    check_linear,
    frozen,
    lm_loss,
    model_linears,
    parametrized,
    text_rows,
)  # fmt: skip
from quantmill.qat.loop import TrainContext, TrainResult, train
from quantmill.qat.ste import fake_quantize_ste
from quantmill.quant.grid import compute_qparams
from quantmill.registry import Needs, register_method


class L4QConfig(TrainingConfig):
    method: Literal["l4q"] = "l4q"
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (alpha / rank)")


class LoRAOnGrid(LearnedScale):
    """Parametrization: ``fake_quantize(W0 + B·A·scaling, s0·exp(g), zero)``."""

    def __init__(self, weight: Tensor, scheme: QuantScheme, rank: int, alpha: float) -> None:
        super().__init__()
        self.scheme = scheme
        out_features, in_features = weight.shape
        scale, zero = compute_qparams(weight.float(), scheme)
        self.learn_scale(scale)
        self.register_buffer("zero", None if zero is None else zero.float())
        # A is drawn by the CPU's generator (the same start on every device), as peft does
        lora_a = torch.empty(rank, in_features)  # host: initialised here, then moved
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        self.lora_a = nn.Parameter(lora_a.to(weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=weight.device))
        self.scaling = alpha / rank

    def merged(self, weight: Tensor) -> Tensor:
        return weight.float() + (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quantize_ste(self.merged(weight), self.raw_scale(), self.zero, self.scheme)


@register_method("l4q", config=L4QConfig, needs=Needs(calibration=True, trains=True))
class L4Q(Method):
    config: L4QConfig

    def check_model(self, model: nn.Module, spec) -> None:
        check_linear(model, spec, "l4q")

    def train(
        self, model: nn.Module, layers: dict[str, LayerQuant], context: TrainContext
    ) -> TrainResult:
        cfg = self.config
        modules = model_linears(model, cfg)
        data = text_rows(context.calib_ids, "l4q")
        start = time.perf_counter()

        def make(name: str, module: nn.Linear) -> nn.Module:
            return LoRAOnGrid(module.weight.detach(), cfg.weights, cfg.rank, cfg.alpha)

        with frozen(model), parametrized(modules, make, leave=True) as wrapped:
            params = {}
            for name, m in wrapped.items():
                params |= {f"{name}.lora_a": m.lora_a, f"{name}.lora_b": m.lora_b,
                           f"{name}.log_gain": m.log_gain}  # fmt: skip
            result = train("l4q", params, lm_loss(model), data, cfg.training,
                           context.workdir, context.progress)  # fmt: skip
            with torch.no_grad():
                for name, m in wrapped.items():
                    zero = None if m.zero is None else m.zero.clone()
                    layers[name] = self.layer_quant(m.scale().detach().clone(), zero)
        # leaving the block merged the adapters: each weight is now its quantized sum
        result.seconds = time.perf_counter() - start
        return result
