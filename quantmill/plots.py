"""Plots written as PNG files (matplotlib, headless): what people would rather
look at than read. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


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


def size_vs_perplexity(
    rows: list[dict[str, Any]], path: str | Path, original: dict[str, Any] | None = None
) -> Path:
    """One point per recipe: size on disk (MB) against perplexity; lower-left is better."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.get("perplexity") is None:
            continue
        x, y = row["size_bytes"] / 2**20, row["perplexity"]
        ax.scatter([x], [y], s=30)
        ax.annotate(row["recipe"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if original and original.get("perplexity") is not None:
        x, y = original["size_bytes"] / 2**20, original["perplexity"]
        ax.scatter([x], [y], marker="*", s=120, color="black")
        ax.annotate("original", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity")
    ax.set_title("Size vs perplexity (lower left is better)")
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
