"""The evaluate flow: perplexity, size and bits per weight of an existing checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import EvaluateJob, load_job_recipe, slug
from quantmill.recipe import parse_recipe, with_overrides
from tasks.download import download_model
from tasks.evaluate import evaluate_model
from tasks.tracking import log_params, mlflow_run, record_run


@flow(name="evaluate", log_prints=True)
def evaluate_flow(job: EvaluateJob) -> dict[str, Any]:
    """Evaluate any model source and record the result in MLflow."""
    logger = get_run_logger()
    if job.recipe_file:
        recipe = load_job_recipe(job.recipe_file, job.data)
    else:  # evaluation settings only: the step is a placeholder the evaluation never runs
        base = parse_recipe({"name": "evaluate", "steps": [{"method": "rtn"}]})
        recipe = with_overrides(base, **job.data.model_dump())
    evaluation = {"evaluation": recipe.evaluation.model_dump()}
    tags = {"quantmill.flow": "evaluate"}
    with mlflow_run(f"evaluate-{slug(job.model)}", job.experiment, tags=tags) as run:
        log_params(run, None, evaluation)
        model = download_model(job.model, job.revision)
        target = model["path"] if Path(model["path"], "config.json").is_file() else model
        result = evaluate_model(target, recipe.to_dict(), engine=job.engine.model_dump())
        times = {"download": model["seconds"], "evaluate": result["seconds"]}
        figures = record_run(run, model, evaluation, None, None, result, times)
        logger.info("%s: perplexity %.2f", job.model, result["perplexity"])
        logger.info("MLflow: %s", run.where())
        return {**figures, "mlflow": run.where(), "mlflow_run_id": run.run_id}
