"""The quantize flow: download → calibrate → quantize → evaluate → record → publish."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import PublishSettings, QuantizeJob
from flows.publish import publish_checkpoint
from quantmill.recipe import Recipe
from tasks.analyze import outlier_report
from tasks.calibrate import collect_statistics, prepare_calibration
from tasks.download import download_model
from tasks.evaluate import evaluate_model
from tasks.publish import check_hub_access
from tasks.quantize import check_outputs, check_recipe, quantize_model
from tasks.record import record_params, record_run
from tracking.adapter import TrackedRun, mlflow_run


def quantize_one(
    model: dict[str, Any],
    recipe: Recipe,
    out_dir: str,
    run: TrackedRun,
    calibration: dict[str, Any] | None,
    statistics: dict[str, Any] | None,
    original_eval: dict[str, Any],
    overwrite: bool = False,
    export_format: str = "packed",
    timings: dict[str, float] | None = None,
    publish: PublishSettings | None = None,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize, evaluate, record and publish one recipe into ``run``; shared by both flows.
    The heavy tasks are submitted to the flow's task runner (threads here, or Dask)."""
    quantized = quantize_model.submit(
        model, recipe, out_dir, calibration, statistics, overwrite, export_format, engine
    ).result()
    evaluation = evaluate_model.submit(
        quantized["out_dir"], recipe.evaluation, update_summary=True,
        original_eval=original_eval, engine=engine,
    ).result()  # fmt: skip
    times = {
        **(timings or {}),
        "quantize": quantized["seconds"],
        "evaluate": evaluation["seconds"],
    }
    figures = record_run(run, model, recipe.to_dict(), quantized, original_eval, evaluation, times)
    published = {}
    if publish is not None and publish.enabled():
        published = {"published": publish_checkpoint(quantized["out_dir"], publish, run)}
    gguf = {}
    if "gguf" in quantized:  # --format gguf: the file llama.cpp runs, beside the checkpoint
        gguf = {"gguf": quantized["gguf"]}
        get_run_logger().info("GGUF: %s (%s)", gguf["gguf"]["path"], gguf["gguf"]["tensor_types"])
    return {
        "recipe": recipe.name,
        "out_dir": quantized["out_dir"],
        "mlflow_run_id": run.run_id,
        "original_perplexity": original_eval.get("perplexity"),
        **figures,
        **published,
        **gguf,
    }


@flow(name="quantize", log_prints=True)
def quantize_flow(job: QuantizeJob = QuantizeJob()) -> dict[str, Any]:  # noqa: B008
    """Quantize one model with one recipe, evaluate it, record everything in MLflow and
    publish the checkpoint (Hub when ``publish.hub_repo`` is set, MLflow registry)."""
    logger = get_run_logger()
    recipe = job.load()  # parsed once, when the job was made
    engine = job.engine.model_dump()
    check_outputs(job.outputs(), job.overwrite)  # before the download
    if job.publish.hub_repo:  # a bad token fails here, before any work
        check_hub_access(job.publish.hub_repo, job.publish.token_secret)
    with mlflow_run(recipe.name, job.experiment, tags={"quantmill.flow": "quantize"}) as run:
        record_params(run, None, recipe.to_dict())
        model = download_model(job.model, job.revision)
        check_recipe(model, [recipe], job.export_format)
        calibration = statistics = None
        timings = {"download": model["seconds"]}
        if recipe.needs_calibration() or job.outlier_report:
            prepared = prepare_calibration(model, recipe.calibration)
            timings["calibration_data"] = prepared["seconds"]
            calibration = prepared if recipe.needs_calibration() else None
            if recipe.uses_shared_statistics():
                statistics = collect_statistics(model, recipe.calibration, calibration, engine)
                timings["statistics"] = statistics["seconds"]
            if job.outlier_report:
                folder = f"{job.output_dir(recipe)}-outliers"
                batch = recipe.calibration.batch_size
                outliers = outlier_report(model, prepared["path"], folder, batch, run)
                timings["outliers"] = outliers["seconds"]
        original = evaluate_model(model, recipe.evaluation, original=True, engine=engine)
        timings["evaluate_original"] = original["seconds"]
        result = quantize_one(
            model,
            recipe,
            job.output_dir(recipe),
            run,
            calibration,
            statistics,
            original,
            job.overwrite,
            job.export_format,
            timings,
            job.publish,
            engine,
        )
        logger.info(
            "%s: perplexity %.2f (original %.2f), %.3f bits/weight, checkpoint %s",
            recipe.name,
            result.get("perplexity", float("nan")),
            original.get("perplexity", float("nan")),
            result.get("bits_per_weight", float("nan")),
            result["out_dir"],
        )
        logger.info("MLflow: %s", run.where())
        return {**result, "mlflow": run.where(), "model": model}
