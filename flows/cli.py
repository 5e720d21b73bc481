"""The pipeline's commands: ``run`` (the quantize flow), ``sweep`` (the sweep flow),
``publish`` (the publish flow, on an existing checkpoint folder) and ``deploy``.

With nothing configured the flows use Prefect's temporary local API and an
MLflow SQLite store under ``./mlruns``; with ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI`` set, the same commands run against those servers.

Each option is a field of the flow's job model (``flows.params``): its help
and default come from there, and only the options given reach the job, so the
defaults live in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from flows.reach import check_services
from quantmill.cli import add_engine_args, engine_spec

COMMANDS = ("run", "sweep", "publish", "deploy", "runs")
JOB = "job."  # the prefix of the options that are job fields: "job.data.calib_data"


def add_commands(sub: argparse._SubParsersAction) -> None:
    from flows.params import DataSettings, ModelSettings, PublishJob, QuantizeJob, SweepJob

    r = sub.add_parser("run", help="run the quantize flow (Prefect + MLflow)")
    _common(r, ModelSettings, DataSettings)
    r.add_argument(
        "--recipe",
        dest="recipe_source",
        help=f"shipped recipe name or recipe file (default: {_default(QuantizeJob, 'recipe')})",
    )
    _field(r, QuantizeJob, "out_dir", "--out")
    _field(r, QuantizeJob, "export_format", "--format", choices=["packed", "fake", "gguf"])
    _field(r, QuantizeJob, "overwrite", action="store_const", const=True)
    _publish_args(r)

    s = sub.add_parser("sweep", help="run the sweep flow: several recipes side by side")
    _common(s, ModelSettings, DataSettings)
    s.add_argument(
        "--recipes", nargs="+", required=True, help="shipped recipe names and/or recipe files"
    )
    _field(s, SweepJob, "out_root")
    _field(s, SweepJob, "max_concurrency", type=int)
    _field(s, SweepJob, "dask")
    _field(s, SweepJob, "overwrite", action="store_const", const=True)

    p = sub.add_parser("publish", help="publish a checkpoint to the Hub and the MLflow registry")
    p.add_argument("checkpoint", help=PublishJob.model_fields["checkpoint"].description)
    _field(p, PublishJob, "experiment")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _publish_args(p)

    c = sub.add_parser("runs", help="tidy the MLflow runs: 'clean' ends runs of killed processes")
    c.add_argument("action", choices=["clean"], help="clean: RUNNING runs whose process is gone "
                   "(on this host) end as FAILED, with the reason")  # fmt: skip
    c.add_argument("--experiment", help="only this experiment (default: every experiment)")

    d = sub.add_parser("deploy", help="create the deployments (quantize, sweep, evaluate)")
    from quantmill import defaults

    d.add_argument("--pool", default=defaults.POOL, help="the work pool they run on")
    d.add_argument("--image", help="the project's image, for a Docker or Kubernetes pool")
    d.add_argument(
        "--schedule",
        action="append",
        default=[],
        metavar="NAME=CRON",
        help="a deployment's cron schedule (UTC), e.g. sweep='0 2 * * *'; CRON 'none' removes it",
    )


def _default(model: Any, name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


def _field(
    p: argparse._ActionsContainer,
    model: Any,
    name: str,
    flag: str | None = None,
    prefix: str = "",
    **kwargs: Any,
) -> None:
    """``--flag`` for the job field ``prefix + name``: help and default from ``model``."""
    info = model.model_fields[name]
    default = _default(model, name)
    shown = f" (default: {default})" if default not in (None, False, [], "") else ""
    p.add_argument(
        flag or "--" + name.replace("_", "-"),
        dest=JOB + prefix + name,
        default=argparse.SUPPRESS,  # absent: the job model's default applies
        help=(info.description or name) + shown,
        **kwargs,
    )


def _publish_args(p: argparse.ArgumentParser) -> None:
    from flows.params import PublishSettings as P

    g = p.add_argument_group("publishing (the Hub token comes from HF_TOKEN or a Secret block)")
    _field(g, P, "hub_repo", prefix="publish.")
    _field(g, P, "private", "--public", prefix="publish.", action="store_const", const=False)
    _field(g, P, "token_secret", prefix="publish.")
    _field(g, P, "verify", prefix="publish.", metavar="ENGINES")
    _field(g, P, "verify", "--no-verify", prefix="publish.", action="store_const", const=[])
    _field(g, P, "registry", "--no-register", prefix="publish.", action="store_const", const=False)
    _field(g, P, "registered_model", prefix="publish.")


def _common(p: argparse.ArgumentParser, model: Any, data: Any) -> None:
    _field(p, model, "model")
    _field(p, model, "revision")
    _field(p, model, "experiment")
    _field(p, data, "calib_data", prefix="data.")
    _field(p, data, "calib_samples", prefix="data.", type=int)
    _field(p, data, "eval_data", prefix="data.")
    _field(p, data, "eval_windows", prefix="data.", type=int)
    _field(p, data, "eval_seq_len", prefix="data.", type=int)
    _field(p, data, "kv_cache", prefix="data.")
    _field(p, data, "tasks", prefix="data.")
    _field(p, data, "limit", prefix="data.", type=int)
    _field(p, data, "task_data", prefix="data.")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_args(p)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The job fields given on the command line, nested: ``{"data": {"calib_data": …}}``."""
    job: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith(JOB):
            continue
        *path, leaf = key.removeprefix(JOB).split(".")
        node = job
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return job


