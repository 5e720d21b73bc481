"""SmoothQuant: move activation outliers into the weights, then W8A8.

Paper: Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023. Per input channel,
``s = max|X|^α / max|W|^(1-α)``; ``X`` is divided by ``s`` (folded into the
norm or linear before it, through the architecture's mappings) and the
weight columns multiplied by ``s``. With ``alpha_grid`` each mapping of each
block takes the α whose quantized layers reproduce the float outputs best on
calibration tokens. Weights are then rounded (per-channel int8 by default) and
activations quantized per token at run time — with integer matmuls once the
checkpoint is loaded (``quantmill.runtime.Int8Linear``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from quantmill.arch import ArchSpec, Mapping
from quantmill.config import ActScheme, MethodConfig, QuantScheme
from quantmill.layers import LayerQuant, LayerReport
from quantmill.methods.base import Method
from quantmill.methods.calib_inputs import InputRecord, record_inputs
from quantmill.methods.mappings import MappingConfig, check_mappings, resolve_mappings, unfoldable
from quantmill.methods.rtn import round_layer
from quantmill.quant.act import fake_quantize_tokens
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.quant.smooth import (
    column_max,
    divide_output_channels,
    multiply_input_columns,
    smoothquant_scales,
)
from quantmill.registry import Needs, register_method

Alpha = Annotated[float, Field(ge=0, le=1)]


class SmoothQuantConfig(MethodConfig):
    method: Literal["smoothquant"] = "smoothquant"
    weights: QuantScheme = Field(default_factory=lambda: QuantScheme(bits=8, group_size=None))
    activations: ActScheme | None = Field(default_factory=ActScheme)
    alpha: Alpha = Field(0.5, description="migration strength: 0 keeps X, 1 moves all to W")
    # Search: each mapping of each block takes the α of this list with the lowest
    # output error of its quantized layers on calibration tokens.
    alpha_grid: list[Alpha] | None = None
    score_tokens: int = Field(2048, ge=16, description="calibration tokens that score α")
    mappings: list[MappingConfig] | None = None  # null: the architecture's
    # True: only smooth; a later step (GPTQ, RTN) quantizes the weights.
    smooth_only: bool = False


@register_method(
    "smoothquant",
    config=SmoothQuantConfig,
    needs=Needs(calibration=True, metrics={"smoothquant.alpha": "smoothquant_alpha"}),
)
class SmoothQuant(Method):
    config: SmoothQuantConfig
    label = "smoothquant"

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._records: dict[str, InputRecord] = {}
        self._mappings: list[Mapping] = []

    def check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        custom = self.config.mappings is not None
        self._mappings = resolve_mappings(self.config.mappings, spec)
        check_mappings(model, spec, self._mappings, "mappings", custom)

    @contextmanager
    def observe(
        self, groups: list[list[tuple[str, nn.Module]]], stop_after_last: bool
    ) -> Iterator[None]:
        self._records = {}
        # rows kept from each calibration batch: score_tokens in all once 16 batches are seen
        rows = -(-self.config.score_tokens // 16)
        with record_inputs(groups, self._records, rows, stop_after_last):
            yield

    def prepare_block(self, block, spec, prefix, inputs) -> list[LayerReport]:
        reports = []
        for mapping in self._mappings:
            record = self._records.get(prefix + mapping.balance[0])
            if record is None or record.absmax is None:
                continue  # the balanced layers are not selected in this step
            start = time.perf_counter()
            reason = unfoldable(block, mapping)
            if reason:
                reports.append(self._skipped(prefix + mapping.smooth, reason, start))
                continue
            s, extra = self.mapping_scales(block, mapping, record)
            fold(block, mapping, s)
            loss = extra.pop("loss", float("nan"))
            reports.append(
                self._timed_report(prefix + mapping.smooth, self.label, loss, start, **extra)
            )
        return reports

    def mapping_scales(
        self, block: nn.Module, mapping: Mapping, record: InputRecord
    ) -> tuple[Tensor, dict]:
        cfg = self.config
        weights = [block.get_submodule(n).weight.data.float() for n in mapping.balance]
        w_max = column_max(weights)
        alphas = cfg.alpha_grid or [cfg.alpha]
        loss, alpha = float("nan"), alphas[0]
        if len(alphas) > 1:  # search: the α whose quantized layers best reproduce X Wᵀ
            X = record.rows()[: cfg.score_tokens]
            loss, alpha = min(
                (output_error(X, weights, smoothquant_scales(record.absmax, w_max, a),
                              cfg.weights, cfg.activations), a)
                for a in alphas
            )  # fmt: skip
        s = smoothquant_scales(record.absmax, w_max, alpha)
        after = record.absmax / s
        extra = {
            "alpha": alpha,
            "act_ratio_before": _max_median(record.absmax),
            "act_ratio_after": _max_median(after),
            "loss": loss,
        }
        return s, extra

    def quantize_layer(
        self, name: str, layer: nn.Module
    ) -> tuple[LayerQuant | None, LayerReport | None]:
        if self.config.smooth_only:
            return None, None
        start = time.perf_counter()
        scale, zero, loss = round_layer(layer, self.config.weights, self.conv1d)
        return self.layer_quant(scale, zero), self._timed_report(name, self.label, loss, start)

    def _skipped(self, name: str, reason: str, start: float) -> LayerReport:
        return self._timed_report(name, self.label, float("nan"), start, skipped=reason)


def _max_median(channel_max: Tensor) -> float:
    return float(channel_max.max() / channel_max.median().clamp_min(1e-8))


def fold(block: nn.Module, mapping: Mapping, s: Tensor) -> None:
    """Divide ``smooth``'s outputs by ``s`` and multiply the balanced inputs by ``s`` (exact)."""
    divide_output_channels(block.get_submodule(mapping.smooth), s, mapping.norm_offset)
    for name in mapping.balance:
        multiply_input_columns(block.get_submodule(name), s)


@torch.no_grad()
def output_error(
    X: Tensor,
    weights: list[Tensor],
    s: Tensor,
    scheme: QuantScheme,
    activations: ActScheme | None,
) -> float:
    """Σ ‖Q(X / s) Q(W · s)ᵀ − X Wᵀ‖² over the balanced layers, on sample rows ``X``."""
    Xs = X / s
    if activations is not None:
        Xs = fake_quantize_tokens(Xs, activations)
    total = 0.0
    for W in weights:
        Ws = W * s
        scale, zero = compute_qparams(Ws, scheme)
        total += float((Xs @ fake_quantize(Ws, scale, zero, scheme).t() - X @ W.t()).square().sum())
    return total
