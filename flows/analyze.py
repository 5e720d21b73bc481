"""The analyze flow: download → prepare calibration data → outlier report, in one MLflow run."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import AnalyzeJob, slug
from tasks.analyze import outlier_report
from tasks.calibrate import prepare_calibration
from tasks.download import download_model
from tasks.record import record_params
from tracking.adapter import mlflow_run


@flow(name="analyze", log_prints=True)
def analyze_flow(job: AnalyzeJob = AnalyzeJob()) -> dict[str, Any]:  # noqa: B008
    """Per-layer activation and weight outlier statistics of a model, with a plot, as files,
    MLflow artifacts (``outliers/``) and a Prefect markdown artifact."""
    logger = get_run_logger()
    spec = job.calibration()
    settings = {"calibration": spec.model_dump()}
    tags = {"quantmill.flow": "analyze"}
    with mlflow_run(f"outliers-{slug(job.model)}", job.experiment, tags=tags) as run:
        model = download_model(job.model, job.revision)
        record_params(run, model, settings)
        calibration = prepare_calibration(model, spec)
        batch = spec.batch_size
        report = outlier_report(model, calibration["path"], job.output_dir(), batch, run)
        logger.info(
            "%s: largest activation max/median %.1f (%s); %d outlier channels; report %s",
            job.model,
            report["max_act_max_median_ratio"] or float("nan"),
            report["worst_layer"],
            report["act_outlier_channels"],
            report["json"],
        )
        logger.info("MLflow: %s", run.where())
        return {**report, "mlflow": run.where(), "mlflow_run_id": run.run_id, "model": model}
