"""A sweep fanned out over the work pool: each recipe becomes a run of the
``quantize`` deployment, picked up by whichever worker of the pool is free, so
the recipes of one sweep spread over machines. Each run tracks itself in
MLflow; the sweep reads their figures back to compare them."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flows.params import QuantizeJob, SweepJob, slug
from quantmill.recipe import find_recipe, shipped_recipes
from tasks.record import recorded_figures

QUANTIZE_DEPLOYMENT = "quantize/quantize"
FIGURES = ("perplexity", "size_bytes", "bits_per_weight", "quant_seconds")


def fan_out(job: SweepJob) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the comparison, and the original model's figures, from one deployment
    run per recipe (at most ``max_concurrency`` submitted at once)."""
    jobs = {name: quantize_job(job, name) for name in job.sources()}
    with ThreadPoolExecutor(max_workers=job.max_concurrency) as pool:
        futures = {
            name: pool.submit(contextvars.copy_context().run, run_one, child)
            for name, child in jobs.items()
        }
        rows = [row_of(name, future.result()) for name, future in futures.items()]
    done = [r for r in rows if r["status"] == "ok"]
    original = {
        "perplexity": done[0].get("perplexity_original") if done else None,
        "size_bytes": (done[0].get("original_size_bytes") or 0) if done else 0,
        "mean_accuracy": done[0].get("accuracy_mean_original") if done else None,
    }
    return rows, original


def quantize_job(job: SweepJob, source: str) -> QuantizeJob:
    """One recipe's quantize job, its paths absolute: the run's parameters are kept in
    their places again where it runs (``flows.places``), and a sweep's own pass there."""
    shipped = source in shipped_recipes()
    recipe = {"recipe": source} if shipped else {"recipe_file": str(find_recipe(source).resolve())}
    name = source if shipped else Path(source).stem
    return QuantizeJob(
        model=job.model,
        revision=job.revision,
        data=job.data,
        experiment=job.experiment,
        out_dir=str((job.folder() / slug(name)).resolve()),
        overwrite=job.overwrite,
        engine=job.engine,
        publish={"registry": False},
        **recipe,
    )


def run_one(child: QuantizeJob) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(
        QUANTIZE_DEPLOYMENT,
        parameters={"job": child.model_dump(mode="json")},
        timeout=None,  # wait for the run, however long the queue
        as_subflow=True,
    )


def row_of(name: str, flow_run: Any) -> dict[str, Any]:
    state = flow_run.state
    if state is None or not state.is_completed():
        message = state.message if state else "no state"
        return {"recipe": name, "status": "failed", "error": f"run {flow_run.name}: {message}"}
    found = recorded_figures(str(flow_run.id))
    if found is None:
        return {"recipe": name, "status": "failed", "error": "no MLflow run recorded"}
    run_id, metrics = found
    row = {"recipe": name, "status": "ok", "mlflow_run_id": run_id}
    row.update({k: metrics.get(k) for k in FIGURES})
    row["perplexity_original"] = metrics.get("perplexity_original")
    row["original_size_bytes"] = metrics.get("original_size_bytes")
    row["flow_run_id"] = str(flow_run.id)
    return row
