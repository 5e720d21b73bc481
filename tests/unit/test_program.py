"""The ``quantmill`` program: one parser over the library's, the pipeline's and the
stack's commands, whose options take their defaults from the settings models."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.main import build_parser
from flows import cli as flow_cli
from flows.params import PublishSettings, QuantizeJob, SweepJob
from quantmill import defaults
from stack.services import StackSettings


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_layer_contributes_its_commands():
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"quantize", "eval", "outliers", "methods"} <= set(commands)  # the library's
    assert {"run", "sweep", "publish", "deploy"} <= set(commands)  # the pipeline's
    assert "stack" in commands


def test_options_not_given_leave_the_job_models_defaults():
    args = parse("run")
    assert flow_cli.given(args) == {}
    job = flow_cli._job(args)
    assert job.model_dump() == QuantizeJob().model_dump()
    assert job.load().name == defaults.RECIPE


def test_options_given_reach_the_job_nested():
    args = parse(
        "run", "--model", "m", "--calib-samples", "3", "--public", "--no-register",
        "--token-secret", "mine", "--recipe", "rtn-w4g64", "--threads", "1",
        "--eval-seq-len", "256",
    )  # fmt: skip
    job = flow_cli._job(args)
    assert (job.model, job.data.calib_samples, job.recipe) == ("m", 3, "rtn-w4g64")
    assert job.load().evaluation.seq_len == 256
    assert (job.publish.private, job.publish.registry, job.publish.token_secret) == (
        False, False, "mine",
    )  # fmt: skip
    assert job.engine.threads == 1 and job.load().name == "rtn-w4g64"
    tasks = parse("sweep", "--recipes", "rtn-w4g64", "--tasks", "arc_easy, piqa", "--limit", "5")
    evaluation = flow_cli._job(tasks).load()[0].evaluation
    assert (evaluation.tasks, evaluation.limit) == (["arc_easy", "piqa"], 5)


def test_help_shows_the_defaults_of_the_models():
    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert f"(default: {QuantizeJob.model_fields['model'].default})" in run_help
    assert f"(default: {PublishSettings.model_fields['token_secret'].default})" in run_help
    sweep = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert f"(default: {SweepJob.model_fields['max_concurrency'].default})" in sweep


def test_stack_options_come_from_the_stack_settings():
    from stack.cli import SETTING

    args = parse("stack", "up", "--prefect-port", "4300")
    given = {k.removeprefix(SETTING): v for k, v in vars(args).items() if k.startswith(SETTING)}
    assert given == {"prefect_port": 4300}  # the rest: StackSettings' own defaults
    assert StackSettings(**given).mlflow_port == StackSettings().mlflow_port


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "--recipe", "no-such.yaml"], "does not exist"),
        (["run", "--calib-samples", "0"], "data.calib_samples"),
        (["sweep", "--recipes", "rtn-w4g64", "rtn-w4g64"], "two recipes are named"),
        (["run", "--hub-repo", "not a repo"], "publish.hub_repo"),
        (["run", "--eval-seq-len", "4"], "data.eval_seq_len"),
        (["run", "--limit", "0"], "data.limit"),
        (["run", "--tasks", "arc_easy,winogrande"], "unknown task 'winogrande'"),
        (["stack", "up", "--crash-after-s", "20"], "--crash-after-s"),
    ],
)
def test_bad_flow_parameters_exit_2_before_any_flow(argv, fragment, capsys):
    from app.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_python_dash_m_app_is_the_program():
    done = subprocess.run(
        [sys.executable, "-m", "app", "methods"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "gptq" in done.stdout
