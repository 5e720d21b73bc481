"""Plain-text tables for the terminal."""

from __future__ import annotations

from typing import Any

from quantmill.moe import token_summary


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
    tasks = tasks_table(s.get("original"), s.get("quantized"))
    recovery = (s.get("accuracy") or {}).get("mean_recovery")
    if tasks:
        note += f"\n\n{tasks}"
    if recovery is not None:
        note += f"\nmean accuracy recovery {recovery:.3f}"
    experts = token_summary(s.get("layers") or [])
    if experts:
        note += f"\n{experts}"
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
    text = table(["model", "perplexity", "windows", "size on disk", "bits/weight"], rows)
    tasks = tasks_table(None, r)
    return f"{text}\n\n{tasks}" if tasks else text


def comparison_markdown(rows: list[dict[str, Any]], original: dict[str, Any]) -> str:
    """Recipes side by side (a sweep's table), the original model first."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    tasks = any(row.get("accuracy_mean") is not None for row in rows)
    acc_head = " mean accuracy | accuracy recovery |" if tasks else ""
    lines = [
        f"| recipe | status | perplexity |{acc_head} size (MB) | bits/weight | quantize (s) |",
        "|---|---|---|" + ("---|---|" if tasks else "") + "---|---|---|",
        f"| original | - | {fmt(original.get('perplexity'), '.2f')} "
        + (f"| {fmt(original.get('mean_accuracy'), '.4f')} | - " if tasks else "")
        + f"| {fmt(original.get('size_bytes', 0) / 2**20, '.1f')} | - | - |",
    ]
    for row in rows:
        size = row.get("size_bytes")
        mean, kept = fmt(row.get("accuracy_mean"), ".4f"), fmt(row.get("accuracy_recovery"), ".3f")
        accuracy = f"| {mean} | {kept} " if tasks else ""
        lines.append(
            f"| {row['recipe']} | {row['status']} | {fmt(row.get('perplexity'), '.2f')} "
            f"{accuracy}| {fmt(size and size / 2**20, '.1f')} "
            f"| {fmt(row.get('bits_per_weight'), '.3f')} | {fmt(row.get('quant_seconds'), '.1f')} |"
        )
    return "\n".join(lines)


def tasks_table(original: dict[str, Any] | None, quantized: dict[str, Any] | None) -> str:
    """Zero-shot tasks: each metric ± its standard error, original beside quantized."""
    orig, quant = (original or {}).get("tasks") or {}, (quantized or {}).get("tasks") or {}
    names = list(dict.fromkeys([*quant, *orig]))
    if not names:
        return ""
    rows = []
    for name in names:
        base = quant.get(name) or orig[name]
        for metric in base["metrics"]:
            values = [_metric(orig.get(name), metric)] if orig else []
            rows.append([name, metric, *values, _metric(quant.get(name), metric)])
    docs = ", ".join(f"{n} {(quant.get(n) or orig[n])['documents']}" for n in names)
    head = ["task", "metric", "original", "quantized"] if orig else ["task", "metric", "value"]
    return f"{table(head, rows)}\ndocuments: {docs}"


def _metric(task: dict[str, Any] | None, metric: str) -> str:
    if not task or metric not in task["metrics"]:
        return "-"
    value, err = task["metrics"][metric], task["stderr"].get(metric)
    return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")
