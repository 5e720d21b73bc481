"""The sequential calibration driver shared by every method.

Capture the inputs of the first decoder block once; then, block by block,
let each method observe the block (hooks, always removed), quantize its
layers, and re-run the block so the next one sees quantized outputs
(the scheme of IST-DASLab's ``opt_sequential``). Only one block's
statistics and one set of hidden states live at a time, beside the model.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn
from tqdm.auto import tqdm

from quantmill import mixed
from quantmill.arch import ArchSpec, arch_for, block_linears, decoder_blocks
from quantmill.blocks import BlockInputs, BlockStore, block_outputs, run_block
from quantmill.config import MethodConfig
from quantmill.errors import CalibrationDataError, ConfigError
from quantmill.layers import LayerQuant, LayerReport
from quantmill.methods import get_method
from quantmill.methods.base import Method
from quantmill.moe import block_experts, calibrating_all_experts, expert_tokens, unfuse_experts
from quantmill.qat.loop import TrainContext, TrainResult
from quantmill.runtime import activation_hooks, runtime_spec
from quantmill.stats import Statistics, StatisticsFile, collect_statistics, save_statistics

log = logging.getLogger(__name__)
# One line per block at INFO: what the pipeline's logs show (the CLI shows bars instead).
progress_log = logging.getLogger("quantmill.progress")


@dataclass
class QuantizeOutcome:
    layers: dict[str, LayerQuant]  # full module name → the grid its weights lie on
    reports: list[LayerReport]
    seconds: float
    training: list[TrainResult] = field(default_factory=list)


def quantize_model(
    model: nn.Module,
    steps: list[MethodConfig],
    calib_ids: Tensor | None,
    batch_size: int = 8,
    progress: bool = True,
    statistics: Statistics | StatisticsFile | None = None,
    training: TrainContext | None = None,
    store: BlockStore | None = None,
    methods: list[Method] | None = None,
    all_experts: bool = True,
) -> QuantizeOutcome:
    """Apply ``steps`` in order to every decoder block of ``model`` in place.

    ``calib_ids`` is ``[num_samples, seq_len]`` token ids; it may be ``None``
    only when no step needs calibration, or when every calibrated step reads
    shared ``statistics`` (``sequential: false``) and those are given.
    ``store`` says where block weights come from and where finished blocks go
    (default: the whole model in memory, written by the caller afterwards).
    ``methods``: the steps' methods, already built and checked (``build_methods``).
    ``all_experts``: in mixture-of-experts blocks every expert is calibrated on every
    token (False: on the tokens its router sends it).
    """
    start = time.perf_counter()
    store = store or BlockStore(model)
    spec = arch_for(model)
    unfuse_experts(model, spec)
    blocks = decoder_blocks(model, spec)
    everything = methods if methods is not None else build_methods(model, steps)
    trainers = [m for m in everything if m.needs.trains]
    methods = [m for m in everything if not m.needs.trains]
    calibrated = [m for m in methods if m.needs.calibration]
    # statistics of the partly quantized model, or of the original model (shareable)
    live = any(not m.needs.shared_statistics for m in calibrated)
    shared = any(m.needs.shared_statistics for m in calibrated)
    if (live or (shared and statistics is None)) and (calib_ids is None or calib_ids.numel() == 0):
        raise CalibrationDataError(
            "the recipe's methods need calibration data but none was given "
            "(calibration.num_samples samples of calibration.seq_len tokens)"
        )
    layers, reports = store.done()
    label = "+".join(step.method for step in steps)
    todo = range(store.start, len(blocks)) if methods else range(0)  # training steps only
    mixing = [m for m in methods if getattr(m.config, "mixed", None) is not None]
    measuring = any(m.config.mixed.chosen is None for m in mixing)
    with ExitStack() as stack:
        if (shared or measuring) and statistics is None and todo:
            statistics = _statistics_file(
                stack, model, calib_ids, batch_size, progress, store, all_experts
            )
        for method in mixing if todo else ():
            method.chosen = _mixed_choice(method, blocks, spec, store, statistics)
        inputs = store.capture(model, blocks[0], calib_ids, batch_size) if live and todo else None
        bar = tqdm(todo, desc=f"{label} blocks", disable=not progress, total=len(blocks))
        bar.update(store.start)
        for index in bar:
            block = blocks[index]
            store.load(index, block)
            if inputs is not None:
                inputs.enter(index)
            prefix = f"{spec.blocks}.{index}."
            targets = None
            if inputs is not None and any(m.needs.targets for m in methods):
                targets = block_outputs(block, inputs)  # the original block's, for distillation
            block_layers: dict[str, LayerQuant] = {}
            block_reports: list[LayerReport] = []
            for method in methods:
                _quantize_block(
                    method, block, spec, prefix, inputs, statistics,
                    {**layers, **block_layers}, block_layers, block_reports, targets,
                    all_experts,
                )  # fmt: skip
            if inputs is not None and index + 1 < len(blocks):
                # the next block sees what this one will produce, quantized activations included
                with activation_hooks(block, runtime_spec(block_layers), prefix):
                    run_block(block, inputs, keep_outputs=True)
            layers.update(store.finish(index, block, block_layers, block_reports, inputs))
            reports += block_reports
            progress_log.info("%s: block %d/%d quantized", label, index + 1, len(blocks))
    trained = []
    for trainer in trainers:
        context = training or TrainContext(calib_ids, progress=progress)
        trained.append(trainer.train(model, layers, context))
    return QuantizeOutcome(layers, reports, time.perf_counter() - start, trained)


def _mixed_choice(method: Method, blocks, spec: ArchSpec, store: BlockStore, statistics):
    """Each layer's scheme index for a step with ``mixed``: the saved map, or chosen from
    each layer's error at every scheme (one pass over the blocks)."""
    step = method.config
    if step.mixed.chosen is not None:
        return mixed.given(step, mixed.selected_names(blocks, spec, step))
    units = mixed.measure(blocks, spec, store, statistics, step, spec.conv1d)
    chosen = mixed.choose(units, step)
    log.info("%s mixed precision: %s", step.method, mixed.summary(units, chosen, step))
    return mixed.expand(units, chosen)


