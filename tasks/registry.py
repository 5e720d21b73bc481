"""Register a quantized checkpoint in the MLflow Model Registry.

Each checkpoint becomes a version of a registered model named after its base
model, logged as a pyfunc model (``tasks/mlflow_model.py``) with the checkpoint
inside. The recipe's quality gate decides whether the version gets the alias
``candidate``; a version that fails keeps no alias and says why in a tag.
Registering the same checkpoint again (a re-run after an outage) finds the
version made before by its content digest instead of adding another.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import task

from quantmill import card, digest
from quantmill.errors import RegistryError
from tracking.adapter import TrackedRun, get_client, registry_uri

CANDIDATE_ALIAS = "candidate"
DIGEST_TAG = "quantmill.checkpoint_digest"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


@task(name="register-model")
def register_model(
    run: TrackedRun,
    checkpoint: str,
    name: str | None = None,
    hub: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register ``checkpoint`` (once per content) and apply the quality gate."""
    info = card.CheckpointInfo.load(checkpoint)
    name = name or info.base().name
    client = get_client()
    with registry_errors(checkpoint, "reaching the model registry"):
        client.search_registered_models(max_results=1)
    content = digest.folder_digest(Path(checkpoint))
    with registry_errors(checkpoint, f"registering {name!r}"):
        version = _find_version(client, name, content)
        reused = version is not None
        if version is None:
            source = _log_model(client, run, checkpoint)
            _ensure_registered_model(client, name, info)
            version = client.create_model_version(
                name, source, run_id=run.run_id, description=_description(info)
            ).version
        gate = info.gate()
        tags = version_tags(info, content, hub)
        tags["quality_gate"] = "passed" if gate.passed else "failed"
        tags["quality_gate_reason"] = gate.reason
        for engine, found in info.serving().items():  # what the serving verifiers found
            tags[f"serving.{engine}"] = "ok" if found.get("ok") else "refused"
            if not found.get("ok"):
                tags[f"serving.{engine}.reason"] = str(found.get("reason"))[:500]
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if gate.passed:
            client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    return {
        "name": name,
        "version": str(version),
        "alias": CANDIDATE_ALIAS if gate.passed else None,
        "gate": gate.to_dict(),
        "reused": reused,
        "uri": f"models:/{name}/{version}",
        "registry": _safe_uri(registry_uri()),
    }


def version_tags(
    info: card.CheckpointInfo, content: str, hub: dict[str, Any] | None
) -> dict[str, str]:
    base = info.base()
    gate = info.gate()
    tags = {
        "method": "+".join(info.methods()),
        "bits": "/".join(str(b) for b in info.bits()),
        "recipe": info.recipe.name,
        "perplexity": _fmt(info.perplexity),
        "original_perplexity": _fmt(info.original_perplexity),
        "perplexity_recovery": _fmt(gate.recovery, 4),
        "bits_per_weight": _fmt(info.summary.get("bits_per_weight"), 3),
        "base_model": base.repo_id or base.name,
        "base_commit": str(base.revision),
        DIGEST_TAG: content,
    }
    accuracy = info.summary.get("accuracy") or {}
    if accuracy.get("mean_recovery") is not None:
        tags["accuracy_mean"] = _fmt(accuracy.get("mean_quantized"), 4)
        tags["accuracy_recovery"] = _fmt(accuracy["mean_recovery"], 4)
        tags["tasks"] = ",".join(accuracy.get("tasks", {}))
    if hub:
        tags["hub_repo"] = hub["repo_id"]
        tags["hub_commit"] = hub["commit"]
    return tags


def _find_version(client: Any, name: str, content: str) -> str | None:
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(DIGEST_TAG) == content:
            return str(version.version)
    return None


def _ensure_registered_model(client: Any, name: str, info: card.CheckpointInfo) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        base = info.base()
        description = f"Quantized versions of {base.repo_id or base.name}, made by quantmill."
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by a concurrent run
            client.get_registered_model(name)


def _log_model(client: Any, run: TrackedRun, checkpoint: str) -> str:
    """Save a pyfunc model holding the checkpoint and log it under the run's ``model/``."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    signature = infer_signature(["a prompt"], ["a continuation"], params={"max_new_tokens": 32})
    with tempfile.TemporaryDirectory(prefix="quantmill-model-") as tmp, warnings.catch_warnings():
        # the model takes a params schema from its signature, not from type hints
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        target = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(target),
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": str(checkpoint)},
            pip_requirements=_requirements(),
            signature=signature,
        )
        client.log_artifacts(run.run_id, str(target), "model")
    return f"{client.get_run(run.run_id).info.artifact_uri.rstrip('/')}/model"


def _requirements() -> list[str]:
    out = []
    for package in ("torch", "transformers", "compressed-tensors", "mlflow"):
        try:
            out.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(package)
    return out


def _description(info: card.CheckpointInfo) -> str:
    gate = info.gate()
    return f"Recipe {info.recipe.name}; perplexity {_fmt(info.perplexity)}; gate {gate.reason}"


@contextmanager
def registry_errors(checkpoint: str, what: str) -> Iterator[None]:
    """Turn registry failures into a ``RegistryError`` that says how to re-run."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(
            f"{what} at {_safe_uri(registry_uri())} failed: {type(exc).__name__}: "
            f"{_first_line(exc)}. The checkpoint {checkpoint} is kept, and so is any Hub "
            "revision already published. Once the registry is back, run `quantmill publish "
            f"{checkpoint}` (with the same --hub-repo): it makes no new Hub revision "
            "and registers the checkpoint once."
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _safe_uri(uri: str) -> str:
    """The URI without a password (``scheme://user:pw@host`` → ``scheme://user:***@host``)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.split("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return uri


def _fmt(value: Any, digits: int = 2) -> str:
    return "none" if value is None else f"{float(value):.{digits}f}"
