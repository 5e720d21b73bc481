"""LLM.int8(): int8 weights per row, int8 activations per token, outliers in float.

Paper: Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", NeurIPS 2022. At run time every input column that
holds an activation of magnitude ≥ ``threshold`` is multiplied in floating
point; the rest go through an int8 matmul (``quantmill.runtime.MixedInt8Linear``).
Calibration only measures how many columns that is, per layer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from quantmill.config import MethodConfig, QuantScheme
from quantmill.layers import LayerQuant, LayerReport
from quantmill.methods.base import Method
from quantmill.methods.calib_inputs import InputRecord, record_inputs
from quantmill.methods.rtn import round_layer
from quantmill.registry import Needs, register_method

ROW_INT8 = QuantScheme(bits=8, group_size=None, symmetric=True)


class LLMInt8Config(MethodConfig):
    method: Literal["llm_int8"] = "llm_int8"
    weights: QuantScheme = Field(default_factory=lambda: ROW_INT8.model_copy())
    threshold: float = Field(6.0, gt=0, description="|x| at or above which a column stays float")

    @field_validator("weights")
    @classmethod
    def _row_int8(cls, value: QuantScheme) -> QuantScheme:
        if (value.bits, value.group_size, value.symmetric) != (8, None, True):
            raise ValueError(
                "LLM.int8() uses 8-bit symmetric per-row weights: set weights to "
                "{bits: 8, group_size: null, symmetric: true} or leave it out"
            )
        return value

    @field_validator("activations")
    @classmethod
    def _no_activations(cls, value: object) -> object:
        if value is not None:
            raise ValueError("LLM.int8() sets its own int8 activations; leave activations out")
        return value


@register_method(
    "llm_int8",
    config=LLMInt8Config,
    needs=Needs(calibration=True, metrics={"llm_int8.outlier_fraction": "outlier_column_fraction"}),
)
class LLMInt8(Method):
    config: LLMInt8Config

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._records: dict[str, InputRecord] = {}
        self._outliers: dict[str, tuple[int, int]] = {}

    @contextmanager
    def observe(
        self, groups: list[list[tuple[str, nn.Module]]], stop_after_last: bool
    ) -> Iterator[None]:
        self._records = {}
        with record_inputs(groups, self._records, 0, stop_after_last):
            yield

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        start = time.perf_counter()
        threshold = self.config.threshold
        scale, zero, loss = round_layer(layer, self.config.weights, self.conv1d)
        record = self._records.get(name)
        extra: dict[str, float | str] = {}
        if record is not None and record.absmax is not None:
            outliers = int((record.absmax >= threshold).sum())
            extra = {
                "outlier_columns": outliers,
                "outlier_fraction": outliers / record.absmax.numel(),
            }
        quant = LayerQuant(self.config.weights, scale, zero, outlier_threshold=threshold)
        return quant, self._timed_report(name, "llm_int8", loss, start, **extra)
