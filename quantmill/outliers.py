"""Outlier report: per-layer activation and weight statistics that show why
outlier-aware methods help.

A few input channels of a transformer's linear layers carry activations tens
to hundreds of times larger than the rest (Dettmers et al. 2022, "LLM.int8()",
arXiv:2208.07339; Xiao et al. 2023, "SmoothQuant", arXiv:2211.10438). A
per-tensor or per-token scale sized for those channels leaves the others a
handful of quantization levels; AWQ (Lin et al. 2024, arXiv:2306.00978) and
SmoothQuant move the scale into the weights, LLM.int8() keeps those channels
in 16 bits. This module measures, for every linear layer of every decoder
block, how pronounced that is:

- from the layer's *input* over all calibration tokens: the per-channel
  ``absmax``, its max / median ratio, the (Pearson, non-excess) kurtosis of
  all values, and the channels whose ``absmax`` exceeds LLM.int8()'s 6.0;
- from its weight: the max / median of ``|w|``, the kurtosis of all values,
  and the input columns whose ``absmax`` exceeds ``WEIGHT_OUTLIER_FACTOR``
  times the median column ``absmax``.

Statistics are streamed (float64 power sums, running maxima): one block's
inputs live at a time, never the activations of the whole model.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantmill.arch import arch_for, block_linears, decoder_blocks
from quantmill.blocks import BlockStore, run_block
from quantmill.config import EngineSpec
from quantmill.devices import resolve_device
from quantmill.engine import LazyStore
from quantmill.hooks import hooks_removed
from quantmill.lazy import open_model
from quantmill.moe import unfuse_experts

# LLM.int8()'s rule: an input channel is an outlier when some |x| in it exceeds 6.0.
ACT_THRESHOLD = 6.0
# Weights have no absolute scale, so their rule is relative: a column is an outlier
# when its absmax is over 5x the median column's (a column of a 4-bit group then
# spends most of its 16 levels on one value).
WEIGHT_OUTLIER_FACTOR = 5.0
# Weight moments are summed over this many rows at a time (bounds the float64 copy).
WEIGHT_CHUNK_ROWS = 1024
WORST_LAYERS = 10
JSON_FILE, CSV_FILE, PLOT_FILE = "outliers.json", "outliers.csv", "outliers.png"
CSV_COLUMNS = (
    "name",
    "block",
    "kind",
    "in_features",
    "act_max",
    "act_median",
    "act_max_median_ratio",
    "act_kurtosis",
    "act_outlier_count",
    "act_outlier_fraction",
    "weight_max_median_ratio",
    "weight_kurtosis",
    "weight_outlier_count",
)


class Moments:
    """Streaming power sums ``Σx, Σx², Σx³, Σx⁴`` (float64) of every value seen."""

    def __init__(self) -> None:
        self.count = 0
        self.sums = torch.zeros(4, dtype=torch.float64)  # host: sums kept in CPU memory

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        x2 = x * x
        self.sums += torch.stack([x.sum(), x2.sum(), (x2 * x).sum(), (x2 * x2).sum()]).cpu()
        self.count += x.numel()

    def kurtosis(self) -> float:
        """Pearson's ``m4 / m2²`` about the mean (3 for a Gaussian); NaN for constant data."""
        if self.count == 0:
            return float("nan")
        s1, s2, s3, s4 = (self.sums / self.count).tolist()
        mean = s1
        m2 = s2 - mean**2
        m4 = s4 - 4 * mean * s3 + 6 * mean**2 * s2 - 3 * mean**4
        return m4 / m2**2 if m2 > 0 else float("nan")


