"""One call from a model source and a recipe to an evaluated, packed checkpoint.

Order matters for users: everything that can be checked cheaply (device,
output folder, model source and its weight files, architecture, recipe, free
disk space) is checked before the expensive work starts, and the checkpoint
appears only once complete. Post-training recipes run on the streaming engine
(``quantmill.engine``): one block's weights in memory, shards written as
blocks finish, resumable after a crash. Recipes with a training step hold the
whole model (on the chosen device and dtype) and resume from their own
training checkpoints.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from quantmill import __version__
from quantmill.accuracy.models import (
    add_tasks,
    loaded_accuracy,
    original_accuracy,
    spec_tasks,
    without_harness,
    write_harness_file,
)
from quantmill.accuracy.recovery import accuracy_recovery
from quantmill.arch import ArchSpec, arch_for
from quantmill.cache import cache_key, cached_json
from quantmill.config import EngineSpec, EvalSpec
from quantmill.data import calibration_ids, eval_ids, ids_digest
from quantmill.devices import dtype_name, resolve_device, resolve_dtype, uses_engine_threads
from quantmill.driver import QuantizeOutcome, build_methods, quantize_model
from quantmill.engine import StreamingStore
from quantmill.errors import ConfigError, OutOfSpaceError
from quantmill.evaluate import bits_per_weight, perplexity, size_on_disk, streamed_perplexity
from quantmill.export.checkpoint import ExportFormat, save_quantized, write_config, write_json
from quantmill.folder import LAYERS_FILE, RECIPE_FILE, SOURCE_FILE, SUMMARY_FILE, TRAINING_FILE
from quantmill.journal import Stage, check_output, code_version, staged_run
from quantmill.kv_cache import check_kv_supported, kv_cache_quantized
from quantmill.lazy import LazyModel, empty_model, open_model, read_config
from quantmill.methods.base import Method
from quantmill.models import load_model, load_tokenizer
from quantmill.qat.loop import TrainContext
from quantmill.recipe import Recipe, save_recipe
from quantmill.rotation import write_rotated
from quantmill.runtime import apply_runtime, runtime_summary
from quantmill.servable import check_servable, partial_groups
from quantmill.sources import ResolvedModel, resolve_model
from quantmill.stages import data_fingerprint, load_calibration
from quantmill.stats import StatisticsFile

log = logging.getLogger(__name__)

__all__ = [
    "LAYERS_FILE", "RECIPE_FILE", "SUMMARY_FILE", "TRAINING_FILE", "QuantizeSummary",
    "check_recipe", "check_recipe_source", "evaluate_checkpoint", "quantize",
]  # fmt: skip
# Training settings a resumed run may change (a lower lr after divergence, more steps).
RESUMABLE_FIELDS = ("lr", "steps", "schedule", "warmup_steps", "checkpoint_every", "max_grad_norm")
# Free space asked beyond the estimated checkpoint size (a shard is copied once at close).
SPACE_MARGIN = 1.1


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
    original: dict[str, Any] | None = None  # perplexity (and tasks) of the unquantized model
    quantized: dict[str, Any] | None = None
    # zero-shot accuracy recovery per task and mean (evaluation.tasks); empty without tasks
    accuracy: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)  # one per training step
    engine: dict[str, Any] = field(default_factory=dict)  # device, dtype, resumed_at
    # format written, and why the serving engines cannot load it (empty: they can)
    serving: dict[str, Any] = field(default_factory=dict)
    quantmill_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@uses_engine_threads
def quantize(
    model: str | ResolvedModel,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    revision: str | None = None,
    evaluate: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    export_format: ExportFormat | Literal["gguf"] = "packed",
    progress: bool = True,
    calibration: str | Path | None = None,
    statistics: str | Path | None = None,
    engine: EngineSpec | None = None,
) -> QuantizeSummary:
    """Quantize ``model`` (preset, path, Hub id or resolved source) with ``recipe``.

    ``calibration`` (prepared token ids) and ``statistics`` (the original
    model's, for ``sequential: false`` steps) are files from ``quantmill.stages``;
    without them the data is prepared and the statistics collected here.
    ``engine`` chooses the device, dtype, offloading, shard size and resuming.
    """
    engine = engine or EngineSpec()
    out_dir = Path(out_dir)
    device = resolve_device(engine.device)  # a missing GPU is an error before any work
    check_output(out_dir, overwrite)
    refs = spec_tasks(recipe.evaluation) if evaluate else []  # task files and data checked
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, revision)
    lazy = open_model(resolved.path, device, engine.dtype, trust_remote_code)
    methods = check_recipe(lazy.model, recipe, export_format)  # built once, used by the run
    if evaluate and export_format != "fake":
        check_loadable_packed(lazy.spec, lazy.model.config.model_type)
    gguf = export_format == "gguf"  # a packed checkpoint, then its GGUF file beside it
    if gguf:
        export_format = "packed"
    unservable = []
    if export_format == "packed":  # partial groups here were let through by servable: false
        unservable = [p.describe() for p in partial_groups(lazy.model, recipe.steps)]
    if unservable:
        log.warning(
            "export.servable is false and %s (and %d more layers): the packed format cannot "
            "hold a partial last group, so the checkpoint is written as float weights on the "
            "grid", unservable[0], len(unservable) - 1,
        )  # fmt: skip
        export_format = "fake"
    check_space(out_dir, estimate_output_bytes(lazy, recipe, export_format))
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    fingerprint = run_fingerprint(resolved, recipe, lazy, export_format, engine)
    trains = recipe.trains()
    workdir = training_dir(out_dir, resolved, recipe) if trains else None
    with staged_run(out_dir, fingerprint, resume=engine.resume, overwrite=overwrite) as stage:
        run = _Run(
            resolved, lazy, recipe, methods, stage, export_format, engine, progress, workdir,
            unservable,
        )  # fmt: skip
        windows = eval_ids(tokenizer, recipe.evaluation) if evaluate else None
        original = _original_perplexity(lazy, resolved, recipe.evaluation, windows, progress)
        if original is not None:
            tasks = original_accuracy(
                resolved, refs, recipe.evaluation, lazy.device, lazy.dtype, progress
            )
            original = add_tasks(dict(original), tasks)
        written = (stage.state or {}).get("written")
        if written is None:
            calib = _calibration(tokenizer, recipe, calibration)
            stats = StatisticsFile(statistics) if statistics is not None else None
            began = time.perf_counter()
            if recipe.rotation() is not None:
                run = _rotated(run)
            rotating = time.perf_counter() - began
            outcome, resumed_at = (_train_in_memory if trains else _stream)(run, calib, stats)
            outcome.seconds += rotating  # the rotated copy is part of the quantization
            calib_digest = None if calib is None else ids_digest(calib)
            del calib
            tokenizer.save_pretrained(stage.folder)
            _copy_lineage(resolved, stage.folder)
            written = _journal_written(stage, outcome, resumed_at, calib_digest)
        gc.collect()
        quantized = None
        if windows is not None:
            # Evaluate what was written, loaded the way users load it.
            staged = ResolvedModel(str(out_dir), "local", stage.folder, "staged")
            quantized = _quantized_perplexity(
                staged, recipe.evaluation, windows, progress, device, lazy.dtype, refs
            )
        write_harness_file(stage.folder, original, quantized)
        summary = _summary(run, written, without_harness(original), without_harness(quantized))
        _write_run_files(stage.folder, recipe, summary)
    if workdir is not None:  # the checkpoint is complete: nothing left to resume
        shutil.rmtree(workdir.parent, ignore_errors=True)
    if gguf:
        from quantmill.serving.gguf_export import export_gguf, gguf_path

        summary.serving["gguf"] = export_gguf(out_dir, gguf_path(out_dir), overwrite=True).to_dict()
    return summary


@dataclass
class _Run:
    """One quantization's inputs, as the engine's two paths take them."""

    resolved: ResolvedModel
    lazy: LazyModel
    recipe: Recipe
    methods: list[Method]  # the recipe's steps, built and checked against the model
    stage: Stage
    fmt: ExportFormat
    engine: EngineSpec
    progress: bool
    workdir: Path | None  # training checkpoints, for recipes that train
    unservable: list[str]  # partial groups let through by export.servable: false


def _stream(run: _Run, calib: torch.Tensor | None, stats: StatisticsFile | None):
    """Post-training steps on the streaming engine; the checkpoint's weights end written."""
    lazy, stage = run.lazy, run.stage
    store = StreamingStore(lazy, stage, run.fmt, run.engine.shard_bytes(), run.engine.offload)
    if store.resumed:
        log.info("resuming at block %d/%d (from %s)", store.start + 1, len(lazy.blocks), stage.work)
    outcome = quantize_model(
        lazy.model, run.recipe.quantizing_steps(), calib, run.recipe.calibration.batch_size,
        run.progress,
        statistics=stats, store=store, methods=run.methods,
        all_experts=run.recipe.calibration.all_experts,
    )  # fmt: skip
    store.finish_weights()
    dtype = lazy.files.main_dtype()
    write_config(stage.folder, lazy.model, outcome.layers, run.fmt, dtype, store.in_features())
    outcome.seconds += store.seconds_before
    return outcome, (store.start + 1 if store.resumed else None)  # 1-based, as printed


def _rotated(run: _Run) -> _Run:
    """The run reading a rotated copy of its model, written into the journal folder (a
    resumed run finds it there; it goes when the checkpoint is complete)."""
    step = run.recipe.rotation()
    folder = write_rotated(
        run.lazy, run.stage.work / "rotated", step.kind, step.seed, step.heads, run.progress
    )
    lazy = LazyModel.open(folder, run.lazy.device, run.lazy.dtype)
    return replace(run, lazy=lazy, methods=build_methods(lazy.model, run.recipe.quantizing_steps()))


def _train_in_memory(run: _Run, calib: torch.Tensor | None, stats: StatisticsFile | None):
    """Recipes that train hold the whole model on the device; training resumes by itself."""
    model = run.lazy.load_all()
    context = TrainContext(
        calib, workdir=run.workdir, cache=True,
        model_key=run.resolved.revision, progress=run.progress,
    )  # fmt: skip
    outcome = quantize_model(
        model, run.recipe.quantizing_steps(), calib, run.recipe.calibration.batch_size,
        run.progress,
        statistics=stats, training=context, methods=run.methods,
        all_experts=run.recipe.calibration.all_experts,
    )  # fmt: skip
    save_quantized(
        model, None, outcome.layers, run.stage.folder, run.fmt, run.lazy.stored_dtype,
        run.engine.shard_bytes(),
    )  # fmt: skip
    return outcome, None


def _summary(run: _Run, written: dict, original: dict | None, quantized: dict | None):
    folder = run.stage.folder
    return QuantizeSummary(
        out_dir=str(run.stage.folders.out),
        model=run.resolved.to_dict(),
        recipe=run.recipe.to_dict(),
        quant_seconds=written["quant_seconds"],
        size_bytes=size_on_disk(folder),
        original_size_bytes=size_on_disk(run.resolved.path),
        bits_per_weight=bits_per_weight(folder),
        original=original,
        quantized=quantized,
        accuracy=accuracy_recovery(
            (original or {}).get("tasks", {}), (quantized or {}).get("tasks", {})
        ),
        layers=written["reports"],
        training=written["training"],
        engine={
            "device": str(run.lazy.device),
            "dtype": dtype_name(run.lazy.dtype),
            "resumed_at_block": written["resumed_at"],
            # the token ids the statistics came from (benchmarks compare it across tools)
            "calibration_sha256": written.get("calibration_sha256"),
        },
        serving={"format": run.fmt, "servable": not run.unservable, "reasons": run.unservable},
    )


def _journal_written(
    stage: Stage, outcome: QuantizeOutcome, resumed_at: int | None, calibration: str | None
) -> dict:
    """Record that the checkpoint's weights are complete (a crash now resumes at evaluation)."""
    written = {
        "calibration_sha256": calibration,
        "quant_seconds": outcome.seconds,
        "reports": [asdict(r) for r in outcome.reports],
        "training": [t.to_dict() for t in outcome.training],
        "resumed_at": resumed_at,
    }
    stage.save({"written": written})
    return written


def _write_run_files(folder: Path, recipe: Recipe, summary: QuantizeSummary) -> None:
    save_recipe(with_chosen_schemes(recipe, summary.layers), folder / RECIPE_FILE)
    write_json(folder, LAYERS_FILE, summary.layers)
    if summary.training:
        write_json(folder, TRAINING_FILE, summary.training)
    brief = {k: v for k, v in summary.to_dict().items() if k not in ("layers", "training")}
    write_json(folder, SUMMARY_FILE, brief)


def with_chosen_schemes(recipe: Recipe, layers: list[dict[str, Any]]) -> Recipe:
    """``recipe`` with each mixed-precision step's map filled in (``mixed.chosen``) from
    the layer reports, so that the recipe saved beside a checkpoint reproduces it."""
    steps = []
    for step in recipe.steps:
        mixed = getattr(step, "mixed", None)
        if mixed is not None and mixed.chosen is None:
            chosen = {
                r["name"]: r["extra"]["scheme_index"]
                for r in layers
                if r["method"] == step.method and "scheme_index" in r.get("extra", {})
            }
            step = step.model_copy(update={"mixed": mixed.model_copy(update={"chosen": chosen})})
        steps.append(step)
    return recipe.model_copy(update={"steps": steps})


def _calibration(tokenizer, recipe: Recipe, prepared: str | Path | None) -> torch.Tensor | None:
    if prepared is not None:
        return load_calibration(prepared)
    if recipe.needs_calibration():
        return calibration_ids(tokenizer, recipe.calibration)
    return None


def _copy_lineage(resolved: ResolvedModel, folder: Path) -> None:
    """Keep where a converted source came from (base model, license) beside the checkpoint."""
    lineage = resolved.path / SOURCE_FILE
    if lineage.is_file():
        shutil.copyfile(lineage, folder / SOURCE_FILE)


def run_fingerprint(
    resolved: ResolvedModel, recipe: Recipe, lazy: LazyModel, fmt: str, engine: EngineSpec
) -> dict[str, Any]:
    """Everything that decides a checkpoint's bytes: a journal with another is not resumed."""
    return {
        "model": resolved.revision,
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in ("evaluation", "gate")},
        "calibration_data": data_fingerprint(recipe.calibration.dataset),
        "device": str(lazy.device),
        "dtype": dtype_name(lazy.dtype),
        "format": fmt,
        "max_shard_size": engine.shard_bytes(),
        "code": code_version(),
    }


