"""Flow parameters keep to their places (flows/places.py): a job validated from plain
data, as a deployment run's parameters are, writes under the output root and reads
under the data roots or the output root; the command line's own jobs keep free paths."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from app.main import build_parser
from flows import cli as flow_cli
from flows import places
from flows.params import AnalyzeJob, EvaluateJob, PublishJob, QuantizeJob, SweepJob
from quantmill import defaults

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """An output root, two data roots, a working folder inside none of them, a file
    outside every root, and a recipe file in a data root."""
    tmp_path = tmp_path.resolve()
    out, data, more, work = (tmp_path / n for n in ("out", "data", "more", "work"))
    for folder in (out, data, more, work):
        folder.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the form\n")
    recipe = data / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"method": "rtn", "weights": {"bits": 4}}]}))
    monkeypatch.setenv("QUANTMILL_OUTPUT_ROOT", str(out))
    monkeypatch.setenv("QUANTMILL_DATA_ROOTS", os.pathsep.join([str(data), str(more)]))
    monkeypatch.chdir(work)
    return SimpleNamespace(out=out, data=data, more=more, work=work, outside=outside, recipe=recipe)


def form(kind=QuantizeJob, /, **fields):
    """A job as a deployment run gets it: validated from plain data, no context."""
    return kind.model_validate(fields)


def refused(match: str, kind=QuantizeJob, /, **fields) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        form(kind, **fields)
    return str(caught.value)


def test_a_relative_output_is_placed_under_the_root(roots):
    assert form(out_dir="run-1").out_dir == str(roots.out / "run-1")
    assert form(out_dir="a/b").out_dir == str(roots.out / "a" / "b")
    assert form(SweepJob, recipes=["rtn-w4g64"], out_root="s").folder() == roots.out / "s"


def test_an_absolute_output_inside_the_root_is_kept_outside_refused(roots):
    assert form(out_dir=str(roots.out / "x")).out_dir == str(roots.out / "x")
    message = refused("outside the output root", out_dir=str(roots.work / "x"))
    assert "out_dir" in message and str(roots.out) in message
    assert "QUANTMILL_OUTPUT_ROOT on the worker" in message
    refused("outside the output root", out_dir=str(roots.out))  # the root itself: no
    refused("outside the output root", SweepJob, out_root="/tmp")
    refused("outside the output root", AnalyzeJob, out_dir="/tmp/outliers")


def test_dot_dot_is_refused_even_when_it_would_stay_inside(roots):
    refused(r"out_dir 'a/\.\./b' contains '\.\.'", out_dir="a/../b")
    refused("contains '..'", out_dir=str(roots.out / "a" / ".." / "b"))
    refused("contains '..'", out_dir="../out/x")
    refused("out_root .* contains '..'", SweepJob, out_root="x/..")


def test_a_symlink_out_of_the_root_is_refused(roots, tmp_path):
    (roots.out / "link").symlink_to(tmp_path / "work")
    refused("outside the output root", out_dir="link/x")
    refused("outside the output root", out_dir=str(roots.out / "link"))
    (roots.data / "leak.txt").symlink_to(roots.outside)
    message = refused("outside the data roots", data={"calib_data": str(roots.data / "leak.txt")})
    assert "data.calib_data" in message


def test_a_symlink_that_stays_inside_is_stored_as_its_real_path(roots):
    (roots.out / "real").mkdir()
    (roots.out / "alias").symlink_to(roots.out / "real")
    assert form(out_dir="alias/x").out_dir == str(roots.out / "real" / "x")


def test_inputs_under_a_data_root_or_the_output_root_are_kept_as_real_paths(roots):
    text = roots.more / "calib.txt"
    text.write_text("text\n")
    (roots.out / "ckpt").mkdir()
    job = form(
        recipe_file=str(roots.recipe),
        data={"calib_data": str(text), "eval_data": "../data/mine.yaml"},
    )
    assert job.recipe_file == str(roots.recipe) and job.data.calib_data == str(text)
    assert job.data.eval_data == str(roots.recipe)  # relative: from the working folder
    assert form(EvaluateJob, model=str(roots.out / "ckpt")).model == str(roots.out / "ckpt")
    assert form(PublishJob, checkpoint="../out/ckpt").checkpoint == str(roots.out / "ckpt")


def test_inputs_outside_every_root_are_refused_naming_field_roots_and_fix(roots):
    message = refused("outside the data roots", data={"eval_data": str(roots.outside)})
    assert message.count("data.eval_data") == 1 and str(roots.outside) in message
    assert str(roots.data) in message and str(roots.more) in message and str(roots.out) in message
    assert "put it under one of them, or set QUANTMILL_DATA_ROOTS" in message
    for kind, fields, name in [
        (QuantizeJob, {"model": str(roots.work)}, "model"),
        (QuantizeJob, {"data": {"task_data": str(roots.work)}}, "data.task_data"),
        (QuantizeJob, {"data": {"tasks": "piqa, ./mine.yaml"}}, "data.tasks"),
        (SweepJob, {"recipe_files": [str(roots.recipe), str(roots.outside)]}, r"recipe_files\[1\]"),
        (AnalyzeJob, {"recipe_file": str(roots.outside)}, "recipe_file"),
        (EvaluateJob, {"model": str(roots.outside)}, "model"),
        (PublishJob, {"checkpoint": "/"}, "checkpoint"),
    ]:
        refused(f"^1 validation error.*\n.*{name} .* is outside the data roots", kind, **fields)


def test_a_recipe_file_outside_the_roots_is_never_read(roots, monkeypatch):
    roots.outside.write_text("steps: [not a recipe")  # reading it would fail otherwise
    reads = []
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    refused("recipe_file .* is outside the data roots", recipe_file=str(roots.outside))
    refused("recipe_files.0. .* is outside", SweepJob, recipe_files=[str(roots.outside)])
    assert roots.outside not in reads


def test_dataset_names_hub_ids_presets_and_shipped_recipes_stay_names(roots):
    job = form(
        model="HuggingFaceTB/SmolLM2-135M",
        recipe_file="rtn-w4g64",
        data={"calib_data": "wikitext", "eval_data": "Salesforce/wikitext", "tasks": "piqa"},
    )
    assert (job.model, job.recipe_file) == ("HuggingFaceTB/SmolLM2-135M", "rtn-w4g64")
    assert (job.data.calib_data, job.data.eval_data) == ("wikitext", "Salesforce/wikitext")
    assert job.data.tasks == "piqa"
    assert form(model="smollm2-135m").model == "smollm2-135m"
    # what is on disk is a path, whatever its name looks like
    (roots.work / "wikitext").mkdir()
    refused("data.calib_data 'wikitext' is outside", data={"calib_data": "wikitext"})
    (roots.work / "owner").mkdir()
    (roots.work / "owner" / "model").mkdir()
    refused("model 'owner/model' is outside", model="owner/model")


def test_the_path_rule(roots):
    for value in ("/x", "./x", "~/x", "../x", "a/b/c", ".hidden"):
        assert places.is_path(value), value
    for value in ("wikitext", "owner/name", "wiki.txt"):
        assert not places.is_path(value), value
    (roots.work / "wiki.txt").write_text("")
    assert places.is_path("wiki.txt")
    assert not places.is_model_path("smollm2-135m")


def test_the_defaults_land_under_the_root(roots):
    job = form()
    assert job.output_dir(job.load()) == str(roots.out / "smollm2-135m-gptq-w4g64")
    assert form(SweepJob).folder() == roots.out / "sweep"
    # the form sends the default as shown: the same folder, not root/outputs/sweep
    assert form(SweepJob, out_root=defaults.SWEEP_ROOT).folder() == roots.out / "sweep"
    assert form(AnalyzeJob).output_dir() == str(roots.out / "smollm2-135m-outliers")
    empty = form(out_dir="", recipe_file="")  # a form's blank fields: the defaults
    assert empty.output_dir(empty.load()) == str(roots.out / "smollm2-135m-gptq-w4g64")
    # a flow's default job is unchanged: a deployment's form shows no machine's path
    assert QuantizeJob().model_dump() == QuantizeJob.model_construct().model_dump()
    assert SweepJob().out_root == defaults.SWEEP_ROOT


def test_the_command_line_keeps_free_paths(roots):
    outside_out = str(roots.work / "mine")
    recipe = roots.work / "local.yaml"
    recipe.write_text(roots.recipe.read_text())
    args = build_parser().parse_args(
        ["run", "--out", outside_out, "--recipe", str(recipe), "--calib-data", "../secret.txt"]
    )
    job = flow_cli._job(args)
    assert (job.out_dir, job.recipe_file) == (outside_out, str(recipe))
    assert job.data.calib_data == "../secret.txt"  # as given: resolved where it is read
    publish = flow_cli._job(build_parser().parse_args(["publish", str(roots.work)]))
    assert publish.checkpoint == str(roots.work)
    sweep = flow_cli._job(
        build_parser().parse_args(["sweep", "--recipes", str(recipe), "--out-root", "/tmp/s"])
    )
    assert sweep.folder() == Path("/tmp/s")
    free = QuantizeJob.model_validate({"out_dir": "/elsewhere"}, context=places.FREE)
    assert free.out_dir == "/elsewhere"


def test_the_roots_come_from_the_environment(roots, monkeypatch, tmp_path):
    assert places.output_root() == roots.out
    assert places.data_roots() == [roots.data, roots.more]
    monkeypatch.delenv("QUANTMILL_OUTPUT_ROOT")
    monkeypatch.delenv("QUANTMILL_DATA_ROOTS")
    monkeypatch.delenv("QUANTMILL_DATA_DIR", raising=False)
    assert places.output_root() == roots.work / defaults.OUTPUT_ROOT
    assert places.data_roots() == [roots.work / "data"]
    monkeypatch.setenv("QUANTMILL_DATA_DIR", str(roots.more))
    assert places.data_roots() == [roots.more, roots.work / "data"]
    assert form(out_dir="x").out_dir == str(roots.work / "outputs" / "x")
    refused("outside the data roots", recipe_file=str(roots.recipe))
    monkeypatch.setenv("QUANTMILL_DATA_ROOTS", str(roots.data))
    assert form(recipe_file=str(roots.recipe)).recipe_file == str(roots.recipe)


def test_a_fanned_out_child_passes_again_where_it_runs(roots, monkeypatch):
    from flows.fanout import quantize_job

    text = roots.data / "calib.txt"
    text.write_text("text\n")
    parent = form(
        SweepJob,
        recipes=["rtn-w4g64"],
        recipe_files=["../data/mine.yaml"],
        out_root="sweep-1",
        data={"calib_data": str(text)},
    )
    for source in parent.sources():
        child = quantize_job(parent, source)
        again = QuantizeJob.model_validate(child.model_dump(mode="json"))  # on the worker
        assert again.model_dump() == child.model_dump()
        assert Path(again.out_dir).parent == roots.out / "sweep-1"
    assert again.recipe_file == str(roots.recipe)


def test_remote_code_is_no_flow_parameter():
    for fields in ({"trust_remote_code": True}, {"engine": {"trust_remote_code": True}}):
        with pytest.raises(ValueError, match="trust_remote_code\n  Extra inputs are not"):
            QuantizeJob.model_validate(fields)
        with pytest.raises(ValueError, match="Extra inputs are not permitted"):
            SweepJob.model_validate(fields)
    for model in (AnalyzeJob, EvaluateJob, PublishJob):
        with pytest.raises(ValueError, match="trust_remote_code\n  Extra inputs"):
            model.model_validate({"trust_remote_code": True})


def test_the_pipeline_never_turns_remote_code_on():
    from quantmill import api, models

    mentions = [
        str(path.relative_to(REPO))
        for folder in ("flows", "tasks", "tracking")
        for path in sorted((REPO / folder).rglob("*.py"))
        if re.search(r"trust_remote_code|remote_code", path.read_text())
    ]
    assert mentions == []  # the library's calls keep their default, which is off:
    for function in (api.quantize, api.check_recipe_source, models.load_model):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False
