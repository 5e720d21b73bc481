"""Quantize a resolved model with a recipe into a packed checkpoint folder."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import task

from quantmill import api
from quantmill.config import EngineSpec
from quantmill.folder import Checkpoint
from quantmill.recipe import Recipe
from quantmill.sources import ResolvedModel


@task(name="check-recipe")
def check_recipe(
    model: dict[str, Any], recipes: list[Recipe], export_format: str = "packed"
) -> None:
    """Fail before any expensive step when a recipe does not fit the model
    (mappings, layers, KV-cache layout, the export); reads the model's config only."""
    source = ResolvedModel.from_dict(model)
    for recipe in recipes:
        api.check_recipe_source(source, recipe, export_format=export_format)


@task(name="check-outputs")
def check_outputs(folders: list[str], overwrite: bool) -> None:
    """Fail before the download when an output folder cannot be written (a file, not
    empty without ``overwrite``, a read-only disk)."""
    from quantmill.journal import check_outputs as check

    check(folders, overwrite)


@task(name="quantize")
def quantize_model(
    model: dict[str, Any],
    recipe: Recipe,
    out_dir: str,
    calibration: dict[str, Any] | None = None,
    statistics: dict[str, Any] | None = None,
    overwrite: bool = False,
    export_format: str = "packed",
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Figures of the written checkpoint (no evaluation: that is its own task); with
    ``gguf``, the packed checkpoint and its GGUF file beside it."""
    start = time.perf_counter()
    summary = api.quantize(
        ResolvedModel.from_dict(model),
        recipe,
        out_dir,
        evaluate=False,
        overwrite=overwrite,
        export_format=export_format,  # type: ignore[arg-type]
        calibration=calibration["path"] if calibration else None,
        statistics=statistics["path"] if statistics else None,
        engine=EngineSpec.model_validate(engine or {}),
    )
    extra = {"gguf": summary.serving["gguf"]} if "gguf" in summary.serving else {}
    return {
        **extra,
        "out_dir": str(Path(out_dir).resolve()),
        "quant_seconds": summary.quant_seconds,
        "size_bytes": summary.size_bytes,
        "original_size_bytes": summary.original_size_bytes,
        "bits_per_weight": summary.bits_per_weight,
        "engine": summary.engine,  # device, dtype, and the block a resumed run began at
        **Checkpoint(Path(out_dir)).files(),
        "pid": os.getpid(),  # the process that quantized (a thread here, or a Dask worker)
        "seconds": time.perf_counter() - start,
    }