def estimate_output_bytes(lazy: LazyModel, recipe: Recipe, fmt: str) -> int:
    """The checkpoint's size, from the weight files and the recipe's last quantizing step
    for each layer (packed: its bits plus at most one bit per weight of scales and zeros)."""
    quantizing = [s for s in recipe.steps if s.quantizes and not getattr(s, "smooth_only", False)]
    candidates = {
        f"{lazy.block_prefix(i)}{name}.weight"
        for i in range(len(lazy.blocks))
        for name in lazy.spec.linears
    }
    total = 0
    for name, stored in lazy.names.items():
        nbytes = lazy.files.tensors[stored].entry.nbytes
        layer = name.removesuffix(".weight")
        step = None
        if name in candidates:
            step = next((s for s in reversed(quantizing) if s.selects(layer)), None)
        if step is None:
            total += nbytes
            continue
        count = nbytes // lazy.source_dtype(name).itemsize
        bits = max(s.bits for s in step.weight_schemes())
        total += 4 * count if fmt == "fake" else count * (bits + 1) // 8
    if recipe.rotation() is not None:  # the rotated copy (journal folder), an untied head
        embedding = lazy.model.get_input_embeddings().weight
        total += lazy.files.nbytes() + embedding.numel() * embedding.dtype.itemsize
    return total


