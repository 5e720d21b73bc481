"""Plain-text tables for the terminal."""

from __future__ import annotations

from typing import Any


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MB"


def _ppl(result: dict[str, Any] | None) -> str:
    return "-" if not result else f"{result['perplexity']:.2f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_table(s: dict[str, Any]) -> str:
    """Original vs quantized: perplexity, size, bits per weight, time."""
    windows = (s.get("quantized") or s.get("original") or {}).get("windows")
    bpw = "-" if s["bits_per_weight"] is None else f"{s['bits_per_weight']:.3f}"
    rows = [
        ["original", _ppl(s["original"]), _mb(s["original_size_bytes"]), "-", "-"],
        [
            "quantized",
            _ppl(s["quantized"]),
            _mb(s["size_bytes"]),
            bpw,
            f"{s['quant_seconds']:.1f} s",
        ],
    ]
    head = ["model", "perplexity", "size on disk", "bits/weight", "quantize time"]
    note = f"\nperplexity over {windows} windows" if windows else ""
    return f"{table(head, rows)}{note}\ncheckpoint: {s['out_dir']}"


def eval_table(r: dict[str, Any]) -> str:
    bpw = "-" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.3f}"
    rows = [
        [
            r["model"]["source"],
            f"{r['perplexity']:.2f}",
            str(r["windows"]),
            _mb(r["size_bytes"]),
            bpw,
        ]
    ]
    return table(["model", "perplexity", "windows", "size on disk", "bits/weight"], rows)


def comparison_markdown(rows: list[dict[str, Any]], original: dict[str, Any]) -> str:
    """Recipes side by side (a sweep's table), the original model first."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| recipe | status | perplexity | size (MB) | bits/weight | quantize (s) |",
        "|---|---|---|---|---|---|",
        f"| original | - | {fmt(original.get('perplexity'), '.2f')} "
        f"| {fmt(original.get('size_bytes', 0) / 2**20, '.1f')} | - | - |",
    ]
    for row in rows:
        size = row.get("size_bytes")
        lines.append(
            f"| {row['recipe']} | {row['status']} | {fmt(row.get('perplexity'), '.2f')} "
            f"| {fmt(size and size / 2**20, '.1f')} | {fmt(row.get('bits_per_weight'), '.3f')} "
            f"| {fmt(row.get('quant_seconds'), '.1f')} |"
        )
    return "\n".join(lines)
