"""The evaluate flow: perplexity, size and bits per weight of an existing checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import EvaluateJob, slug
from tasks.download import download_model
from tasks.evaluate import evaluate_model
from tasks.record import record_params, record_run
from tracking.adapter import mlflow_run


@flow(name="evaluate", log_prints=True)
def evaluate_flow(job: EvaluateJob) -> dict[str, Any]:
    """Evaluate any model source and record the result in MLflow."""
    logger = get_run_logger()
    spec = job.evaluation()
    evaluation = {"evaluation": spec.model_dump()}
    tags = {"quantmill.flow": "evaluate"}
    with mlflow_run(f"evaluate-{slug(job.model)}", job.experiment, tags=tags) as run:
        record_params(run, None, evaluation)
        model = download_model(job.model, job.revision)
        target = model["path"] if Path(model["path"], "config.json").is_file() else model
        result = evaluate_model(target, spec, engine=job.engine.model_dump())
        times = {"download": model["seconds"], "evaluate": result["seconds"]}
        figures = record_run(run, model, evaluation, None, None, result, times)
        logger.info("%s: perplexity %.2f", job.model, result["perplexity"])
        logger.info("MLflow: %s", run.where())
        return {**figures, "mlflow": run.where(), "mlflow_run_id": run.run_id}