def check_space(out_dir: Path, needed: int) -> None:
    """Refuse to start when the output's disk cannot hold the checkpoint (before any work)."""
    where = next((p for p in [out_dir, *out_dir.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    if free < needed * SPACE_MARGIN:
        raise OutOfSpaceError(
            f"the checkpoint needs about {needed / 1e9:.2f} GB (and {SPACE_MARGIN - 1:.0%} "
            f"more while shards close) but {where} has {free / 1e9:.2f} GB free; free space "
            "or choose an --out on another disk",
            folder=where,
            needed=int(needed * SPACE_MARGIN) - free,
        )


def training_dir(out_dir: Path, resolved: ResolvedModel, recipe: Recipe) -> Path | None:
    """Where a recipe's training steps keep checkpoints: beside ``out_dir``, keyed by
    the model and everything in the recipe that shapes training, except the settings a
    resumed run may change (``RESUMABLE_FIELDS``). ``None`` when nothing trains."""
    if not recipe.trains():
        return None
    data = recipe.to_dict()
    for step in data["steps"]:
        for name in RESUMABLE_FIELDS:
            step.get("training", {}).pop(name, None)
    key = cache_key(model=resolved.revision, steps=data["steps"], calibration=data["calibration"])
    return out_dir.with_name(out_dir.name + ".training") / key


@uses_engine_threads
def evaluate_checkpoint(
    model: str | ResolvedModel,
    evaluation: EvalSpec | None = None,
    *,
    revision: str | None = None,
    progress: bool = True,
    cache: bool = False,
    engine: EngineSpec | None = None,
) -> dict[str, Any]:
    """Perplexity, size, bits per weight and the evaluation's zero-shot tasks of any
    model source (quantized or not).

    ``cache`` marks an original (unquantized) model: it is evaluated block by block
    from its files, and a perplexity measured before for the same revision,
    evaluation spec, device and dtype is reused (its task results likewise, per task).
    The result's ``harness`` holds lm-evaluation-harness's own output when tasks ran.
    """
    engine = engine or EngineSpec()
    evaluation = evaluation or EvalSpec()
    device = resolve_device(engine.device)
    refs = spec_tasks(evaluation)  # task files and data checked before any work
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model, revision)
    if (resolved.path / "config.json").is_file():
        check_positions(read_config(resolved.path), evaluation=evaluation)
    tokenizer = load_tokenizer(resolved)
    windows = eval_ids(tokenizer, evaluation)
    has_config = (resolved.path / "config.json").is_file()
    if cache:
        lazy = open_model(resolved.path, device, engine.dtype)
        if evaluation.kv_cache is not None:
            check_kv_supported(lazy.model)
        result = dict(_original_perplexity(lazy, resolved, evaluation, windows, progress) or {})
        tasks = original_accuracy(resolved, refs, evaluation, lazy.device, lazy.dtype, progress)
        result = add_tasks(result, tasks)
    else:
        dtype = resolve_dtype(engine.dtype, device, _config_dtype(resolved))
        result = _quantized_perplexity(resolved, evaluation, windows, progress, device, dtype, refs)
    return {
        "model": resolved.to_dict(),
        "evaluation": evaluation.model_dump(),
        **result,
        "size_bytes": size_on_disk(resolved.path),
        "bits_per_weight": bits_per_weight(resolved.path) if has_config else None,
    }


def check_recipe(
    net: torch.nn.Module, recipe: Recipe, export_format: str = "packed"
) -> list[Method]:
    """Everything about ``recipe`` that depends on the model, checked before any work:
    the architecture, each step's mappings and layers, the KV-cache layout, the export
    (packed grids that no serving engine loads, unless ``export.servable`` is false).
    Returns the steps' methods, built and checked (a run uses these)."""
    arch_for(net)  # an unsupported architecture fails first
    calibration = recipe.calibration if recipe.needs_calibration() else None
    check_positions(net.config, calibration=calibration, evaluation=recipe.evaluation)
    methods = build_methods(net, recipe.steps)
    if recipe.evaluation.kv_cache is not None:
        check_kv_supported(net)
    if export_format == "gguf":  # a packed checkpoint, then its GGUF file
        from quantmill.serving.gguf_export import check_exact

        check_exact(recipe.steps)
        export_format = "packed"
    if export_format == "packed":
        check_servable(net, recipe)
    return methods


def check_loadable_packed(spec: ArchSpec, model_type: str) -> None:
    """A ``ConfigError`` for architectures whose packed checkpoints transformers cannot
    load, so that quantize-then-evaluate fails before work, not after it."""
    why = None
    if spec.experts is not None:
        why = ("its experts are fused parameters in transformers 5; compressed-tensors "
               "quantizes nn.Linear experts")  # fmt: skip
    elif spec.conv1d:
        why = "compressed-tensors refuses its Conv1D modules (vLLM loads the checkpoint)"
    if why:
        raise ConfigError(
            f"{model_type}: transformers cannot load the packed checkpoint ({why}), so it "
            "cannot be evaluated after quantizing; pass --no-eval (evaluation: none) or "
            "--format fake"
        )


def check_positions(config: Any, **specs: Any) -> None:
    """Each spec's ``seq_len`` within the model's positions (``max_position_embeddings``,
    GPT-2's ``n_positions``): beyond them learned positions index out of range and RoPE
    models compute on positions they were never trained on. A ``ConfigError`` naming
    the field and the limit, before any work."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit:
        return
    for section, spec in specs.items():
        if spec is not None and spec.seq_len > limit:
            raise ConfigError(
                f"{section}.seq_len = {spec.seq_len}: {config.model_type} has "
                f"{limit} positions (max_position_embeddings); give at most {limit}"
            )


def check_recipe_source(
    model: str | ResolvedModel,
    recipe: Recipe,
    trust_remote_code: bool = False,
    export_format: str = "packed",
) -> None:
    """``check_recipe`` on an empty model built from the source's config (no weights
    read): what a pipeline runs right after download, before any expensive step. The
    pipeline evaluates what it writes: a packed checkpoint transformers cannot load
    is refused here."""
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    spec_tasks(recipe.evaluation)  # task names, files and data
    net = empty_model(resolved.path, torch.float32, trust_remote_code)
    check_recipe(net, recipe, export_format)
    if export_format != "fake":
        check_loadable_packed(arch_for(net), net.config.model_type)


def _config_dtype(resolved: ResolvedModel) -> torch.dtype:
    config = json.loads((resolved.path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def _quantized_perplexity(
    resolved: ResolvedModel,
    evaluation: EvalSpec,
    windows: torch.Tensor,
    progress: bool,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    refs: list | None = None,
) -> dict[str, Any]:
    """Perplexity (and the zero-shot tasks ``refs``, through lm-evaluation-harness on the
    same loaded model) of a checkpoint loaded the way users load it and run as transformers
    runs it (activation quantization as compressed-tensors computes it, from the config;
    LLM.int8()'s layers, which no config describes, from the runtime file), with the
    evaluation's KV-cache quantization. The original model is never evaluated this way.
    (Our integer kernels give the same per-layer numbers up to float rounding, but
    per-token rounding turns those last-bit differences into a different model: 0.2%
    in perplexity over 8 windows of SmolLM2 W8A8.)"""
    net, tokenizer = load_model(resolved, dtype=dtype, device=device)
    apply_runtime(net, resolved.path, described=False)
    with kv_cache_quantized(net, evaluation.kv_cache):
        result = perplexity(net, windows, progress).to_dict()
        add_tasks(result, loaded_accuracy(net, tokenizer, refs or [], evaluation, progress))
    result.update(runtime_summary(net))
    if evaluation.kv_cache is not None:
        result["kv_cache"] = evaluation.kv_cache.label()
    del net
    gc.collect()
    return result


def _original_perplexity(
    lazy: LazyModel,
    resolved: ResolvedModel,
    evaluation: EvalSpec,
    windows: torch.Tensor | None,
    progress: bool,
) -> dict[str, Any] | None:
    """The unquantized model's perplexity, block by block; cached per model revision,
    eval spec, device type and dtype."""
    if windows is None:
        return None
    key = cache_key(
        model=resolved.revision,
        evaluation=evaluation.model_dump(),
        windows=[list(windows.shape), int(windows.sum())],
        compute=[lazy.device.type, dtype_name(lazy.dtype)],
    )
    result, _ = cached_json(
        "eval", key, lambda: streamed_perplexity(lazy, windows, progress).to_dict()
    )
    return result
