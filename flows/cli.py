"""``quantmill run`` (the quantize flow), ``quantmill sweep`` (the sweep flow) and
``quantmill publish`` (the publish flow, on an existing checkpoint folder).

With nothing configured the flows use Prefect's temporary local API and an
MLflow SQLite store under ``./mlruns``; with ``PREFECT_API_URL`` and
``MLFLOW_TRACKING_URI`` set, the same commands run against those servers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from quantmill.cli import add_engine_args, engine_spec

FLOW_COMMANDS = ("run", "sweep", "publish", "deploy")


def add_flow_commands(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run the quantize flow (Prefect + MLflow)")
    _common(r)
    r.add_argument("--recipe", default="gptq-w4g64", help="shipped recipe name or recipe file")
    r.add_argument("--out", help="output folder (default: outputs/<model>-<recipe>)")
    r.add_argument("--format", choices=["packed", "fake"], default="packed")
    _publish_args(r)

    s = sub.add_parser("sweep", help="run the sweep flow: several recipes side by side")
    _common(s)
    s.add_argument(
        "--recipes", nargs="+", required=True, help="shipped recipe names and/or recipe files"
    )
    s.add_argument("--out-root", default="outputs/sweep", help="one folder per recipe here")
    s.add_argument("--max-concurrency", type=int, default=2, help="recipes run at once")
    s.add_argument(
        "--dask", help="run recipes on Dask: 'local' (a cluster of processes) or tcp://host:8786"
    )

    p = sub.add_parser("publish", help="publish a checkpoint to the Hub and the MLflow registry")
    p.add_argument("checkpoint", help="a checkpoint folder written by quantmill")
    p.add_argument("--experiment", default="quantmill", help="MLflow experiment")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _publish_args(p)

    d = sub.add_parser("deploy", help="create the deployments (quantize, sweep, evaluate)")
    d.add_argument("--pool", default="quantmill", help="the work pool they run on")
    d.add_argument("--image", help="the project's image, for a Docker or Kubernetes pool")
    d.add_argument(
        "--schedule",
        action="append",
        default=[],
        metavar="NAME=CRON",
        help="a deployment's cron schedule (UTC), e.g. sweep='0 2 * * *'; CRON 'none' removes it",
    )


def _publish_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("publishing (the Hub token comes from HF_TOKEN or a Secret block)")
    g.add_argument("--hub-repo", help="publish to this Hub repo 'owner/name'")
    g.add_argument("--public", action="store_true", help="create the Hub repo as public")
    g.add_argument("--token-secret", default="hf-token", help="Prefect Secret block name")
    g.add_argument("--no-verify", action="store_true", help="skip the download-and-compare")
    g.add_argument("--no-register", action="store_true", help="skip the MLflow registry")
    g.add_argument("--registered-model", help="registry name (default: the base model's)")


def _publish_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "hub_repo": args.hub_repo,
        "private": not args.public,
        "token_secret": args.token_secret,
        "verify": not args.no_verify,
        "registry": not args.no_register,
        "registered_model": args.registered_model,
    }


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset, folder, .gguf or Hub id")
    p.add_argument("--revision", help="Hub revision to pin")
    p.add_argument("--calib-data", help="calibration text file (overrides the recipe)")
    p.add_argument("--calib-samples", type=int, help="number of calibration samples")
    p.add_argument("--eval-data", help="evaluation text file (overrides the recipe)")
    p.add_argument("--eval-windows", type=int, help="cap on evaluation windows (0: all)")
    p.add_argument("--kv-cache", help="quantize keys/values while evaluating: 8, 4, 4:head")
    p.add_argument("--experiment", default="quantmill", help="MLflow experiment")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_args(p)


def run_flow_command(args: argparse.Namespace) -> int:
    if args.command == "publish":
        return _publish_command(args)
    if args.command == "deploy":
        return _deploy_command(args)
    from flows.params import RECIPES_DIR, QuantizeJob, SweepJob

    def shipped(name: str) -> bool:
        return (RECIPES_DIR / f"{name}.yaml").is_file()

    data = {
        "calib_data": args.calib_data,
        "calib_samples": args.calib_samples,
        "eval_data": args.eval_data,
        "eval_windows": args.eval_windows,
        "kv_cache": args.kv_cache,
    }
    common = {
        "model": args.model,
        "revision": args.revision,
        "data": data,
        "experiment": args.experiment,
        "overwrite": args.overwrite,
    }
    try:
        common["engine"] = engine_spec(args).model_dump()
        if args.command == "run":
            recipe = (
                {"recipe": args.recipe} if shipped(args.recipe) else {"recipe_file": args.recipe}
            )
            job: Any = QuantizeJob(
                **common,
                **recipe,
                out_dir=args.out,
                export_format=args.format,
                publish=_publish_settings(args),
            )
        else:
            names = [r for r in args.recipes if shipped(r)]
            files = [r for r in args.recipes if r not in names]
            job = SweepJob(
                **common,
                recipes=names,
                recipe_files=files,
                out_root=args.out_root,
                max_concurrency=args.max_concurrency,
                dask=args.dask,
            )
        job.load()  # every recipe is validated before a flow starts
    except ValidationError as exc:
        from quantmill.recipe import format_validation_error

        print(f"error: {format_validation_error(exc, 'flow parameters')}", file=sys.stderr)
        return 2
    except ValueError as exc:  # ConfigError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        from flows.quantize import quantize_flow

        result = quantize_flow(job)
    else:
        from flows.sweep import sweep_flow

        result = sweep_flow(job)
    print(json.dumps(result, indent=2, default=str) if args.json else _summary(result))
    return 0


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


def _publish_command(args: argparse.Namespace) -> int:
    from flows.params import PublishJob

    try:
        job = PublishJob(
            checkpoint=args.checkpoint,
            experiment=args.experiment,
            publish=_publish_settings(args),
        )
    except ValidationError as exc:
        from quantmill.recipe import format_validation_error

        print(f"error: {format_validation_error(exc, 'publish settings')}", file=sys.stderr)
        return 2
    from flows.publish import publish_flow

    result = publish_flow(job)
    print(json.dumps(result, indent=2, default=str) if args.json else _published(result))
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
    if result.get("published"):
        body += "\n" + _published(result["published"])
    return f"{body}\nMLflow: {result['mlflow']}"
