"""A deployment run's parameters keep to their places (flows/places.py): the quantize
flow, called with a job as plain data (what Prefect does with a run started from the UI
or the API), fails before any work when a path points outside its root; the command
line's own job, already validated, is not checked again."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import flows.quantize
from flows.params import QuantizeJob
from flows.places import FREE
from flows.quantize import quantize_flow
from tests.pipeline.conftest import small_data


@pytest.fixture
def elsewhere():
    """A folder under no root (pytest's temporary folders are data roots here)."""
    folder = Path(tempfile.mkdtemp(prefix="quantmill-elsewhere-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def no_work(pipeline_env, monkeypatch):
    """Records any download: a refused run must not reach one."""
    downloads: list = []

    def download(*args, **kwargs):
        downloads.append(args)
        raise AssertionError("the run reached the download")

    monkeypatch.setattr(flows.quantize, "download_model", download)
    return downloads


def job(model: Path, **fields) -> dict:
    """A quantize job as a deployment run's parameters hold it."""
    return {"model": str(model), "recipe": "rtn-w4g64", "data": small_data(), **fields}


def assert_no_work(pipeline_env: Path, downloads: list, mlflow_client) -> None:
    assert downloads == []
    cache = pipeline_env / "cache"
    assert not cache.exists() or not any(cache.iterdir())
    experiment = mlflow_client.get_experiment_by_name("quantmill")
    assert experiment is None or not mlflow_client.search_runs([experiment.experiment_id])


def test_an_output_outside_the_root_fails_the_run_before_any_work(
    pipeline_env, no_work, short_smollm2, elsewhere, mlflow_client
):
    state = quantize_flow(job(short_smollm2, out_dir=str(elsewhere / "out")), return_state=True)
    assert state.is_failed()
    assert f"out_dir '{elsewhere / 'out'}' is outside the output root {pipeline_env}" in (
        state.message
    )
    assert "set QUANTMILL_OUTPUT_ROOT on the worker" in state.message
    assert not (elsewhere / "out").exists()
    assert_no_work(pipeline_env, no_work, mlflow_client)


def test_dot_dot_in_an_output_fails_the_run(pipeline_env, no_work, short_smollm2, mlflow_client):
    state = quantize_flow(job(short_smollm2, out_dir="runs/../../up"), return_state=True)
    assert state.is_failed() and "out_dir 'runs/../../up' contains '..'" in state.message
    assert not (pipeline_env.parent / "up").exists()
    assert_no_work(pipeline_env, no_work, mlflow_client)


def test_a_recipe_file_outside_the_data_roots_is_refused_unread(
    pipeline_env, no_work, short_smollm2, elsewhere, mlflow_client
):
    recipe = elsewhere / "recipe.yaml"
    recipe.write_text("steps: [not a recipe")  # read, it would fail as invalid YAML
    state = quantize_flow(job(short_smollm2, recipe_file=str(recipe)), return_state=True)
    assert state.is_failed()
    assert f"recipe_file '{recipe}' is outside the data roots" in state.message
    assert "YAML" not in state.message
    assert_no_work(pipeline_env, no_work, mlflow_client)


def test_overwrite_replaces_only_a_folder_quantmill_wrote(
    pipeline_env, no_work, short_smollm2, mlflow_client
):
    precious = pipeline_env / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_bytes(b"years of work\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in precious.iterdir()}
    folder_mtime = precious.stat().st_mtime_ns
    state = quantize_flow(job(short_smollm2, out_dir="precious", overwrite=True), return_state=True)
    assert state.is_failed()
    assert "was not written by quantmill (it has no quantmill_recipe.yaml)" in state.message
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in precious.iterdir()}
    assert after == before and precious.stat().st_mtime_ns == folder_mtime
    assert_no_work(pipeline_env, no_work, mlflow_client)


def test_the_command_lines_job_is_not_checked_again_by_prefect(
    pipeline_env, short_smollm2, elsewhere, monkeypatch
):
    checked: list = []

    def check_outputs(folders, overwrite):
        checked.extend(folders)
        raise RuntimeError("stopped after the output check")

    monkeypatch.setattr(flows.quantize, "check_outputs", check_outputs)
    free = QuantizeJob.model_validate(job(short_smollm2, out_dir=str(elsewhere)), context=FREE)
    state = quantize_flow(free, return_state=True)
    assert state.is_failed() and "stopped after the output check" in state.message
    assert checked == [str(elsewhere)]