@dataclass
class LayerOutliers:
    """One linear layer's figures; ``*_channels`` / ``*_columns`` are input indices."""

    name: str
    block: int
    kind: str  # the layer's name inside its block, e.g. "self_attn.q_proj"
    in_features: int
    act_max: float
    act_median: float  # median over channels of the per-channel absmax
    act_max_median_ratio: float
    act_kurtosis: float
    act_outlier_channels: list[int]
    act_outlier_fraction: float
    weight_max_median_ratio: float
    weight_kurtosis: float
    weight_outlier_columns: list[int]

    @property
    def act_outlier_count(self) -> int:
        return len(self.act_outlier_channels)

    @property
    def weight_outlier_count(self) -> int:
        return len(self.weight_outlier_columns)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "act_outlier_count": self.act_outlier_count,
            "weight_outlier_count": self.weight_outlier_count,
        }


@dataclass
class OutlierReport:
    layers: list[LayerOutliers] = field(default_factory=list)  # in model order
    threshold: float = ACT_THRESHOLD
    weight_outlier_factor: float = WEIGHT_OUTLIER_FACTOR
    samples: int = 0
    tokens: int = 0

    def worst(self, n: int = WORST_LAYERS) -> list[LayerOutliers]:
        """The ``n`` layers with the largest activation max / median ratio."""
        return sorted(self.layers, key=lambda r: -_finite(r.act_max_median_ratio))[:n]

    def summary(self) -> dict[str, Any]:
        flagged = [r for r in self.layers if r.act_outlier_count]
        return {
            "layers": len(self.layers),
            "samples": self.samples,
            "tokens": self.tokens,
            "threshold": self.threshold,
            "weight_outlier_factor": self.weight_outlier_factor,
            "layers_with_outlier_channels": len(flagged),
            "act_outlier_channels": sum(r.act_outlier_count for r in self.layers),
            "weight_outlier_columns": sum(r.weight_outlier_count for r in self.layers),
            "max_act_max_median_ratio": max(
                (r.act_max_median_ratio for r in self.layers), default=None
            ),
            "max_act_kurtosis": max((r.act_kurtosis for r in self.layers), default=None),
            "worst_layers": [
                {
                    "name": r.name,
                    "act_max_median_ratio": r.act_max_median_ratio,
                    "act_kurtosis": r.act_kurtosis,
                    "act_outlier_count": r.act_outlier_count,
                }
                for r in self.worst()
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "layers": [r.to_dict() for r in self.layers]}


def collect_outliers(
    model: nn.Module,
    calib_ids: Tensor,
    batch_size: int = 8,
    progress: bool = True,
    threshold: float = ACT_THRESHOLD,
    store: BlockStore | None = None,
) -> OutlierReport:
    """Run ``calib_ids`` (``[num_samples, seq_len]`` token ids) through ``model`` block by
    block and measure every linear layer's input activations and weight.

    The model is not changed. Only one block's hidden states
    (``[num_samples, seq_len, hidden]``) and per-layer running sums live at a time.
    """
    store = store or BlockStore(model)
    spec = arch_for(model)
    unfuse_experts(model, spec)
    blocks = decoder_blocks(model, spec)
    inputs = store.capture(model, blocks[0], calib_ids, batch_size)
    report = OutlierReport(
        threshold=threshold, samples=int(calib_ids.shape[0]), tokens=int(calib_ids.numel())
    )
    for index, block in enumerate(tqdm(blocks, desc="outliers", disable=not progress)):
        store.load(index, block)
        inputs.enter(index)
        linears = block_linears(block, spec)
        seen = {name: _Activations() for name in linears}
        handles = [
            layer.register_forward_pre_hook(seen[name].hook) for name, layer in linears.items()
        ]
        with hooks_removed(handles):
            run_block(block, inputs, keep_outputs=index + 1 < len(blocks))
        for name, layer in linears.items():
            full = f"{spec.blocks}.{index}.{name}"
            report.layers.append(
                _layer_figures(full, index, name, seen[name], layer, spec.conv1d, threshold)
            )
        store.release(index, block)
    return report


def outliers_of(
    folder: Path,
    calib_ids: Tensor,
    batch_size: int = 8,
    progress: bool = True,
    engine: EngineSpec | None = None,
) -> OutlierReport:
    """``collect_outliers`` on the model in ``folder``, one block in memory at a time."""
    engine = engine or EngineSpec()
    lazy = open_model(folder, resolve_device(engine.device), engine.dtype)
    store = LazyStore(lazy, engine.offload)
    return collect_outliers(lazy.model, calib_ids, batch_size, progress, store=store)


class _Activations:
    """Running per-channel absmax ``[in_features]`` and moments of one layer's input."""

    def __init__(self) -> None:
        self.absmax: Tensor | None = None
        self.moments = Moments()

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        peak = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
        self.absmax = peak if self.absmax is None else torch.maximum(self.absmax, peak)
        self.moments.add(x)


def _layer_figures(
    name: str,
    block: int,
    kind: str,
    acts: _Activations,
    layer: nn.Module,
    conv1d: bool,
    threshold: float,
) -> LayerOutliers:
    if acts.absmax is None:
        raise RuntimeError(
            f"layer {name} saw no input during the calibration pass; the block's forward "
            "does not call it, so the architecture table in quantmill/arch.py is wrong for it"
        )
    absmax = acts.absmax
    act_max, act_median = absmax.max().item(), absmax.median().item()
    outliers = torch.nonzero(absmax > threshold).flatten().tolist()
    weight = layer.weight.detach()
    weight = weight.t() if conv1d else weight  # [out, in]
    magnitude = weight.abs()
    columns = magnitude.amax(dim=0)
    weight_columns = torch.nonzero(columns > WEIGHT_OUTLIER_FACTOR * columns.median())
    return LayerOutliers(
        name=name,
        block=block,
        kind=kind,
        in_features=int(absmax.numel()),
        act_max=act_max,
        act_median=act_median,
        act_max_median_ratio=_ratio(act_max, act_median),
        act_kurtosis=acts.moments.kurtosis(),
        act_outlier_channels=outliers,
        act_outlier_fraction=len(outliers) / absmax.numel(),
        weight_max_median_ratio=_ratio(magnitude.max().item(), magnitude.median().item()),
        weight_kurtosis=weight_kurtosis(weight),
        weight_outlier_columns=weight_columns.flatten().tolist(),
    )


def weight_kurtosis(weight: Tensor) -> float:
    """Pearson kurtosis of every value of ``weight`` (any shape), summed a chunk at a time."""
    moments = Moments()
    for chunk in weight.reshape(weight.shape[0], -1).split(WEIGHT_CHUNK_ROWS):
        moments.add(chunk)
    return moments.kurtosis()


def _ratio(top: float, median: float) -> float:
    return top / median if median > 0 else float("inf")


def _finite(value: float) -> float:
    return value if value == value else float("-inf")  # NaN sorts last


def save_report(report: OutlierReport, folder: str | Path) -> dict[str, Path]:
    """Write ``outliers.json`` (summary + every layer), ``outliers.csv`` and ``outliers.png``."""
    from quantmill import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    paths = {"json": folder / JSON_FILE, "csv": folder / CSV_FILE, "png": folder / PLOT_FILE}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data["layers"])
    title = (
        f"Outliers per layer ({report.tokens} calibration tokens; "
        f"outlier channel: |x| > {report.threshold:g})"
    )
    plots.outlier_stats(data["layers"], paths["png"], title=title)
    return paths


def worst_layers_table(report: OutlierReport, n: int = WORST_LAYERS) -> str:
    """A markdown table of the ``n`` layers with the largest activation max / median ratio."""
    lines = [
        "| layer | act max/median | act max | act kurtosis | outlier channels "
        "| weight max/median | weight kurtosis |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.worst(n):
        lines.append(
            f"| {r.name} | {r.act_max_median_ratio:.1f} | {r.act_max:.1f} "
            f"| {r.act_kurtosis:.1f} | {r.act_outlier_count} "
            f"| {r.weight_max_median_ratio:.1f} | {r.weight_kurtosis:.1f} |"
        )
    return "\n".join(lines)
