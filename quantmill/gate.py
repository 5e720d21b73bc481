"""The quality gate a quantized model passes before it becomes a release candidate.

Perplexity recovery is ``original perplexity / quantized perplexity``: 1.0 means
nothing was lost, 0.8 means perplexity grew by a quarter. The recipe sets the
least recovery it accepts (``gate.min_recovery``). With ``gate.min_accuracy_recovery``
the mean zero-shot accuracy recovery over the run's tasks (quantized / original, as
llm-compressor's CI gates on it) must reach that too; a failure names the tasks that
lost the most.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from quantmill.accuracy.recovery import worst_tasks
from quantmill.config import QualityGate


@dataclass(frozen=True)
class GateResult:
    passed: bool
    recovery: float | None
    min_recovery: float
    reason: str
    accuracy_recovery: float | None = None
    min_accuracy_recovery: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gate(
    gate: QualityGate,
    original: float | None,
    quantized: float | None,
    accuracy: dict[str, Any] | None = None,
) -> GateResult:
    """Both rules: perplexity recovery, then (when the gate sets it) accuracy recovery.
    ``accuracy`` is ``quantmill.accuracy.recovery.accuracy_recovery``'s result."""
    result = _perplexity_rule(gate, original, quantized)
    need = gate.min_accuracy_recovery
    if need is None:
        return result
    passed, found, why = _accuracy_rule(need, accuracy or {})
    both = result.passed and passed
    reason = _lead(both, f"{result.reason}; {why}")
    return GateResult(both, result.recovery, result.min_recovery, reason, found, need)


def _lead(passed: bool, reason: str) -> str:
    """One verdict at the front of a reason joined from both rules."""
    body = reason.removeprefix("passed: ").removeprefix("failed: ")
    body = body.replace("; passed: ", "; ").replace("; failed: ", "; ")
    return ("passed: " if passed else "failed: ") + body


def _accuracy_rule(need: float, accuracy: dict[str, Any]) -> tuple[bool, float | None, str]:
    mean = accuracy.get("mean_recovery")
    if mean is None or not math.isfinite(mean):
        return (
            False,
            None,
            "failed: no zero-shot accuracy was measured for both models, so accuracy "
            "recovery is unknown; list tasks in evaluation.tasks (or pass --tasks)",
        )
    figures = f"mean accuracy recovery {mean:.3f} over {len(accuracy.get('tasks', {}))} tasks"
    if mean >= need:
        return True, mean, f"passed: {figures} >= {need:.3f}"
    worst = worst_tasks(accuracy, need) or worst_tasks(accuracy, float("inf"))[:1]
    named = ", ".join(
        f"{name} {accuracy['tasks'][name]['metric']} {accuracy['tasks'][name]['quantized']:.3f}"
        f" vs {accuracy['tasks'][name]['original']:.3f} (recovery {ratio:.3f})"
        for name, ratio in worst
    )
    return (
        False,
        mean,
        f"failed: {figures} is below the recipe's gate.min_accuracy_recovery {need:.3f}; "
        f"lost most: {named}",
    )


def _perplexity_rule(gate: QualityGate, original: float | None, quantized: float | None):
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
