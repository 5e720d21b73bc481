"""Prepare calibration data and collect calibration statistics, both cached."""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from quantmill import stages
from quantmill.config import CalibrationSpec, EngineSpec
from quantmill.sources import ResolvedModel


@task(name="prepare-calibration")
def prepare_calibration(model: dict[str, Any], spec: CalibrationSpec) -> dict[str, Any]:
    """Token ids for a calibration spec: ``{path, hit, key, seconds}``."""
    start = time.perf_counter()
    cached = stages.prepare_calibration(ResolvedModel.from_dict(model), spec)
    return {**cached.to_dict(), "seconds": time.perf_counter() - start}


@task(name="collect-statistics")
def collect_statistics(
    model: dict[str, Any],
    spec: CalibrationSpec,
    calibration: dict[str, Any],
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The original model's calibration statistics: ``{path, hit, key, seconds}``."""
    start = time.perf_counter()
    cached = stages.prepare_statistics(
        ResolvedModel.from_dict(model), spec, calibration["path"],
        engine=EngineSpec.model_validate(engine or {}),
    )  # fmt: skip
    return {**cached.to_dict(), "seconds": time.perf_counter() - start}
