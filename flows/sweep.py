"""The sweep flow: one model, several recipes, compared side by side.

Calibration data and statistics are prepared once per distinct calibration
spec and shared by the recipes that can use them; recipes then run
concurrently (at most ``max_concurrency`` at a time) as ``run-recipe``
subflows, each in its own MLflow child run; their heavy tasks run on threads
here or on the processes of a Dask cluster. The flow ends with a comparison
table and a size-vs-perplexity plot, as Prefect artifacts and as artifacts of
the parent MLflow run.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger

from flows.params import SweepJob, slug
from flows.quantize import quantize_one
from quantmill.recipe import Recipe
from tasks.calibrate import collect_statistics, prepare_calibration
from tasks.download import download_model
from tasks.evaluate import evaluate_model
from tasks.quantize import check_outputs, check_recipe
from tasks.record import record_comparison, record_params
from tracking.adapter import TrackedRun, error_message, mlflow_run

COLUMNS = (
    "recipe", "status", "perplexity", "accuracy_mean", "accuracy_recovery", "size_bytes",
    "bits_per_weight", "quant_seconds",
)  # fmt: skip


@flow(name="run-recipe")
def run_recipe(
    model: dict[str, Any],
    recipe: Recipe,
    out_dir: str,
    parent: TrackedRun,
    calibration: dict[str, Any] | None,
    statistics: dict[str, Any] | None,
    original_eval: dict[str, Any],
    overwrite: bool,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One recipe of a sweep, in its own MLflow child run."""
    tags = {"quantmill.flow": "sweep", "quantmill.recipe": recipe.name}
    with mlflow_run(recipe.name, parent=parent, tags=tags) as run:
        return quantize_one(
            model, recipe, out_dir, run, calibration, statistics, original_eval, overwrite,
            engine=engine,
        )  # fmt: skip


@flow(name="sweep", log_prints=True)
def sweep_flow(job: SweepJob = SweepJob()) -> dict[str, Any]:  # noqa: B008
    """Quantize one model with several recipes and compare them."""
    logger = get_run_logger()
    recipes = job.load()  # parsed once, when the job was made
    name = f"sweep-{slug(job.model)}"
    check_outputs(job.outputs(), job.overwrite)  # before the download
    with mlflow_run(name, job.experiment, tags={"quantmill.flow": "sweep"}) as parent:
        record_params(parent, None, None)
        if job.fan_out:
            from flows.fanout import fan_out

            rows, original = fan_out(job)
            return _finish(parent, rows, original, logger)
        model = download_model(job.model, job.revision)
        check_recipe(model, recipes)
        engine = job.engine.model_dump()
        shared = prepare_shared(model, recipes, engine)
        if engine["threads"] is None:  # share the cores among the recipes that run at once
            engine["threads"] = threads_per_recipe(job.max_concurrency, len(recipes))
        with task_runner(job) as runner, ThreadPoolExecutor(job.max_concurrency) as pool:
            recipe_flow = run_recipe.with_options(task_runner=runner)
            futures = {
                recipe.name: pool.submit(
                    contextvars.copy_context().run,
                    recipe_flow,
                    model,
                    recipe,
                    str(job.folder() / slug(recipe.name)),
                    parent,
                    shared["calibration"].get(_calib_key(recipe)),
                    shared["statistics"].get(_calib_key(recipe)),
                    shared["original"][_eval_key(recipe)],
                    job.overwrite,
                    engine,
                )
                for recipe in recipes
            }
            rows = [_row(name, future) for name, future in futures.items()]
        original = next(iter(shared["original"].values()))
        return _finish(parent, rows, original, logger)


def _finish(parent: TrackedRun, rows: list[dict[str, Any]], original: dict[str, Any], logger):
    """Compare the recipes; fail, naming each failed recipe, when one failed."""
    table = [{k: row.get(k) for k in COLUMNS} for row in rows]
    markdown = record_comparison(parent, table, original)
    failed = [r for r in rows if r["status"] != "ok"]
    for row in table:
        logger.info("%s", row)
    logger.info("MLflow: %s", parent.where())
    if failed:
        raise RuntimeError("; ".join(f"recipe {r['recipe']} failed: {r['error']}" for r in failed))
    return {"rows": rows, "mlflow": parent.where(), "table": markdown}


@contextmanager
def task_runner(job: SweepJob) -> Iterator[Any]:
    """The task runner of each recipe's heavy tasks: threads in this process, or the
    processes of a Dask cluster (one local cluster for the whole sweep, or a remote one)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if not job.dask:
        yield ThreadPoolTaskRunner(max_workers=2)  # quantize, then evaluate
        return
    from prefect_dask import DaskTaskRunner

    if job.dask != "local":
        yield DaskTaskRunner(address=job.dask)
        return
    from distributed import LocalCluster

    # one recipe per worker process, each process with its own torch threads
    with LocalCluster(
        n_workers=job.max_concurrency, threads_per_worker=1, processes=True
    ) as cluster:
        yield DaskTaskRunner(address=cluster.scheduler_address)


def threads_per_recipe(limit: int, recipes: int) -> int:
    """The cores each recipe gets when ``min(limit, recipes)`` run at once: torch's threads
    of two concurrent recipes on the same cores would otherwise contend and slow both."""
    at_once = max(1, min(limit, recipes))
    return max(1, (os.cpu_count() or 1) // at_once)


def prepare_shared(
    model: dict[str, Any], recipes: list[Recipe], engine: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Calibration data and statistics once per calibration spec; original perplexity once
    per evaluation spec."""
    shared: dict[str, dict[str, Any]] = {"calibration": {}, "statistics": {}, "original": {}}
    for recipe in recipes:
        key = _calib_key(recipe)
        if recipe.needs_calibration() and key not in shared["calibration"]:
            shared["calibration"][key] = prepare_calibration(model, recipe.calibration)
        if recipe.uses_shared_statistics() and key not in shared["statistics"]:
            calibration = shared["calibration"][key]
            shared["statistics"][key] = collect_statistics(
                model, recipe.calibration, calibration, engine
            )
        if _eval_key(recipe) not in shared["original"]:
            original = evaluate_model(model, recipe.evaluation, original=True, engine=engine)
            shared["original"][_eval_key(recipe)] = original
    return shared


def _row(name: str, future) -> dict[str, Any]:
    try:
        return {**future.result(), "status": "ok"}
    except Exception as exc:  # a failed recipe is reported; the others still count
        return {"recipe": name, "status": "failed", "error": error_message(exc)}


def _calib_key(recipe: Recipe) -> str:
    return json.dumps(recipe.calibration.model_dump(), sort_keys=True)


def _eval_key(recipe: Recipe) -> str:
    return json.dumps(recipe.evaluation.model_dump(), sort_keys=True)
