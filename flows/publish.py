"""Publishing: model card → Hub (one commit, verified) → MLflow Model Registry.

``publish_checkpoint`` is the step the quantize flow ends with; ``publish_flow``
runs it alone on a checkpoint folder, e.g. to finish a publication that a
registry outage interrupted (the Hub step then finds its files already there
and makes no new revision).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import PublishJob, PublishSettings, slug
from tasks.publish import (
    check_hub_access,
    hub_artifact,
    publish_to_hub,
    verify_hub_upload,
    verify_serving,
    write_model_card,
)
from tasks.record import tag_run
from tasks.registry import register_model
from tracking.adapter import TrackedRun, mlflow_run


def publish_checkpoint(
    checkpoint: str, settings: PublishSettings, run: TrackedRun
) -> dict[str, Any]:
    """Card, then Hub, then registry; each step runs only once the one before succeeded."""
    logger = get_run_logger()
    serving = None
    if "vllm" in settings.verify:  # before the card: the card and the gate say what it found
        serving = verify_serving(checkpoint, ["vllm"])
        tag_run(run, {"serving.vllm": "ok" if serving["vllm"]["ok"] else "refused"})
        logger.info("vLLM: %s", "serves it" if serving["vllm"]["ok"] else serving["vllm"]["reason"])
    described = write_model_card(checkpoint, settings.hub_repo)
    result: dict[str, Any] = {"card": described["card"], "gate": described["gate"]}
    if serving is not None:
        result["serving"] = serving
    hub = None
    if settings.hub_repo:
        hub = publish_to_hub(checkpoint, settings.hub_repo, settings.private, settings.token_secret)
        if "transformers" in settings.verify:
            check = verify_hub_upload(
                checkpoint, hub["repo_id"], hub["commit"], settings.token_secret
            )
            hub["verified"] = {k: check[k] for k in ("match", "max_abs_logit_diff", "generated")}
        tag_run(run, {f"hub.{k}": hub[k] for k in ("repo_id", "url", "commit")})
        hub_artifact(hub)
        logger.info(
            "Hub: %s at commit %s (%s)",
            hub["url"],
            hub["commit"],
            "new revision" if hub["new_revision"] else "unchanged: no new revision",
        )
        result["hub"] = hub
    if settings.registry:
        registered = register_model(run, checkpoint, settings.registered_model, hub)
        tag_run(run, {f"registry.{k}": registered[k] for k in ("name", "version")})
        logger.info(
            "Registry: %s version %s%s",
            registered["name"],
            registered["version"],
            f" (alias {registered['alias']})"
            if registered["alias"]
            else f" (no alias: gate {registered['gate']['reason']})",
        )
        result["registry"] = registered
    return result


@flow(name="publish", log_prints=True)
def publish_flow(job: PublishJob) -> dict[str, Any]:
    """Publish an existing checkpoint folder to the Hub and the MLflow registry."""
    settings = job.publish
    if settings.hub_repo:  # a bad token fails here, before the card is written
        check_hub_access(settings.hub_repo, settings.token_secret)
    with mlflow_run(
        f"publish {slug(job.checkpoint)}", job.experiment, tags={"quantmill.flow": "publish"}
    ) as run:
        result = publish_checkpoint(job.checkpoint, settings, run)
        return {**result, "mlflow": run.where(), "checkpoint": job.checkpoint}
