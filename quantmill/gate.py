"""The quality gate a quantized model passes before it becomes a release candidate.

Perplexity recovery is ``original perplexity / quantized perplexity``: 1.0 means
nothing was lost, 0.8 means perplexity grew by a quarter. The recipe sets the
least recovery it accepts (``gate.min_recovery``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from quantmill.config import QualityGate


@dataclass(frozen=True)
class GateResult:
    passed: bool
    recovery: float | None
    min_recovery: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gate(gate: QualityGate, original: float | None, quantized: float | None) -> GateResult:
    """Compare the perplexity recovery with the gate's threshold."""
    need = gate.min_recovery
    if original is None or quantized is None:
        missing = "original" if original is None else "quantized"
        return GateResult(
            False,
            None,
            need,
            f"failed: no {missing} perplexity was measured, so recovery "
            "is unknown; evaluate the checkpoint (evaluation.max_windows >= 1)",
        )
    if not (math.isfinite(original) and math.isfinite(quantized)) or quantized <= 0:
        return GateResult(False, None, need, f"failed: perplexity {quantized} is not finite")
    recovery = original / quantized
    figures = (
        f"perplexity recovery {recovery:.3f} (original {original:.2f} / quantized {quantized:.2f})"
    )
    if recovery >= need:
        return GateResult(True, recovery, need, f"passed: {figures} >= {need:.3f}")
    return GateResult(
        False,
        recovery,
        need,
        f"failed: {figures} is below the recipe's gate.min_recovery {need:.3f}",
    )
