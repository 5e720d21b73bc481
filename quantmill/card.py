"""What a published checkpoint says about itself: its lineage (base model and
license), its evaluation and recipe, and the model card (``README.md`` with
YAML metadata) that the Hub shows.

Everything here reads files a quantization wrote (``quantmill_eval.json``,
``quantmill_recipe.yaml``) and returns text: no network, so the card that goes
to the Hub is the card a test can read. The card holds no timestamps, so the
same checkpoint always gives the same card and re-publishing changes nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantmill.errors import CheckpointError
from quantmill.folder import (
    CARD_FILE,
    CONFIG_FILE,
    RECIPE_FILE,
    SOURCE_FILE,
    SUMMARY_FILE,
    Checkpoint,
)
from quantmill.gate import GateResult, check_gate
from quantmill.recipe import Recipe


@dataclass(frozen=True)
class BaseModelInfo:
    """Where the quantized model comes from: a Hub repo id when known, and its license."""

    name: str  # plain name, e.g. "SmolLM2-135M-Instruct"
    repo_id: str | None
    license: str | None
    revision: str | None


@dataclass
class CheckpointInfo:
    """A quantized checkpoint folder and what its quantization recorded."""

    folder: Path
    recipe: Recipe
    summary: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path) -> CheckpointInfo:
        from quantmill.recipe import load_recipe

        folder = Path(folder)
        needed = (SUMMARY_FILE, RECIPE_FILE, CONFIG_FILE)
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is not a quantmill checkpoint: {', '.join(missing)} missing. "
                "Pass the output folder of `quantmill run` or `quantmill quantize`."
            )
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        return cls(folder, load_recipe(folder / RECIPE_FILE), summary)

    @property
    def perplexity(self) -> float | None:
        return (self.summary.get("quantized") or {}).get("perplexity")

    @property
    def original_perplexity(self) -> float | None:
        return (self.summary.get("original") or {}).get("perplexity")

    def gate(self) -> GateResult:
        """The recipe's quality gate, failed also by a serving engine that was asked to
        load the checkpoint and could not (``quantmill_serving.json``)."""
        gate = check_gate(
            self.recipe.gate, self.original_perplexity, self.perplexity,
            self.summary.get("accuracy"),
        )  # fmt: skip
        refused = [(k, v) for k, v in self.serving().items() if not v.get("ok")]
        if not gate.passed or not refused:
            return gate
        engine, found = refused[0]
        reason = f"failed: {engine} cannot serve it ({found.get('reason')}); {gate.reason}"
        return GateResult(
            False, gate.recovery, gate.min_recovery, reason,
            gate.accuracy_recovery, gate.min_accuracy_recovery,
        )  # fmt: skip

    def serving(self) -> dict[str, dict[str, Any]]:
        return Checkpoint(self.folder).serving()

    def base(self) -> BaseModelInfo:
        return base_model_info(self.summary.get("model") or {})

    def bits(self) -> list[int]:
        return sorted(
            {s.bits for step in self.recipe.steps if step.quantizes for s in step.weight_schemes()}
        )

    def methods(self) -> list[str]:
        return list(dict.fromkeys(step.method for step in self.recipe.steps))


def base_model_info(model: dict[str, Any]) -> BaseModelInfo:
    """Lineage of a resolved model (``ResolvedModel.to_dict()``)."""
    from quantmill.sources import PRESETS

    kind, source = model.get("kind"), str(model.get("source") or "model")
    revision = model.get("revision")
    if kind == "preset" and source in PRESETS:
        preset = PRESETS[source]
        return BaseModelInfo(_name(preset.base_model), preset.base_model, preset.license, revision)
    folder = Path(str(model.get("path") or ""))
    if kind == "hub":
        meta = card_metadata(folder / CARD_FILE)
        return BaseModelInfo(_name(source), source, meta.get("license"), revision)
    lineage = _read_json(folder / SOURCE_FILE)
    meta = card_metadata(folder / CARD_FILE)
    repo_id = lineage.get("base_model") or _str(meta.get("base_model"))
    license_ = lineage.get("license") or meta.get("license")
    name = _name(repo_id) if repo_id else (folder.name or _name(source))
    return BaseModelInfo(name, repo_id, license_, revision)


def card_metadata(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card, or ``{}``."""
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def card_tags(info: CheckpointInfo) -> list[str]:
    tags = ["quantmill", "quantized", "compressed-tensors", *info.methods()]
    tags += [f"{bits}-bit" for bits in info.bits()]
    return tags


