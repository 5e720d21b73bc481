"""The Prefect flows end to end on the real model, checked through MlflowClient."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import yaml

from flows.evaluate import evaluate_flow
from flows.params import EvaluateJob, QuantizeJob, SweepJob
from flows.quantize import quantize_flow
from flows.sweep import sweep_flow
from quantmill import stages
from quantmill.recipes import SHIPPED_DIR
from tests.conftest import DATA_DIR, SHORT_BLOCKS
from tests.pipeline.conftest import small_data

pytestmark = pytest.mark.slow


def runs_of(client, flow_run_id: str):
    """The top-level MLflow runs tagged with ``flow_run_id`` (a sweep's children carry it too)."""
    exp = client.get_experiment_by_name("quantmill")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def counting(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call."""
    calls: list = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_quantize_flow_tracks_everything_in_mlflow(
    pipeline_env, short_smollm2, mlflow_client, monkeypatch, caplog
):
    import traceback

    from quantmill.recipe import Recipe

    parses = []
    real = Recipe.model_validate

    def counted(cls, data, **kwargs):
        # the card and the gate read the written checkpoint's recipe file: not the job's
        if not any(f.filename.endswith("card.py") for f in traceback.extract_stack()):
            parses.append(1)
        return real(data, **kwargs)

    monkeypatch.setattr(Recipe, "model_validate", classmethod(counted))
    caplog.set_level(logging.INFO, logger="quantmill")  # as `quantmill run` sets it
    data = small_data(tasks="piqa", limit=16, task_data=str(DATA_DIR / "zero-shot"))
    job = QuantizeJob(model=str(short_smollm2), recipe="gptq-w4g64", out_dir="out", data=data)
    state = quantize_flow(job, return_state=True)
    assert state.is_completed(), state.message
    assert len(parses) == 1  # the recipe is parsed once, when the job is made
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)

    (run,) = runs_of(mlflow_client, flow_run_id)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["recipe.steps.0.method"] == "gptq"
    assert params["recipe.steps.0.weights.group_size"] == "64"
    assert params["recipe.calibration.num_samples"] == "4"
    assert params["model.revision"].startswith("sha256:")
    assert params["versions.torch"].startswith("2.")
    # a 4-block cut of the model: its perplexity means nothing, so only that both were
    # measured and differ (the whole model's 15.15 on this window: tests/integration)
    assert metrics["perplexity"] != metrics["perplexity_original"] > 1
    assert metrics["perplexity"] == pytest.approx(result["perplexity"])
    assert 4.0 < metrics["bits_per_weight"] < 4.6
    for stage in ("download", "calibration_data", "quantize", "evaluate"):
        assert metrics[f"time_{stage}_s"] >= 0
    history = mlflow_client.get_metric_history(run.info.run_id, "layer_loss")
    assert sorted(m.step for m in history) == list(range(SHORT_BLOCKS * 7))  # 7 per block
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert flow_run_id in tags["prefect.flow_run_url"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"quantmill_recipe.yaml", "quantmill_eval.json", "quantmill_layers.json"} <= artifacts
    plots = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/layer_loss.png"}
    # the checkpoint's own summary holds the evaluation too
    summary = yaml.safe_load((Path("out") / "quantmill_eval.json").read_text())
    assert summary["quantized"]["perplexity"] == pytest.approx(metrics["perplexity"])

    check_accuracy_records(mlflow_client, run, result, flow_run_id)

    evaluated = evaluate_flow(EvaluateJob(model="out", data=small_data()), return_state=True)
    assert evaluated.is_completed(), evaluated.message
    (eval_run,) = runs_of(mlflow_client, str(evaluated.state_details.flow_run_id))
    assert eval_run.data.metrics["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-4)
    assert eval_run.data.params["recipe.evaluation.max_windows"] == "1"


def check_accuracy_records(client, run, result: dict, flow_run_id: str) -> None:
    """Zero-shot accuracy of both models in MLflow (figures, the harness's own results),
    the registry's tags and the Prefect logs, for a run with ``tasks="piqa", limit=16``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    metrics = run.data.metrics
    for prefix in ("tasks", "tasks_original"):
        assert 0 <= metrics[f"{prefix}.piqa.acc"] <= 1 and metrics[f"{prefix}.piqa.acc_stderr"] > 0
        assert f"{prefix}.piqa.acc_norm" in metrics and metrics[f"{prefix}.piqa.seconds"] > 0
    recovery = metrics["tasks.piqa.acc"] / metrics["tasks_original.piqa.acc"]
    assert metrics["accuracy_recovery"] == pytest.approx(recovery)
    assert result["accuracy_recovery"] == pytest.approx(recovery)  # the sweep's row reads it
    raw = client.download_artifacts(run.info.run_id, "lm_eval_results.json", ".")
    harness = yaml.safe_load(Path(raw).read_text())
    assert harness["quantized"]["results"]["piqa"]["acc,none"] == metrics["tasks.piqa.acc"]
    assert harness["original"]["n-samples"]["piqa"]["effective"] == 16
    registered = result["published"]["registry"]
    tags = client.get_model_version(registered["name"], registered["version"]).tags
    assert float(tags["accuracy_recovery"]) == pytest.approx(recovery, abs=1e-4)
    assert tags["tasks"] == "piqa"
    APILogHandler().flush()  # logs are sent in batches
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    messages = "\n".join(log.message for log in logs)
    assert "accuracy: task 1/1 piqa (local)" in messages  # the original's, then the checkpoint's
    assert messages.count("accuracy: piqa acc") == 2


def test_second_run_reuses_prepared_data_and_statistics(
    pipeline_env, short_smollm2, mlflow_client, monkeypatch
):
    tokenize = counting(monkeypatch, stages, "calibration_ids")
    collect = counting(monkeypatch, stages, "collect_statistics")
    job = dict(model=str(short_smollm2), recipe="gptq-w4g64-shared", data=small_data())
    first = quantize_flow(QuantizeJob(**job, out_dir="first"))
    assert (len(tokenize), len(collect)) == (1, 1)
    second = quantize_flow(QuantizeJob(**job, out_dir="second"))
    assert (len(tokenize), len(collect)) == (1, 1)  # no new work: both came from the cache
    assert second["perplexity"] == pytest.approx(first["perplexity"])
    # a different calibration spec is new work
    quantize_flow(QuantizeJob(**{**job, "data": small_data(calib_samples=5)}, out_dir="third"))
    assert (len(tokenize), len(collect)) == (2, 2)


def test_sweep_shares_calibration_runs_concurrently_and_compares(
    pipeline_env, short_smollm2, mlflow_client, monkeypatch
):
    from prefect.artifacts import Artifact

    from quantmill import api

    collect = counting(monkeypatch, stages, "collect_statistics")
    barrier = threading.Barrier(2, timeout=300)  # broken unless two recipes run at once
    real_quantize = api.quantize

    def quantize_together(*args, **kwargs):
        barrier.wait(timeout=600)
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(api, "quantize", quantize_together)
    low_bits = pipeline_env / "gptq-w3-shared.yaml"
    data = yaml.safe_load((SHIPPED_DIR / "gptq-w4g64-shared.yaml").read_text())
    data["name"] = "gptq-w3g64-shared"
    data["steps"][0]["weights"]["bits"] = 3
    low_bits.write_text(yaml.safe_dump(data))
    job = SweepJob(
        model=str(short_smollm2),
        recipes=["gptq-w4g64-shared"],
        recipe_files=[str(low_bits)],
        max_concurrency=2,
        data=small_data(),
    )
    state = sweep_flow(job, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert len(collect) == 1  # both recipes read one collection of statistics
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]

    (parent,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    exp = mlflow_client.get_experiment_by_name("quantmill")
    children = mlflow_client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["gptq-w3g64-shared", "gptq-w4g64-shared"]
    assert all(c.info.status == "FINISHED" for c in children)
    by_name = {c.info.run_name: c.data.metrics for c in children}
    # 3-bit is smaller than 4-bit and each layer's output error is larger (the cut
    # model's perplexity means nothing; the whole model's ordering: tests/integration)
    w3, w4 = by_name["gptq-w3g64-shared"], by_name["gptq-w4g64-shared"]
    assert w3["size_bytes"] < w4["size_bytes"]
    ids = {c.info.run_name: c.info.run_id for c in children}
    loss = {
        name: [
            m.value
            for m in sorted(
                mlflow_client.get_metric_history(run_id, "layer_loss"), key=lambda m: m.step
            )
        ]
        for name, run_id in ids.items()
    }
    w3_loss, w4_loss = loss["gptq-w3g64-shared"], loss["gptq-w4g64-shared"]
    assert len(w3_loss) == len(w4_loss) == SHORT_BLOCKS * 7
    assert all(a > b for a, b in zip(w3_loss, w4_loss, strict=True))
    assert w3["bits_per_weight"] < 3.6
    artifacts = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.json"} <= artifacts
    plots = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/size_vs_perplexity.png"}
    table = Artifact.get("sweep-comparison")
    assert table is not None and "gptq-w3g64-shared" in str(table.data)
    plot = Artifact.get("sweep-plot")
    assert plot is not None and "data:image/png;base64," in str(plot.data)


def test_sweep_respects_the_concurrency_limit(
    pipeline_env, short_smollm2, mlflow_client, monkeypatch
):
    from quantmill import api

    running, peak, lock = [0], [0], threading.Lock()
    real_quantize = api.quantize

    def tracked(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real_quantize(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(api, "quantize", tracked)
    job = SweepJob(
        model=str(short_smollm2),
        recipes=["rtn-w4g64", "rtn-w8-channel"],
        max_concurrency=1,
        data=small_data(),
    )
    result = sweep_flow(job)
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"] and peak[0] == 1


def test_a_failing_task_fails_the_mlflow_run_and_the_prefect_run_alike(
    pipeline_env, short_smollm2, mlflow_client
):
    job = QuantizeJob(
        model=str(short_smollm2),
        recipe="gptq-w4g64",
        data=small_data(calib_data=str(pipeline_env / "missing.txt")),
    )
    state = quantize_flow(job, return_state=True)
    assert state.is_failed()
    (run,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    assert run.info.status == "FAILED"
    error = run.data.tags["error"]
    assert "missing.txt does not exist" in error
    assert error.split(": ", 1)[1] in state.message
    assert "error.txt" in {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert not Path("outputs").exists() or not any(Path("outputs").rglob("*.safetensors"))


def test_no_run_is_left_running_when_quantization_raises(
    pipeline_env, short_smollm2, mlflow_client, monkeypatch
):
    from quantmill import api

    def boom(*args, **kwargs):
        raise RuntimeError("quantizer exploded at block 3")

    monkeypatch.setattr(api, "quantize", boom)
    job = SweepJob(model=str(short_smollm2), recipes=["rtn-w4g64"], data=small_data())
    state = sweep_flow(job, return_state=True)
    assert state.is_failed() and "quantizer exploded at block 3" in state.message
    exp = mlflow_client.get_experiment_by_name("quantmill")
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}


def test_flow_parameters_render_as_a_form_with_choices():
    from prefect.utilities.callables import parameter_schema

    from flows.params import shipped_recipes

    schema = parameter_schema(quantize_flow.fn).model_dump()
    definitions = schema["definitions"]
    assert set(definitions["RecipeName"]["enum"]) == set(shipped_recipes())
    job = definitions["QuantizeJob"]["properties"]
    assert job["model"]["default"] == "smollm2-135m"
    assert job["export_format"]["enum"] == ["packed", "fake", "gguf"]
    with pytest.raises(ValueError, match="recipe"):
        QuantizeJob(recipe="no-such-recipe")
    with pytest.raises(ValueError, match="max_concurrency"):
        SweepJob(max_concurrency=0)


def test_a_download_that_fails_twice_is_retried_and_the_flow_completes(
    pipeline_env, short_smollm2, mlflow_client, monkeypatch
):
    import flows.quantize
    import tasks.download as download
    from quantmill.errors import ModelSourceError

    # the task as shipped: two retries with exponential back-off, and a timeout
    assert download.download_model.retries == 2
    assert download.download_model.retry_delay_seconds == [5, 10]
    assert download.download_model.timeout_seconds == download.DOWNLOAD_TIMEOUT_S
    calls = []
    real = download.resolve_model

    def flaky(model, revision=None):
        calls.append(model)
        if len(calls) <= 2:
            raise ModelSourceError("the Hub did not answer (connection reset)", transient=True)
        return real(model, revision)

    monkeypatch.setattr(download, "resolve_model", flaky)
    no_wait = download.download_model.with_options(retry_delay_seconds=0)
    monkeypatch.setattr(flows.quantize, "download_model", no_wait)
    job = QuantizeJob(model=str(short_smollm2), recipe="rtn-w4g64", data=small_data())
    state = quantize_flow(job, return_state=True)
    assert state.is_completed(), state.message
    assert len(calls) == 3
    (run,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    assert run.info.status == "FINISHED"


def test_a_wrong_model_id_is_not_retried(pipeline_env, monkeypatch):
    import tasks.download as download
    from quantmill.errors import ModelSourceError

    calls = []

    def missing(model, revision=None):
        calls.append(model)
        raise ModelSourceError(f"model {model!r} not found")

    monkeypatch.setattr(download, "resolve_model", missing)
    state = download.download_model.with_options(retry_delay_seconds=0)(
        "nobody/nothing", return_state=True
    )
    assert state.is_failed() and len(calls) == 1


def test_quantize_flow_runs_llm_int8_and_logs_its_outlier_columns(
    pipeline_env, short_smollm2, mlflow_client
):
    # what the flow logs is the point; LLM.int8() on all 30 blocks is tests/integration's
    job = QuantizeJob(
        model=str(short_smollm2), recipe="llm-int8", out_dir="out8", data=small_data()
    )
    state = quantize_flow(job, return_state=True)
    assert state.is_completed(), state.message
    (run,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    metrics = run.data.metrics
    assert metrics["perplexity"] < 1.03 * metrics["perplexity_original"]
    assert 0 < metrics["eval_outlier_column_fraction"] < 0.5  # measured while evaluating
    history = mlflow_client.get_metric_history(run.info.run_id, "outlier_column_fraction")
    assert sorted(m.step for m in history) == list(range(SHORT_BLOCKS * 7))  # one per layer
    plots = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/layer_loss.png", "plots/outlier_columns.png"}
    assert (Path("out8") / "quantmill_runtime.json").is_file()


def test_quantize_flow_rotates_then_runs_autoround_and_logs_its_blocks(
    pipeline_env, short_smollm2, mlflow_client, tmp_path
):
    """The two newer steps through the flow as a user's recipe file gives them: the
    rotation before the blocks, AutoRound's block errors as stepped metrics and a plot."""
    recipe = tmp_path / "rotate-autoround.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "rotate-autoround",
        "steps": [
            {"method": "rotate"},
            {"method": "autoround", "weights": {"bits": 4, "group_size": 64}, "iters": 8,
             "batch_size": 2},
        ],
    }))  # fmt: skip
    job = QuantizeJob(model=str(short_smollm2), recipe_file=str(recipe), out_dir="outar",
                      data=small_data())  # fmt: skip
    state = quantize_flow(job, return_state=True)
    assert state.is_completed(), state.message
    (run,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    history = mlflow_client.get_metric_history(run.info.run_id, "autoround_loss")
    before = mlflow_client.get_metric_history(run.info.run_id, "autoround_loss_rtn")
    assert sorted(m.step for m in history) == list(range(SHORT_BLOCKS))  # one per block
    after = {m.step: m.value for m in history}
    assert all(after[m.step] <= m.value for m in before)  # never above RTN's error
    plots = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/distillation.png" in plots
    saved = yaml.safe_load((Path("outar") / "quantmill_recipe.yaml").read_text())
    assert [s["method"] for s in saved["steps"]] == ["rotate", "autoround"]
    assert run.data.metrics["perplexity"] < 1.5 * run.data.metrics["perplexity_original"]


def test_quantize_flow_trains_peqa_and_logs_the_training_in_mlflow(
    pipeline_env, short_smollm2, mlflow_client
):
    recipe = {
        "name": "peqa-short",
        "steps": [
            {"method": "rtn", "weights": {"bits": 3, "group_size": 64}, "ignore": ["lm_head"]},
            {
                "method": "peqa",
                "ignore": ["lm_head"],
                "training": {"steps": 4, "lr": 1e-3, "seq_len": 64, "eval_samples": 1},
            },
        ],  # fmt: skip
    }
    Path("peqa.yaml").write_text(yaml.safe_dump(recipe))
    job = QuantizeJob(
        model=str(short_smollm2), recipe_file="peqa.yaml", out_dir="outq", data=small_data()
    )
    state = quantize_flow(job, return_state=True)
    assert state.is_completed(), state.message
    (run,) = runs_of(mlflow_client, str(state.state_details.flow_run_id))
    metrics = run.data.metrics
    assert metrics["train_steps"] == 4 and metrics["train_tokens"] == 4 * 64
    assert metrics["train_eval_loss_after"] < metrics["train_eval_loss_before"]
    losses = mlflow_client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    rates = mlflow_client.get_metric_history(run.info.run_id, "train_lr")
    assert len(rates) == 4
    plots = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/training.png" in plots
    assert {a.path for a in mlflow_client.list_artifacts(run.info.run_id)} >= {
        "quantmill_training.json"
    }
    assert not Path("outq.training").exists()
