"""One call from a model source and a recipe to an evaluated, packed checkpoint.

Order matters for users: everything that can be checked cheaply (recipe,
output folder, model source, architecture, data) is checked before the
expensive work starts, and the checkpoint appears only once complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantmill import __version__
from quantmill.arch import arch_for
from quantmill.data import calibration_ids, eval_ids
from quantmill.driver import build_methods, quantize_model
from quantmill.evaluate import bits_per_weight, perplexity, size_on_disk
from quantmill.export.checkpoint import ExportFormat, save_quantized, staged_output, write_json
from quantmill.kv_cache import check_kv_supported, kv_cache_quantized
from quantmill.methods import get_method
from quantmill.models import load_model
from quantmill.qat.loop import TrainContext
from quantmill.recipe import Recipe, save_recipe
from quantmill.runtime import apply_runtime, runtime_summary
from quantmill.sources import ResolvedModel, cache_root, resolve_model
from quantmill.stages import load_calibration
from quantmill.stats import StatisticsFile

log = logging.getLogger(__name__)

RECIPE_FILE = "quantmill_recipe.yaml"
SUMMARY_FILE = "quantmill_eval.json"
LAYERS_FILE = "quantmill_layers.json"
TRAINING_FILE = "quantmill_training.json"
# Training settings a resumed run may change (a lower lr after divergence, more steps).
RESUMABLE_FIELDS = ("lr", "steps", "schedule", "warmup_steps", "checkpoint_every", "max_grad_norm")


@dataclass
class QuantizeSummary:
    """What a run produced; saved as ``quantmill_eval.json`` beside the checkpoint."""

    out_dir: str
    model: dict[str, Any]
    recipe: dict[str, Any]
    quant_seconds: float
    size_bytes: int
    original_size_bytes: int
    bits_per_weight: float | None
    original: dict[str, Any] | None = None  # perplexity of the unquantized model
    quantized: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)  # one per training step
    quantmill_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize(
    model: str | ResolvedModel,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    revision: str | None = None,
    evaluate: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    export_format: ExportFormat = "packed",
    progress: bool = True,
    calibration: str | Path | None = None,
    statistics: str | Path | None = None,
) -> QuantizeSummary:
    """Quantize ``model`` (preset, path, Hub id or resolved source) with ``recipe``.

    ``calibration`` (prepared token ids) and ``statistics`` (the original
    model's, for ``sequential: false`` steps) are files from ``quantmill.stages``;
    without them the data is prepared and the statistics collected here.
    """
    out_dir = Path(out_dir)
    with staged_output(out_dir, overwrite=overwrite) as tmp:
        resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, revision)
        net, tokenizer = load_model(resolved, trust_remote_code)
        check_recipe(net, recipe)  # before any data is read
        if calibration is not None:
            calib = load_calibration(calibration)
        elif recipe.needs_calibration():
            calib = calibration_ids(tokenizer, recipe.calibration)
        else:
            calib = None
        stats = StatisticsFile(statistics) if statistics is not None else None
        windows = eval_ids(tokenizer, recipe.evaluation) if evaluate else None
        original = _original_perplexity(net, resolved, recipe, windows, progress)
        net.config.use_cache = False
        training = TrainContext(
            calib,
            workdir=training_dir(out_dir, resolved, recipe),
            cache_dir=cache_root() / "generated",
            model_key=resolved.revision,
            progress=progress,
        )
        outcome = quantize_model(
            net, recipe.steps, calib, recipe.calibration.batch_size, progress,
            statistics=stats, training=training,
        )  # fmt: skip
        del calib
        save_quantized(net, tokenizer, outcome.layers, tmp, export_format)
        del net
        gc.collect()
        quantized = None
        if windows is not None:
            # Evaluate what was written, loaded the way users load it.
            staged = ResolvedModel(str(out_dir), "local", tmp, "staged")
            quantized = _quantized_perplexity(staged, recipe, windows, progress)
        summary = QuantizeSummary(
            out_dir=str(out_dir),
            model=resolved.to_dict(),
            recipe=recipe.to_dict(),
            quant_seconds=outcome.seconds,
            size_bytes=size_on_disk(tmp),
            original_size_bytes=_source_size(resolved),
            bits_per_weight=bits_per_weight(tmp),
            original=original,
            quantized=quantized,
            layers=[asdict(report) for report in outcome.reports],
            training=[result.to_dict() for result in outcome.training],
        )
        save_recipe(recipe, tmp / RECIPE_FILE)
        write_json(tmp, LAYERS_FILE, summary.layers)
        if summary.training:
            write_json(tmp, TRAINING_FILE, summary.training)
        detail = ("layers", "training")
        write_json(
            tmp, SUMMARY_FILE, {k: v for k, v in summary.to_dict().items() if k not in detail}
        )
    if training.workdir is not None:  # the checkpoint is complete: nothing left to resume
        shutil.rmtree(training.workdir.parent, ignore_errors=True)
    return summary


def training_dir(out_dir: Path, resolved: ResolvedModel, recipe: Recipe) -> Path | None:
    """Where a recipe's training steps keep checkpoints: beside ``out_dir``, keyed by
    the model and everything in the recipe that shapes training, except the settings a
    resumed run may change (``RESUMABLE_FIELDS``). ``None`` when nothing trains."""
    if not any(get_method(step.method).impl.trains for step in recipe.steps):
        return None
    data = recipe.to_dict()
    for step in data["steps"]:
        for name in RESUMABLE_FIELDS:
            step.get("training", {}).pop(name, None)
    key = json.dumps([resolved.revision, data["steps"], data["calibration"]], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return out_dir.with_name(out_dir.name + ".training") / digest


def evaluate_checkpoint(
    model: str | ResolvedModel,
    recipe: Recipe,
    *,
    revision: str | None = None,
    progress: bool = True,
    cache: bool = False,
) -> dict[str, Any]:
    """Perplexity, size and bits per weight of any model source (quantized or not).

    ``cache`` reuses a perplexity measured before for the same model revision and
    evaluation spec (meant for original models, whose revision pins their content).
    """
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, revision)
    net, tokenizer = load_model(resolved)
    if recipe.evaluation.kv_cache is not None:
        check_kv_supported(net)
    windows = eval_ids(tokenizer, recipe.evaluation)
    if cache:
        result = _original_perplexity(net, resolved, recipe, windows, progress) or {}
    else:
        del net
        result = _quantized_perplexity(resolved, recipe, windows, progress)
    has_config = (resolved.path / "config.json").is_file()
    return {
        "model": resolved.to_dict(),
        "evaluation": recipe.evaluation.model_dump(),
        **result,
        "size_bytes": _source_size(resolved),
        "bits_per_weight": bits_per_weight(resolved.path) if has_config else None,
    }


def check_recipe(net: torch.nn.Module, recipe: Recipe) -> None:
    """Everything about ``recipe`` that depends on the model, checked before any work:
    the architecture, each step's mappings and layers, the KV-cache layout."""
    arch_for(net)
    build_methods(net, recipe.steps)
    if recipe.evaluation.kv_cache is not None:
        check_kv_supported(net)


def check_recipe_source(
    model: str | ResolvedModel, recipe: Recipe, trust_remote_code: bool = False
) -> None:
    """``check_recipe`` on an empty model built from the source's config (no weights
    read): what a pipeline runs right after download, before any expensive step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    config = AutoConfig.from_pretrained(resolved.path, **kwargs)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_recipe(net, recipe)


def _quantized_perplexity(
    resolved: ResolvedModel, recipe: Recipe, windows: torch.Tensor, progress: bool
) -> dict[str, Any]:
    """Perplexity of a checkpoint loaded the way users load it, then run the way it is
    meant to run: integer or quantized-input layers from its runtime file, and the
    recipe's KV-cache quantization. The original model is never evaluated this way."""
    net, _ = load_model(resolved)
    apply_runtime(net, resolved.path)
    with kv_cache_quantized(net, recipe.evaluation.kv_cache):
        result = perplexity(net, windows, progress).to_dict()
    result.update(runtime_summary(net))
    if recipe.evaluation.kv_cache is not None:
        result["kv_cache"] = recipe.evaluation.kv_cache.label()
    del net
    gc.collect()
    return result


def _original_perplexity(
    net: torch.nn.Module,
    resolved: ResolvedModel,
    recipe: Recipe,
    windows: torch.Tensor | None,
    progress: bool,
) -> dict[str, Any] | None:
    """The unquantized model's perplexity, cached per model revision and eval spec."""
    if windows is None:
        return None
    key_src = json.dumps(
        [resolved.revision, recipe.evaluation.model_dump(), windows.shape, int(windows.sum())]
    )
    cache = cache_root() / "eval" / (hashlib.sha256(key_src.encode()).hexdigest()[:24] + ".json")
    if cache.is_file():
        return json.loads(cache.read_text())
    result = perplexity(net, windows, progress).to_dict()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def _source_size(resolved: ResolvedModel) -> int:
    if resolved.gguf_file:
        return (resolved.path / resolved.gguf_file).stat().st_size
    return size_on_disk(resolved.path)
