"""The sweep flow: one model, several recipes, compared side by side.

Calibration data and statistics are prepared once per distinct calibration
spec and shared by the recipes that can use them; recipes then run
concurrently (at most ``max_concurrency`` at a time), each in its own MLflow
child run. The flow ends with a comparison table and a size-vs-perplexity
plot, as Prefect artifacts and as artifacts of the parent MLflow run.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import SweepJob, slug
from flows.quantize import quantize_one
from quantmill import plots
from quantmill.recipe import Recipe
from tasks.calibrate import collect_statistics, prepare_calibration
from tasks.download import download_model
from tasks.evaluate import evaluate_model
from tasks.quantize import check_recipe
from tasks.tracking import TrackedRun, error_message, get_client, log_params, mlflow_run

COLUMNS = ("recipe", "status", "perplexity", "size_bytes", "bits_per_weight", "quant_seconds")


@task(name="run-recipe")
def run_recipe(
    model: dict[str, Any],
    recipe: dict[str, Any],
    out_dir: str,
    parent: TrackedRun,
    calibration: dict[str, Any] | None,
    statistics: dict[str, Any] | None,
    original_eval: dict[str, Any],
    overwrite: bool,
    threads: int | None = None,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One recipe of a sweep, in its own MLflow child run."""
    if threads:  # torch's thread count is per OS thread for the OpenMP pool
        import torch

        torch.set_num_threads(threads)
    parsed = Recipe.model_validate(recipe)
    tags = {"quantmill.flow": "sweep", "quantmill.recipe": parsed.name}
    tags["quantmill.pid"] = str(os.getpid())  # which process ran it (threads or Dask)
    with mlflow_run(parsed.name, parent=parent, tags=tags) as run:
        return quantize_one(
            model, parsed, out_dir, run, calibration, statistics, original_eval, overwrite,
            engine=engine,
        )  # fmt: skip


@flow(name="sweep", log_prints=True)
def sweep_flow(job: SweepJob = SweepJob()) -> dict[str, Any]:  # noqa: B008
    """Quantize one model with several recipes and compare them."""
    logger = get_run_logger()
    recipes = job.load()
    name = f"sweep-{slug(job.model)}"
    with mlflow_run(name, job.experiment, tags={"quantmill.flow": "sweep"}) as parent:
        log_params(parent, None, None)
        if job.fan_out:
            from flows.fanout import fan_out

            rows, original = fan_out(job)
            return _finish(parent, rows, original, logger)
        model = download_model(job.model, job.revision)
        check_recipe(model, [recipe.to_dict() for recipe in recipes])
        shared = prepare_shared(model, recipes, job.engine.model_dump())
        with (
            threads_per_recipe(job.max_concurrency, len(recipes)) as threads,
            task_runner(job) as runner,
        ):
            futures = {
                recipe.name: runner.submit(
                    run_recipe,
                    {
                        "model": model,
                        "recipe": recipe.to_dict(),
                        "out_dir": str(Path(job.out_root) / slug(recipe.name)),
                        "parent": parent,
                        "calibration": shared["calibration"].get(_calib_key(recipe)),
                        "statistics": shared["statistics"].get(_calib_key(recipe)),
                        "original_eval": shared["original"][_eval_key(recipe)],
                        "overwrite": job.overwrite,
                        "threads": threads,
                        "engine": job.engine.model_dump(),
                    },
                )
                for recipe in recipes
            }
            rows = [_row(name, future) for name, future in futures.items()]
        original = next(iter(shared["original"].values()))
        return _finish(parent, rows, original, logger)


def _finish(parent: TrackedRun, rows: list[dict[str, Any]], original: dict[str, Any], logger):
    """Compare the recipes; fail, naming each failed recipe, when one failed."""
    comparison = publish_comparison(parent, rows, original)
    failed = [r for r in rows if r["status"] != "ok"]
    for row in rows:
        logger.info("%s", {k: row.get(k) for k in COLUMNS})
    logger.info("MLflow: %s", parent.where())
    if failed:
        raise RuntimeError("; ".join(f"recipe {r['recipe']} failed: {r['error']}" for r in failed))
    return {"rows": rows, "mlflow": parent.where(), **comparison}


