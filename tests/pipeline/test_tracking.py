"""MLflow tracking helpers, without Prefect: run lifecycle and what is logged."""

from __future__ import annotations

import pytest

from tracking.adapter import get_client, mlflow_run
from tracking.figures import flatten, run_metrics, run_params


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("QUANTMILL_MLFLOW_DIR", str(tmp_path / "mlruns"))
    return get_client()


def test_flatten_names_every_leaf_by_its_path():
    recipe = {"steps": [{"method": "gptq", "weights": {"bits": 4}}], "targets": [], "x": None}
    assert flatten(recipe, "recipe.") == {
        "recipe.steps.0.method": "gptq",
        "recipe.steps.0.weights.bits": "4",
        "recipe.targets": "[]",
        "recipe.x": "None",
    }


def test_params_hold_model_identity_and_versions():
    params = run_params({"source": "m", "kind": "hub", "revision": "abc123"}, {"name": "r"})
    assert params["model.revision"] == "abc123" and params["recipe.name"] == "r"
    assert params["versions.torch"].startswith("2.") and "versions.mlflow" in params


def test_metrics_derive_ratios_and_stage_times():
    figures = run_metrics(
        {
            "size_bytes": 100,
            "original_size_bytes": 400,
            "quant_seconds": 3.0,
            "bits_per_weight": 4.25,
        },
        {"perplexity": 20.0},
        {"perplexity": 25.0, "size_bytes": 100},
        {"quantize": 3.5},
    )
    assert figures["compression_ratio"] == 4.0 and figures["perplexity_ratio"] == 1.25
    assert figures["time_quantize_s"] == 3.5 and figures["bits_per_weight"] == 4.25


def test_a_run_ends_finished_or_failed_with_the_error(local_store, tmp_path):
    with mlflow_run("ok") as run:
        pass
    assert local_store.get_run(run.run_id).info.status == "FINISHED"
    assert "mlflow ui --backend-store-uri sqlite:///" in run.where()
    with pytest.raises(ValueError, match="bad bits"):
        with mlflow_run("broken") as failed:
            raise ValueError("bad bits")
    record = local_store.get_run(failed.run_id)
    assert record.info.status == "FAILED"
    assert record.data.tags["error"] == "ValueError: bad bits"
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
