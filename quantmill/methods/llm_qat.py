"""LLM-QAT: data-free quantization-aware training by self-distillation.

Paper: Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for Large
Language Models" (2023). The original model writes its own training text
(``quantmill.qat.data``); a copy of it is the teacher. The student's linears
compute with min-max fake-quantized weights (per channel or group, recomputed
from the latent weights every step), per-token fake-quantized inputs and, with
``kv_cache``, fake-quantized keys and values, all straight-through; it is
trained to match the teacher's next-token distribution (KL divergence on
logits). At the end the latent weights are rounded to their grid (RTN), which is
exactly what the student computed with.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from quantmill.config import ActScheme, KVCacheSpec, QuantScheme, TrainSpec
from quantmill.kv_cache import check_kv_supported, kv_cache_quantized
from quantmill.layers import LayerQuant
from quantmill.methods.base import Method
from quantmill.methods.qat_common import (
    TrainingConfig,
    check_linear,
    frozen,
    model_linears,
    parametrized,
)  # fmt: skip
from quantmill.methods.rtn import round_layer
from quantmill.qat.data import generated_dataset
from quantmill.qat.loop import TrainContext, TrainResult, train
from quantmill.qat.ste import fake_quantize_ste
from quantmill.quant.grid import compute_qparams
from quantmill.registry import Needs, register_method
from quantmill.runtime import activation_hooks


class LLMQATConfig(TrainingConfig):
    method: Literal["llm_qat"] = "llm_qat"
    weights: QuantScheme = Field(default_factory=lambda: QuantScheme(bits=4, group_size=None))
    activations: ActScheme | None = Field(default_factory=ActScheme)
    # Keys and values quantized while training; the recipe's evaluation uses the same.
    kv_cache: KVCacheSpec | None = Field(default_factory=KVCacheSpec)
    training: TrainSpec = Field(default_factory=lambda: TrainSpec(lr=2e-5))
    generated_samples: int = Field(
        64, ge=2, description="sequences of training.seq_len tokens the model writes"
    )


class MinMaxOnGrid(nn.Module):
    """Parametrization: the latent weight fake-quantized on its own min-max grid."""

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__()
        self.scheme = scheme

    def forward(self, weight: Tensor) -> Tensor:
        scale, zero = compute_qparams(weight.detach().float(), self.scheme)
        return fake_quantize_ste(weight.float(), scale, zero, self.scheme)


def distillation_loss(student: nn.Module, teacher: nn.Module):
    """KL divergence of the student's next-token distribution from the teacher's, per
    token (the soft cross entropy less the teacher's entropy: 0 when they agree)."""

    def loss(batch: Tensor) -> Tensor:
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), -1)
        logits = student(input_ids=batch, use_cache=False).logits.float()
        kl = target.exp() * (target - torch.log_softmax(logits, -1))
        return kl.sum(-1).mean()

    return loss


@register_method("llm_qat", config=LLMQATConfig, needs=Needs(trains=True))  # data-free
class LLMQAT(Method):
    config: LLMQATConfig

    def check_model(self, model: nn.Module, spec) -> None:
        check_linear(model, spec, "llm_qat")
        if self.config.kv_cache is not None:
            check_kv_supported(model)

    def train(
        self, model: nn.Module, layers: dict[str, LayerQuant], context: TrainContext
    ) -> TrainResult:
        cfg = self.config
        start = time.perf_counter()
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        data = generated_dataset(
            teacher, cfg.generated_samples, cfg.training.seq_len, cfg.training.seed,
            context.cache, context.model_key, context.progress,
        )  # fmt: skip
        modules = model_linears(model, cfg)
        acts = {} if cfg.activations is None else {
            name: {"activations": cfg.activations.model_dump()} for name in modules
        }  # fmt: skip
        with ExitStack() as stack:
            stack.enter_context(frozen(model))
            wrapped = stack.enter_context(
                parametrized(modules, lambda _n, _m: MinMaxOnGrid(cfg.weights), leave=False)
            )
            stack.enter_context(activation_hooks(model, acts))
            stack.enter_context(kv_cache_quantized(model, cfg.kv_cache))
            params = {name: modules[name].parametrizations.weight.original for name in wrapped}
            result = train("llm_qat", params, distillation_loss(model, teacher), data,
                           cfg.training, context.workdir, context.progress)  # fmt: skip
        del teacher
        for name, module in modules.items():  # the latent weights, rounded
            scale, zero, _ = round_layer(module, cfg.weights, conv1d=False)
            layers[name] = self.layer_quant(scale, zero)
        result.seconds = time.perf_counter() - start
        return result
