"""GPTQ as a pipeline method: Hessians from hooks, math in ``quant/gptq.py``.

Paper: Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from quantmill.config import MethodConfig, MixedPrecision
from quantmill.layers import LayerQuant, LayerReport, get_weight, set_weight
from quantmill.methods.base import Method, accumulating
from quantmill.quant.gptq import (
    HessianAccumulator,
    HessianNotPositiveDefinite,
    NoCalibrationInputs,
    gptq_quantize_weight,
)
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.quant.refit import refit_scales
from quantmill.registry import Needs, register_method

log = logging.getLogger(__name__)


class GPTQConfig(MethodConfig):
    takes_importance = True  # the Hessian's diagonal
    method: Literal["gptq"] = "gptq"
    block_size: int = Field(128, ge=1, le=8192, description="columns per lazy batch update")
    dampening: float = Field(0.01, gt=0, le=1, description="λ as a fraction of mean(diag H)")
    # Quantize columns in order of decreasing Hessian diagonal (the paper's "act-order").
    actorder: bool = True
    # Group parameters from the original weights rather than the error-updated ones.
    static_groups: bool = False
    # Afterwards, each row's scales refitted to the chosen integers by least squares on
    # the damped Hessian (``quant/refit.py``): the output error only falls, the
    # integers stay. On since 2026-12-06, chosen on held-out validation text
    # (benchmarks/gptq_refit.py: lower at all five settings measured, geomean -1.1%).
    refit_scales: bool = True
    # Rounds of GPTQ and refit: each round after the first runs GPTQ again on the grid
    # the last refit left (its integers chosen anew, with the error feedback) and refits
    # that; the layer keeps the round of least damped output error. 2 since 2026-12-07,
    # chosen on held-out validation text (benchmarks/gptq_refit.py --rounds: geomean over
    # five settings 28.58 / 28.29 / 28.25 for 1 / 2 / 3 rounds; the fewest within 0.25%
    # of the lowest, as a round costs most at large layers).
    refit_rounds: int = Field(2, ge=1, le=8, description="GPTQ + refit rounds per layer")
    # True: each block's Hessians come from inputs that went through the blocks already
    # quantized (the paper's scheme). False: Hessians of the original model, collected
    # once and shared by every such recipe of a sweep (the pipeline caches them).
    sequential: bool = True
    # per-layer schemes under a size budget (``weights`` is then unused)
    mixed: MixedPrecision | None = None

    @model_validator(mode="after")
    def _rounds(self) -> GPTQConfig:
        if self.refit_scales:
            return self
        if "refit_rounds" in self.model_fields_set and self.refit_rounds > 1:
            raise ValueError(
                f"refit_rounds: {self.refit_rounds} rounds need refit_scales: true "
                "(each round after the first starts from the last refit's scales); "
                "set refit_scales: true or refit_rounds: 1"
            )
        object.__setattr__(self, "refit_rounds", 1)  # no refit: one GPTQ, one round
        return self


@register_method(
    "gptq",
    config=GPTQConfig,
    needs=Needs(calibration=True),
    varies=lambda step: {"shared_statistics": not step.sequential},
)
class GPTQ(Method):
    config: GPTQConfig

    def __init__(self, config: MethodConfig, conv1d: bool = False) -> None:
        super().__init__(config, conv1d)
        self._hessians: dict[str, HessianAccumulator] = {}

    @contextmanager
    def observe(
        self, groups: list[list[tuple[str, nn.Module]]], stop_after_last: bool
    ) -> Iterator[None]:
        self._hessians = {}  # layers sharing an input share one Hessian

        def make(first: nn.Module) -> HessianAccumulator:
            return HessianAccumulator(get_weight(first, self.conv1d).shape[1])

        with accumulating(groups, make, stop_after_last, self._hessians):
            yield

    def use_statistics(self, names: list[str], statistics) -> None:
        self._hessians = {name: _Given(statistics, name) for name in names}

    def quantize_layer(self, name: str, layer: nn.Module) -> tuple[LayerQuant, LayerReport]:
        start = time.perf_counter()
        cfg = self.config
        scheme, choice = self.scheme_for(name)
        W = get_weight(layer, self.conv1d).float()
        source = self._hessians.pop(name)
        # the last layer of a group sharing one Hessian takes it from the accumulator
        last = all(other is not source for other in self._hessians.values())
        try:
            H = source.take() if last else source.hessian()
            result = gptq_quantize_weight(
                W, H, scheme, cfg.block_size, cfg.dampening, cfg.actorder,
                cfg.static_groups, keep_factor=cfg.refit_rounds > 1,
            )  # fmt: skip
        except (HessianNotPositiveDefinite, NoCalibrationInputs) as exc:
            # Fall back to round-to-nearest for this layer and say so in its report
            # (an expert no calibration token reached has no Hessian at all).
            log.warning("%s: %s; falling back to RTN for this layer", name, exc)
            scale, zero = compute_qparams(W, scheme)
            Q = fake_quantize(W, scale, zero, scheme)
            set_weight(layer, Q, self.conv1d)
            report = self._timed_report(
                name, "gptq", float("nan"), start, fallback="rtn", fallback_reason=str(exc),
                **choice,
            )  # fmt: skip
            return self.layer_quant(scale, zero, scheme), report
        if cfg.refit_scales:
            weight, scale, extra = self._refit(W, H, result, scheme)
        else:
            weight, scale, extra = result.weight, result.scale, {}
        result.factor = None  # the rounds' shared factorization: not needed any more
        set_weight(layer, weight, self.conv1d)
        report = self._timed_report(
            name, "gptq", result.loss, start, dampening=result.dampening, **extra, **choice
        )
        return self.layer_quant(scale, result.zero, scheme), report

    def _refit(self, W, H, result, scheme):
        """The refit, and its further rounds (``refit_rounds``): the weights, scales and
        report entries of the round of least damped output error. A later round reuses
        the first's factorization of ``H`` (``result.factor``: the same results as
        factorizing again, without the copy and the two Cholesky factorizations)."""
        cfg = self.config
        refit = refit_scales(W, H, result.weight, result.scale, result.zero, scheme,
                             result.dampening)  # fmt: skip
        result.weight = None  # a layer-sized tensor no round needs again
        first, best, chosen = refit.error_before, refit, 1
        for round_ in range(2, cfg.refit_rounds + 1):
            again = gptq_quantize_weight(
                W, H, scheme, cfg.block_size, cfg.dampening, cfg.actorder,
                grid=(refit.scale, result.zero), factor=result.factor,
            )  # fmt: skip
            refit = refit_scales(W, H, again.weight, again.scale, again.zero, scheme,
                                 again.dampening)  # fmt: skip
            del again
            if refit.error_after < best.error_after:
                best, chosen = refit, round_
        extra = {"refit_gain": 1 - best.error_after / max(first, 1e-30)}
        if cfg.refit_rounds > 1:
            extra["refit_round"] = chosen
        return best.weight, best.scale, extra


class _Given:
    """A Hessian read from saved statistics when needed, with the accumulator's
    interface (none saved: no calibration input reached the layer)."""

    def __init__(self, statistics, name: str) -> None:
        self.statistics, self.name, self.H = statistics, name, None

    def hessian(self):
        if self.H is None:
            try:
                self.H = self.statistics.hessian(self.name)
            except KeyError:
                raise NoCalibrationInputs("no calibration inputs reached this layer") from None
        return self.H

    def take(self):
        H, self.H = self.hessian(), None
        return H