def run(args: argparse.Namespace) -> int:
    """Run one of ``COMMANDS``: the job is validated (its recipes parsed) before any flow."""
    if args.command == "deploy":
        return _deploy_command(args)
    if args.command == "runs":
        return _clean_runs(args)
    try:
        job = _job(args)
    except ValueError as exc:  # pydantic's ValidationError and ConfigError are ValueErrors
        print(f"error: {_message(exc)}", file=sys.stderr)
        return 2
    _check_outputs(job)  # before any download: an --out that cannot be written fails now
    check_services(os.environ)  # a dead server fails here, in seconds, naming its variable
    if args.command == "publish":
        from flows.publish import publish_flow

        result = publish_flow(job)
        print(json.dumps(result, indent=2, default=str) if args.json else _published(result))
        return 0
    if args.command == "run":
        from flows.quantize import quantize_flow

        result = quantize_flow(job)
    else:
        from flows.sweep import sweep_flow

        result = sweep_flow(job)
    print(json.dumps(result, indent=2, default=str) if args.json else _summary(result))
    return 0


def _clean_runs(args: argparse.Namespace) -> int:
    from tracking.adapter import end_dead_runs_everywhere, tracking_uri

    check_services(os.environ)
    ended = end_dead_runs_everywhere(args.experiment)
    for experiment, run_id in ended:
        print(f"{experiment}: run {run_id} ended as FAILED (its process is gone)")
    print(f"{len(ended)} run(s) of killed processes ended in {tracking_uri()}")
    return 0


def _check_outputs(job: Any) -> None:
    """What the flow reads and writes, checked before it starts (a bad folder is one
    line, not a failed flow run's traceback)."""
    from quantmill.card import CheckpointInfo
    from quantmill.journal import check_outputs

    if hasattr(job, "checkpoint"):
        CheckpointInfo.load(job.checkpoint)
    if hasattr(job, "outputs"):
        check_outputs(job.outputs(), job.overwrite)


def _job(args: argparse.Namespace) -> Any:
    """The job of the command line: its user's paths are free (``flows.places``)."""
    from flows.params import PublishJob, QuantizeJob, SweepJob
    from flows.places import FREE
    from quantmill.recipe import shipped_recipes

    fields = given(args)
    if args.command == "publish":
        return PublishJob.model_validate({"checkpoint": args.checkpoint, **fields}, context=FREE)
    fields["engine"] = engine_spec(args).model_dump(exclude_defaults=True)
    shipped = set(shipped_recipes())
    if args.command == "run":
        source = args.recipe_source
        if source is not None:
            fields["recipe" if source in shipped else "recipe_file"] = source
        return QuantizeJob.model_validate(fields, context=FREE)
    fields["recipes"] = [r for r in args.recipes if r in shipped]
    fields["recipe_files"] = [r for r in args.recipes if r not in shipped]
    return SweepJob.model_validate(fields, context=FREE)


def _message(exc: ValueError) -> str:
    from pydantic import ValidationError

    from quantmill.recipe import format_validation_error

    if isinstance(exc, ValidationError):
        return format_validation_error(exc, "flow parameters")
    return str(exc)


def _deploy_command(args: argparse.Namespace) -> int:
    from flows.deploy import DEPLOYMENTS, deploy_all, parse_schedules

    try:
        schedules = parse_schedules(args.schedule)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids = deploy_all(args.pool, schedules, image=args.image)
    for name, deployment_id in ids.items():
        cron = schedules.get(name, DEPLOYMENTS[name].cron)
        print(f"{name}: deployment {deployment_id} on pool {args.pool}, schedule {cron or 'none'}")
    return 0


def _published(result: dict[str, Any]) -> str:
    lines = []
    if "hub" in result:
        hub = result["hub"]
        state = "new revision" if hub["new_revision"] else "unchanged"
        lines.append(f"Hub: {hub['url']} @ {hub['commit']} ({state})")
    if "registry" in result:
        reg = result["registry"]
        alias = f"alias {reg['alias']}" if reg["alias"] else "no alias"
        lines.append(f"Registry: {reg['uri']} ({alias}; gate {reg['gate']['reason']})")
    if "mlflow" in result:
        lines.append(f"MLflow: {result['mlflow']}")
    return "\n".join(lines)


def _accuracy(result: dict[str, Any]) -> str:
    """The zero-shot line of a run's summary: each task's acc, the mean and its recovery."""
    if result.get("accuracy_mean") is None:
        return ""
    names = sorted(
        {k.split(".")[1] for k in result if k.startswith("tasks.") and k.endswith(".acc")}
    )
    nan = float("nan")
    tasks = ", ".join(
        f"{n} {result[f'tasks.{n}.acc']:.3f} ({result.get(f'tasks_original.{n}.acc', nan):.3f})"
        for n in names
    )
    recovery = result.get("accuracy_recovery", float("nan"))
    return (
        f"\nzero-shot acc: mean {result['accuracy_mean']:.4f} "
        f"(original {result.get('accuracy_mean_original', float('nan')):.4f}, "
        f"recovery {recovery:.3f}); {tasks}"
    )


def _summary(result: dict[str, Any]) -> str:
    if "table" in result:
        body = result["table"]
    else:
        body = (
            f"checkpoint: {result['out_dir']}\n"
            f"perplexity: {result.get('perplexity', float('nan')):.2f} "
            f"(original {result.get('perplexity_original', float('nan')):.2f})\n"
            f"bits/weight: {result.get('bits_per_weight', float('nan')):.3f}, "
            f"size: {result.get('size_bytes', 0) / 2**20:.1f} MB, "
            f"quantize: {result.get('quant_seconds', float('nan')):.1f} s"
        )
        body += _accuracy(result)
    if result.get("published"):
        body += "\n" + _published(result["published"])
    return f"{body}\nMLflow: {result['mlflow']}"