def render_card(info: CheckpointInfo, repo_id: str | None = None) -> str:
    """``README.md`` for the checkpoint: YAML metadata, evaluation, recipe, how to load."""
    base = info.base()
    meta: dict[str, Any] = {}
    if base.repo_id:
        meta["base_model"] = base.repo_id
        meta["base_model_relation"] = "quantized"
    meta["license"] = base.license or "other"
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = card_tags(info)
    title = repo_id.split("/")[-1] if repo_id else f"{base.name}-{info.recipe.name}"
    load_id = repo_id or str(info.folder)
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---",
        f"# {title}",
        _intro(info, base),
        "## Serving\n\n" + serving_notes(info),
        "## Evaluation\n\n" + evaluation_table(info),
        "## Recipe\n\n```yaml\n" + yaml.safe_dump(info.recipe.to_dict(), sort_keys=False) + "```",
        "## How to load\n\n" + _how_to_load(load_id),
        "## Reproduce\n\n" + _reproduce(info, base),
    ]
    return "\n\n".join(parts) + "\n"


def evaluation_table(info: CheckpointInfo) -> str:
    summary = info.summary
    evaluation = (summary.get("recipe") or {}).get("evaluation") or {}
    quantized = summary.get("quantized") or {}
    rows = [
        "| model | perplexity | bits per weight | size (MB) |",
        "|---|---|---|---|",
        f"| original | {_fmt(info.original_perplexity)} | float | "
        f"{_mb(summary.get('original_size_bytes'))} |",
        f"| this model | {_fmt(info.perplexity)} | {_fmt(summary.get('bits_per_weight'), 3)} | "
        f"{_mb(summary.get('size_bytes'))} |",
    ]
    gate = info.gate()
    windows = quantized.get("windows", evaluation.get("max_windows"))
    seq_len = quantized.get("seq_len", evaluation.get("seq_len"))
    notes = [
        f"Perplexity on `{evaluation.get('dataset')}` "
        f"({evaluation.get('dataset_config') or evaluation.get('split', '')}), "
        f"windows of {seq_len} tokens: {windows}. Bits per weight count the quantized "
        "layers' integers, scales and zero points.",
        f"Quality gate: {gate.reason}",
    ]
    tasks = tasks_table(summary)
    if tasks:
        notes.insert(1, tasks)
    notes += mixed_notes(info)
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes)


def mixed_notes(info: CheckpointInfo) -> list[str]:
    """A line per mixed-precision step: how many layers got each scheme, and the budget
    (the whole map is the recipe's ``mixed.chosen``)."""
    notes = []
    for step in info.recipe.steps:
        mixed = getattr(step, "mixed", None)
        if mixed is None or not mixed.chosen:
            continue
        counts = Counter(mixed.schemes[i].label() for i in mixed.chosen.values())
        shares = ", ".join(f"{n} layers {label}" for label, n in sorted(counts.items()))
        notes.append(
            f"Mixed precision ({step.method}, chosen by {mixed.choose} under "
            f"{mixed.target_bits_per_weight} bits per weight): {shares}; the map is the "
            "recipe's `mixed.chosen`."
        )
    return notes


