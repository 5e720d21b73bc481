"""The outlier report of a model: per-layer activation and weight statistics as
files, MLflow artifacts (``outliers/``) and a Prefect markdown artifact."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from quantmill import stages
from quantmill.outliers import outliers_of, save_report, worst_layers_table
from quantmill.sources import ResolvedModel
from tracking import adapter
from tracking.adapter import TrackedRun
from tracking.figures import Figure

ARTIFACT_DIR = "outliers"


@task(name="outlier-report")
def outlier_report(
    model: dict[str, Any],
    calibration: str,
    out_dir: str,
    batch_size: int = 8,
    run: TrackedRun | None = None,
) -> dict[str, Any]:
    """Write ``outliers.{json,csv,png}`` into ``out_dir``; with ``run``, log them under
    ``outliers/`` and the model-level totals as metrics. Returns paths and totals."""
    start = time.perf_counter()
    resolved = ResolvedModel.from_dict(model)
    report = outliers_of(resolved.path, stages.load_calibration(calibration), batch_size, False)
    paths = save_report(report, out_dir)
    summary = report.summary()
    name = Path(resolved.source).name or resolved.source
    create_markdown_artifact(
        markdown=f"## Outlier report: {name}\n\nLayers with the largest activation "
        f"max / median ratio (outlier channel: |x| > {report.threshold:g})\n\n"
        f"{worst_layers_table(report)}\n",
        key=artifact_key(name),
        description=f"activation and weight outliers of {name}",
    )
    if run is not None:
        _log_to_mlflow(run, paths, summary)
    worst = summary["worst_layers"][0] if summary["worst_layers"] else {}
    return {
        **{key: str(path.resolve()) for key, path in paths.items()},
        "layers": summary["layers"],
        "act_outlier_channels": summary["act_outlier_channels"],
        "layers_with_outlier_channels": summary["layers_with_outlier_channels"],
        "max_act_max_median_ratio": summary["max_act_max_median_ratio"],
        "worst_layer": worst.get("name"),
        "seconds": time.perf_counter() - start,
    }


def artifact_key(model_name: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return "outliers-" + (re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-") or "model")


def _log_to_mlflow(run: TrackedRun, paths: dict[str, Path], summary: dict[str, Any]) -> None:
    adapter.log_files(run, list(paths.values()), ARTIFACT_DIR)
    keys = ("act_outlier_channels", "layers_with_outlier_channels", "max_act_max_median_ratio")
    adapter.log_metrics(run, [
        Figure(f"outliers_{key}", float(summary[key]))
        for key in keys
        if summary[key] is not None and math.isfinite(summary[key])
    ])  # fmt: skip
