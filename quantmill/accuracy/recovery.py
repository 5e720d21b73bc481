"""Accuracy recovery: how much of the original model's zero-shot accuracy is kept.

Per task, recovery is ``quantized / original`` of the task's primary metric (``acc``
where the harness reports it); the run's figure is the mean over its tasks, as
llm-compressor's CI computes it. Pure functions over the result dicts that
``quantmill.accuracy.harness`` writes.
"""

from __future__ import annotations

from typing import Any


def mean_score(tasks: dict[str, dict[str, Any]]) -> float | None:
    """Mean of each task's primary metric; ``None`` without tasks."""
    scores = [t["metrics"][t["primary"]] for t in tasks.values()]
    return sum(scores) / len(scores) if scores else None


def accuracy_recovery(
    original: dict[str, dict[str, Any]], quantized: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per-task and mean recovery of the tasks both results hold (empty dict: none)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, q in quantized.items():
        o = original.get(name)
        if o is None:
            continue
        metric = q["primary"]
        before, after = o["metrics"].get(metric), q["metrics"][metric]
        ratio = after / before if before else None
        rows[name] = {"metric": metric, "original": before, "quantized": after, "recovery": ratio}
    if not rows:
        return {}
    ratios = [r["recovery"] for r in rows.values() if r["recovery"] is not None]
    return {
        "tasks": rows,
        "mean_original": mean_score({n: original[n] for n in rows}),
        "mean_quantized": mean_score({n: quantized[n] for n in rows}),
        "mean_recovery": sum(ratios) / len(ratios) if ratios else None,
    }


def worst_tasks(recovery: dict[str, Any], below: float) -> list[tuple[str, float]]:
    """``(task, recovery)`` of the tasks under ``below``, worst first."""
    rows = recovery.get("tasks", {})
    low = [(n, r["recovery"]) for n, r in rows.items() if r["recovery"] is not None]
    return sorted([x for x in low if x[1] < below], key=lambda x: x[1])
