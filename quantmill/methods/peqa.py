"""PEQA: train only the quantization scales of an already quantized model.

Paper: Kim et al., "Memory-Efficient Fine-Tuning of Compressed Large Language
Models via sub-4-bit Integer Quantization" (NeurIPS 2023). The integer weights
of a post-training step before it (RTN or GPTQ in the same recipe) stay frozen;
each scale (per channel or per group) is trained on text by next-token loss.
The export holds the same integers with the new scales.

A scale is trained as ``s = s0 · exp(g)`` with ``g`` starting at 0: the same
scales, kept positive, with a learning rate that means a relative change.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor, nn

from quantmill.config import QuantScheme
from quantmill.errors import ConfigError
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
from quantmill.qat.ste import dequantize_grouped
from quantmill.quant.grid import expand_groups, grouped, quantize
from quantmill.registry import Needs, register_method


class PEQAConfig(TrainingConfig):
    method: Literal["peqa"] = "peqa"


class TrainedScales(LearnedScale):
    """Parametrization: the weight is ``(q - zero) · s0 · exp(g)``, ``q`` frozen."""

    def __init__(self, weight: Tensor, quant: LayerQuant) -> None:
        super().__init__()
        self.scheme: QuantScheme = quant.scheme
        self.cols = weight.shape[1]
        q = quantize(weight, quant.scale, quant.zero, quant.scheme).float()
        offset = (
            q
            if quant.zero is None
            else q - expand_groups(quant.zero, self.cols, quant.scheme.group_size)
        )
        # the frozen integers, less their zero point, in the grouped view
        self.register_buffer("offset_q", grouped(offset, quant.scheme.group_size))
        self.learn_scale(quant.scale)

    def forward(self, _weight: Tensor) -> Tensor:
        return dequantize_grouped(self.offset_q, self.raw_scale(), self.cols)


@register_method(
    "peqa", config=PEQAConfig, needs=Needs(calibration=True, trains=True, after=("rtn", "gptq"))
)
class PEQA(Method):
    config: PEQAConfig

    def check_model(self, model: nn.Module, spec) -> None:
        check_linear(model, spec, "peqa")

    def train(
        self, model: nn.Module, layers: dict[str, LayerQuant], context: TrainContext
    ) -> TrainResult:
        modules = model_linears(model, self.config)
        missing = [name for name in modules if name not in layers]
        if missing:
            raise ConfigError(
                f"method: peqa trains the scales of quantized weights, but {missing[0]} "
                f"(and {len(missing) - 1} more) is not quantized; put an rtn or gptq step "
                "with the same targets before the peqa step"
            )
        data = text_rows(context.calib_ids, "peqa")
        start = time.perf_counter()

        def make(name: str, module: nn.Linear) -> nn.Module:
            return TrainedScales(module.weight.detach(), layers[name])

        with frozen(model), parametrized(modules, make) as wrapped:
            params = {name: m.log_gain for name, m in wrapped.items()}
            result = train("peqa", params, lm_loss(model), data, self.config.training,
                           context.workdir, context.progress)  # fmt: skip
            with torch.no_grad():
                for name, m in wrapped.items():
                    old = layers[name]
                    layers[name] = LayerQuant(
                        old.scheme, m.scale().detach().clone(), old.zero,
                        old.activations, old.outlier_threshold,
                    )  # fmt: skip
        result.seconds = time.perf_counter() - start
        return result