def build_methods(model: nn.Module, steps: list[MethodConfig]) -> list[Method]:
    """Each step's method, checked against ``model`` (mappings, layouts) before any work."""
    spec = arch_for(model)
    methods = [get_method(step.method).impl(step, spec.conv1d) for step in steps]
    for index, method in enumerate(methods):
        try:
            method.check_model(model, spec)
            if getattr(method.config, "mixed", None) is not None:
                mixed.check_budget(model, spec, method.config)
        except ConfigError as exc:  # name the step, as recipe validation does
            raise ConfigError(f"steps.{index}.{exc}") from None
    return methods


def _statistics_file(
    stack: ExitStack,
    model: nn.Module,
    calib_ids: Tensor,
    batch_size: int,
    progress: bool,
    store: BlockStore,
    all_experts: bool,
) -> StatisticsFile:
    """Collect the original model's statistics into a temporary file read layer by layer."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantmill-stats-")))
    stats = collect_statistics(model, calib_ids, batch_size, progress, store, all_experts)
    save_statistics(stats, folder / "s.st")
    return StatisticsFile(folder / "s.st")


def _quantize_block(
    method: Method,
    block: nn.Module,
    spec: ArchSpec,
    prefix: str,
    inputs: BlockInputs | None,
    statistics: Statistics | StatisticsFile | None,
    seen: dict[str, LayerQuant],
    block_layers: dict[str, LayerQuant],
    reports: list[LayerReport],
    targets: list[Tensor] | None = None,
    all_experts: bool = True,
) -> None:
    """One method on one block; ``seen`` holds the grids found so far (for the runtime
    treatment of inputs), ``block_layers`` and ``reports`` receive this step's results."""
    tokens: dict[str, dict[str, float | str]] = {}
    selected = {
        name: module
        for name, module in block_linears(block, spec).items()
        if method.config.selects(prefix + name)
    }
    if not selected:
        return
    if method.needs.calibration and method.needs.shared_statistics:
        assert statistics is not None  # quantize_model collects them when none were given
        method.use_statistics([prefix + name for name in selected], statistics)
    elif method.needs.calibration and inputs is not None and _observes(method):
        groups = [
            [(prefix + n, selected[n]) for n in group if n in selected]
            for group in spec.linear_groups
        ]
        for experts in block_experts(block):
            experts.reset_counts()
        with method.observe([g for g in groups if g], stop_after_last=True):
            with activation_hooks(block, runtime_spec(seen), prefix):
                with calibrating_all_experts(block, all_experts):
                    run_block(block, inputs, keep_outputs=False)
        tokens = expert_tokens(block, spec, prefix, inputs, all_experts)
    reports += method.prepare_block(block, spec, prefix, inputs)
    step_layers: dict[str, LayerQuant] = {}
    for name, module in selected.items():
        quant, report = method.quantize_layer(prefix + name, module)
        if report is not None:
            report.extra.update(tokens.get(prefix + name, {}))
            reports.append(report)
        if quant is not None:  # None: the step only rescaled, a later step quantizes
            step_layers[prefix + name] = quant
    if method.needs.targets and inputs is not None and targets is not None:
        # after every layer of the block is quantized; it may replace their grids
        reports += method.finish_block(block, prefix, inputs, targets, step_layers)
    block_layers.update(step_layers)
    seen.update(step_layers)


def _observes(method: Method) -> bool:
    """False for methods that collect nothing by hooks (a forward pass would be wasted)."""
    return type(method).observe is not Method.observe