def task_runner(job: SweepJob) -> Any:
    """Threads in this process, or the processes of a Dask cluster (local or remote)."""
    if not job.dask:
        return ThreadPoolTaskRunner(max_workers=job.max_concurrency)
    from prefect_dask import DaskTaskRunner

    if job.dask == "local":
        # one recipe per worker process, each process with its own torch threads
        cluster = {"n_workers": job.max_concurrency, "threads_per_worker": 1, "processes": True}
        return DaskTaskRunner(cluster_kwargs=cluster)
    return DaskTaskRunner(address=job.dask)


@contextmanager
def threads_per_recipe(limit: int, recipes: int) -> Iterator[int]:
    """Share the CPU cores among the recipes that run at once: torch's threads of two
    concurrent recipes on the same cores would otherwise contend and slow both."""
    import torch

    before = torch.get_num_threads()
    at_once = max(1, min(limit, recipes))
    threads = max(1, (os.cpu_count() or 1) // at_once)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def prepare_shared(
    model: dict[str, Any], recipes: list[Recipe], engine: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Calibration data and statistics once per calibration spec; original perplexity once
    per evaluation spec."""
    shared: dict[str, dict[str, Any]] = {"calibration": {}, "statistics": {}, "original": {}}
    for recipe in recipes:
        key = _calib_key(recipe)
        if recipe.needs_calibration() and key not in shared["calibration"]:
            shared["calibration"][key] = prepare_calibration(model, recipe.to_dict())
        if recipe.uses_shared_statistics() and key not in shared["statistics"]:
            calibration = shared["calibration"][key]
            shared["statistics"][key] = collect_statistics(
                model, recipe.to_dict(), calibration, engine
            )
        if _eval_key(recipe) not in shared["original"]:
            original = evaluate_model(model, recipe.to_dict(), original=True, engine=engine)
            shared["original"][_eval_key(recipe)] = original
    return shared


def publish_comparison(
    parent: TrackedRun, rows: list[dict[str, Any]], original: dict[str, Any]
) -> dict[str, Any]:
    """The table and the plot, as Prefect artifacts and parent-run MLflow artifacts."""
    table = [{k: row.get(k) for k in COLUMNS} for row in rows]
    markdown = comparison_markdown(table, original)
    create_table_artifact(table, key="sweep-comparison", description="recipes side by side")
    client = get_client()
    with tempfile.TemporaryDirectory() as tmp:
        plot = plots.size_vs_perplexity(table, Path(tmp) / "size_vs_perplexity.png", original)
        encoded = base64.b64encode(plot.read_bytes()).decode()
        create_markdown_artifact(
            f"{markdown}\n\n![size vs perplexity](data:image/png;base64,{encoded})\n",
            key="sweep-plot",
            description="size on disk against perplexity, one point per recipe",
        )
        (Path(tmp) / "comparison.md").write_text(markdown + "\n")
        (Path(tmp) / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
        for name in ("comparison.md", "comparison.json"):
            client.log_artifact(parent.run_id, str(Path(tmp) / name))
        client.log_artifact(parent.run_id, str(plot), "plots")
    return {"table": markdown}


def comparison_markdown(table: list[dict[str, Any]], original: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| recipe | status | perplexity | size (MB) | bits/weight | quantize (s) |",
        "|---|---|---|---|---|---|",
        f"| original | - | {fmt(original.get('perplexity'), '.2f')} "
        f"| {fmt(original.get('size_bytes', 0) / 2**20, '.1f')} | - | - |",
    ]
    for row in table:
        size = row.get("size_bytes")
        lines.append(
            f"| {row['recipe']} | {row['status']} | {fmt(row.get('perplexity'), '.2f')} "
            f"| {fmt(size and size / 2**20, '.1f')} | {fmt(row.get('bits_per_weight'), '.3f')} "
            f"| {fmt(row.get('quant_seconds'), '.1f')} |"
        )
    return "\n".join(lines)


def _row(name: str, future) -> dict[str, Any]:
    try:
        return {**future.result(), "status": "ok"}
    except Exception as exc:  # a failed recipe is reported; the others still count
        return {"recipe": name, "status": "failed", "error": error_message(exc)}


def _calib_key(recipe: Recipe) -> str:
    return json.dumps(recipe.calibration.model_dump(), sort_keys=True)


def _eval_key(recipe: Recipe) -> str:
    return json.dumps(recipe.evaluation.model_dump(), sort_keys=True)
