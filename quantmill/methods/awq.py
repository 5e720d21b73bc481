"""AWQ as a pipeline method: scale search per mapping, optional clip search per layer.

Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024. For every mapping (norm → q/k/v,
norm → gate/up, up → down, v → o where shapes allow), channel scales
``s = mean|X|^r`` are searched over ``grid`` exponents, scored by the
quantized layers' output error on calibration tokens, and folded into the
layer before. Each layer's grid is then optionally clipped (``clip``), scored
the same way, and its weights rounded.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from quantmill.config import MethodConfig
from quantmill.layers import LayerReport, get_weight, set_weight
from quantmill.methods.mappings import MappingConfig
from quantmill.methods.smoothquant import SmoothQuant
from quantmill.quant.awq import search_clip, search_scales
from quantmill.quant.grid import fake_quantize
from quantmill.registry import Needs, register_method


class AWQConfig(MethodConfig):
    method: Literal["awq"] = "awq"
    grid: int = Field(20, ge=1, le=200, description="exponents tried in [0, 1)")
    clip: bool = Field(True, description="search a clipping range per group")
    clip_grid: int = Field(20, ge=2, le=200)
    max_shrink: float = Field(0.5, gt=0, lt=1, description="least range kept: 1 - max_shrink")
    score_tokens: int = Field(2048, ge=16, description="calibration tokens that score scales")
    clip_tokens: int = Field(512, ge=16, description="calibration tokens that score clipping")
    mappings: list[MappingConfig] | None = None  # null: the architecture's
    # True: only move scales; a later step (GPTQ, RTN) quantizes the weights.
    smooth_only: bool = False


@register_method(
    "awq", config=AWQConfig, needs=Needs(calibration=True, metrics={"awq.ratio": "awq_ratio"})
)
class AWQ(SmoothQuant):
    config: AWQConfig  # type: ignore[assignment]
    label = "awq"

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._folded: dict[str, Tensor] = {}  # layer → the s its inputs are now divided by

    def prepare_block(self, block, spec, prefix, inputs) -> list[LayerReport]:
        self._folded = {}
        return super().prepare_block(block, spec, prefix, inputs)

    def mapping_scales(self, block, mapping, record) -> tuple[Tensor, dict]:
        cfg = self.config
        weights = [block.get_submodule(n).weight.data.float() for n in mapping.balance]
        X = record.rows()[: cfg.score_tokens]
        s, ratio, err, plain = search_scales(X, record.mean_abs(), weights, cfg.weights, cfg.grid)
        for name in mapping.balance:
            self._folded[name] = s
        return s, {"ratio": ratio, "loss": err, "rtn_loss": plain}

    def quantize_layer(self, name: str, layer: nn.Module):
        if self.config.smooth_only:
            return None, None
        if not self.config.clip:
            return super().quantize_layer(name, layer)
        start = time.perf_counter()
        cfg = self.config
        record = self._records.get(name)
        W = get_weight(layer, self.conv1d).float()
        X = record.rows()[: cfg.clip_tokens] if record is not None else W.new_zeros(0, W.shape[1])
        local = _local_name(name, self._folded)
        if local is not None:
            X = X / self._folded[local]
        scale, zero = search_clip(W, X, cfg.weights, cfg.clip_grid, cfg.max_shrink)
        Q = fake_quantize(W, scale, zero, cfg.weights)
        set_weight(layer, Q, self.conv1d)
        loss = float((X @ (Q - W).t()).square().sum())
        return self.layer_quant(scale, zero), self._timed_report(name, "awq", loss, start)


def _local_name(name: str, folded: dict[str, Tensor]) -> str | None:
    """The block-local name in ``folded`` that ``name`` (a full module name) ends with."""
    for local in folded:
        if name.endswith("." + local):
            return local
    return None