def tasks_table(summary: dict[str, Any]) -> str:
    """Zero-shot accuracy per task and metric (± standard error), original beside this
    model, with the recovery of each task's primary metric; "" without tasks."""
    orig = (summary.get("original") or {}).get("tasks") or {}
    quant = (summary.get("quantized") or {}).get("tasks") or {}
    if not quant:
        return ""
    recovery = (summary.get("accuracy") or {}).get("tasks", {})
    rows = ["| task | metric | original | this model | recovery |", "|---|---|---|---|---|"]
    for name, task in quant.items():
        for metric in task["metrics"]:
            ratio = recovery.get(name, {}).get("recovery") if metric == task["primary"] else None
            rows.append(
                f"| {name} | {metric} | {_pm(orig.get(name), metric)} | {_pm(task, metric)} "
                f"| {_fmt(ratio, 3) if ratio is not None else ''} |"
            )
    mean = summary.get("accuracy") or {}
    if mean.get("mean_recovery") is not None:
        rows.append(
            f"| **mean** | primary | {_fmt(mean.get('mean_original'), 4)} "
            f"| {_fmt(mean.get('mean_quantized'), 4)} | {_fmt(mean['mean_recovery'], 3)} |"
        )
    limit = ((summary.get("recipe") or {}).get("evaluation") or {}).get("limit")
    docs = ", ".join(f"{n} {t['documents']}" for n, t in quant.items())
    where = "limited to " + str(limit) + " documents per task" if limit else "full sets"
    note = (
        f"Zero-shot accuracy through lm-evaluation-harness ({where}: {docs}); the primary "
        "metric (acc) gives the mean and the recovery (this model / original)."
    )
    return "\n".join(rows) + "\n\n" + note


def _pm(task: dict[str, Any] | None, metric: str) -> str:
    if not task or metric not in task["metrics"]:
        return "n/a"
    err = task["stderr"].get(metric)
    return f"{task['metrics'][metric]:.4f}" + (f" ± {err:.4f}" if err is not None else "")


def serving_notes(info: CheckpointInfo) -> str:
    """Which engines can run this checkpoint, what the verifiers found, and why not."""
    serving = info.summary.get("serving") or {}
    reasons = serving.get("reasons") or []
    if not reasons:
        lines = [
            "Every quantized layer uses a compressed-tensors scheme that transformers and "
            "vLLM know (`group`/`channel` strategies)."
        ]
    else:
        more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
        shown = "; ".join(reasons[:3]) + more
        lines = [
            "**Not servable as a quantized model** (the recipe sets `export.servable: false`): "
            f"{shown}. No serving engine loads a partial last group, so the weights are stored "
            "as floats that lie on the quantization grid: they load anywhere, at full size."
        ]
    for engine, found in sorted(info.serving().items()):
        if found.get("ok"):
            kernels = ", ".join(found.get("kernels") or []) or "its dense kernels"
            lines.append(
                f"Verified in {engine}: it loads the checkpoint ({kernels}) and "
                f"{found.get('agree')}/{len(found.get('ranks') or [])} of its greedy tokens "
                "are the ones transformers chooses on the same prefix."
            )
        else:
            lines.append(f"**{engine} cannot serve this checkpoint**: {found.get('reason')}")
    return "\n\n".join(lines)


def _intro(info: CheckpointInfo, base: BaseModelInfo) -> str:
    methods = " then ".join(m.upper() for m in info.methods())
    bits = "/".join(str(b) for b in info.bits())
    link = f"[{base.repo_id}](https://huggingface.co/{base.repo_id})" if base.repo_id else base.name
    fake = (info.summary.get("serving") or {}).get("format") == "fake"
    stored = (
        "floats on the quantization grid"
        if fake
        else "packed integers in the compressed-tensors format, which transformers and vLLM load"
    )
    return (
        f"{bits}-bit weight quantization of {link} with {methods}, made by "
        f"[quantmill](https://github.com/quantmill/quantmill). The weights are stored as {stored}."
    )


def _how_to_load(load_id: str) -> str:
    return (
        "```python\n"
        "# pip install transformers compressed-tensors\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{load_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")\n'
        'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))\n"
        "```"
    )


def _reproduce(info: CheckpointInfo, base: BaseModelInfo) -> str:
    model = info.summary.get("model") or {}
    source = base.repo_id if model.get("kind") == "hub" else model.get("source")
    revision = f" --revision {base.revision}" if model.get("kind") == "hub" else ""
    return (
        "The recipe above is `quantmill_recipe.yaml` in this repo:\n\n"
        f"```bash\nquantmill run --model {source}{revision} --recipe quantmill_recipe.yaml\n```\n\n"
        f"Source revision: `{base.revision}`; quantmill {info.summary.get('quantmill_version')}."
    )


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _mb(value: Any) -> str:
    return "n/a" if value is None else f"{float(value) / 2**20:.1f}"


def _name(repo_id: str) -> str:
    return repo_id.rstrip("/").split("/")[-1]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
