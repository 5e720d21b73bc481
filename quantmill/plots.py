"""Plots written as PNG files (matplotlib, headless): what people would rather
look at than read. matplotlib is imported only when a plot is drawn.

pyplot is not thread-safe (its figure manager and text parser are shared), and
a sweep records its recipes from several threads at once: every plot is drawn
under one lock.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_DRAWING = threading.RLock()


def _one_at_a_time(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _DRAWING:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


@_one_at_a_time
def layer_loss(layers: list[dict[str, Any]], path: str | Path) -> Path:
    """Each quantized layer's reconstruction loss, in model order (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    kinds: dict[str, list[tuple[int, float]]] = {}
    for index, layer in enumerate(layers):
        loss = float(layer["loss"])
        if math.isfinite(loss) and loss > 0:
            kinds.setdefault(layer["name"].rsplit(".", 1)[-1], []).append((index, loss))
    for kind, points in sorted(kinds.items()):
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("quantization loss")
    ax.set_title("Per-layer quantization loss")
    if kinds:
        ax.legend(fontsize=7, ncols=4)
    return _save(fig, plt, path)


@_one_at_a_time
def size_vs_perplexity(
    rows: list[dict[str, Any]], path: str | Path, original: dict[str, Any] | None = None
) -> Path:
    """One point per recipe: size on disk (MB) against perplexity (lower left is better)
    and, when the recipes evaluated zero-shot tasks, a second panel of size against mean
    accuracy (upper left is better)."""
    plt = _pyplot()
    accuracy = any(row.get("accuracy_mean") is not None for row in rows)
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(12 if accuracy else 7, 4.5))
    panels = [
        ("perplexity", "perplexity", "perplexity", "Size vs perplexity (lower left is better)")
    ]
    if accuracy:
        panels.append(
            ("accuracy_mean", "mean_accuracy", "mean zero-shot accuracy",
             "Size vs mean accuracy (upper left is better)")
        )  # fmt: skip
    for ax, (key, original_key, label, title) in zip(
        axes if accuracy else [axes], panels, strict=True
    ):
        _size_panel(ax, rows, original, key, original_key)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def _size_panel(ax, rows, original, key: str, original_key: str) -> None:
    for row in rows:
        if row.get(key) is None or not row.get("size_bytes"):
            continue
        x, y = row["size_bytes"] / 2**20, row[key]
        ax.scatter([x], [y], s=30)
        ax.annotate(row["recipe"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if original and original.get(original_key) is not None and original.get("size_bytes"):
        x, y = original["size_bytes"] / 2**20, original[original_key]
        ax.scatter([x], [y], marker="*", s=120, color="black")
        ax.annotate("original", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


# block reports of block-wise tuning methods → the plot's title
BLOCK_TUNING = {
    "zeroquant-lkd": "Layer-wise distillation (ZeroQuant LKD)",
    "autoround-block": "AutoRound: signed gradient descent on rounding and ranges",
}


@_one_at_a_time
def distillation(layers: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Block-wise tuning (ZeroQuant's LKD, AutoRound): each block's output error after
    rounding and after tuning."""
    blocks = [r for r in layers if r.get("method") in BLOCK_TUNING]
    if not blocks:
        return None
    title = BLOCK_TUNING[blocks[0]["method"]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    index = list(range(len(blocks)))
    ax.plot(index, [r["extra"]["initial_loss"] for r in blocks], "o-", label="rounded (RTN)")
    ax.plot(index, [r["loss"] for r in blocks], "o-", label="after tuning")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("block output MSE")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


@_one_at_a_time
def training(results: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Quantization-aware training: loss per step (and learning rate) of each training step."""
    results = [r for r in results if r.get("history")]
    if not results:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    lr_ax = ax.twinx()
    for result in results:
        steps = [h["step"] for h in result["history"]]
        ax.plot(
            steps, [h["loss"] for h in result["history"]], lw=1, label=f"{result['method']} loss"
        )
        lr_ax.plot(steps, [h["lr"] for h in result["history"]], "--", lw=0.8, color="grey")
        if result.get("resumed_from"):
            ax.axvline(result["resumed_from"], color="red", lw=0.8, label="resumed")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    lr_ax.set_ylabel("learning rate (dashed)")
    ax.set_title("Quantization-aware training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


@_one_at_a_time
def outlier_columns(layers: list[dict[str, Any]], path: str | Path) -> Path | None:
    """LLM.int8(): the share of each layer's input columns over the threshold in calibration."""
    rows = [r for r in layers if "outlier_fraction" in r.get("extra", {})]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    kinds: dict[str, list[tuple[int, float]]] = {}
    for index, row in enumerate(rows):
        kind = row["name"].rsplit(".", 1)[-1]
        kinds.setdefault(kind, []).append((index, 100 * row["extra"]["outlier_fraction"]))
    for kind, points in sorted(kinds.items()):
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, label=kind)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("float columns (%)")
    ax.set_title("LLM.int8(): input columns over the outlier threshold")
    ax.legend(fontsize=7, ncols=4)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@_one_at_a_time
def outlier_stats(layers: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Per-layer outlier figures in model order (``quantmill.outliers`` layer dicts):
    activation max/median ratio, activation and weight kurtosis (log scales) and
    outlier channel count, coloured by layer kind."""
    plt = _pyplot()
    fig, (ratio, kurt, count) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    labels = _kind_labels([layer["kind"] for layer in layers])
    colours = plt.get_cmap("tab10")
    for number, kind in enumerate(labels):
        points = [(i, layer) for i, layer in enumerate(layers) if layer["kind"] == kind]
        xs = [i for i, _ in points]
        style = {"s": 12, "color": colours(number % 10)}
        ratio.scatter(xs, [_positive(p["act_max_median_ratio"]) for _, p in points], **style)
        kurt.scatter(xs, [_positive(p["act_kurtosis"]) for _, p in points], **style)
        weights = [_positive(p["weight_kurtosis"]) for _, p in points]
        kurt.scatter(xs, weights, marker="x", **style)
        count.scatter(xs, [p["act_outlier_count"] for _, p in points], **style)
        ratio.scatter([], [], label=labels[kind], **style)  # one legend entry per kind
    ratio.set_yscale("log")
    ratio.set_ylabel("activation\nmax / median")
    kurt.set_yscale("log")
    kurt.set_ylabel("kurtosis\n(● activations, × weights)")
    kurt.axhline(3.0, color="grey", linewidth=0.8, linestyle="--")  # a Gaussian's
    count.set_ylabel("outlier\nchannels")
    count.set_xlabel("layer (model order)")
    for ax in (ratio, kurt, count):
        ax.grid(alpha=0.3)
    if labels:  # above the top panel, where it hides no point
        ratio.legend(
            fontsize=8, ncols=min(len(labels), 7), loc="lower left", bbox_to_anchor=(0, 1.0)
        )
    fig.suptitle(title or "Outliers per layer: activations and weights")
    return _save(fig, plt, path)


def _kind_labels(kinds: list[str]) -> dict[str, str]:
    """Each kind's legend label: its last name part (q_proj), unless two kinds share it."""
    unique = list(dict.fromkeys(kinds))
    short = [kind.rsplit(".", 1)[-1] for kind in unique]
    return {k: s if short.count(s) == 1 else k for k, s in zip(unique, short, strict=True)}


def _positive(value: float | None) -> float:
    """Log axes skip NaN; zero, negative, missing and inf values become NaN."""
    if value is None or not math.isfinite(value) or value <= 0:
        return math.nan
    return float(value)
