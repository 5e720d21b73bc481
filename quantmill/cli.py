"""The library's commands: ``quantize``, ``eval``, ``outliers``, ``methods``, and the
serving ones, ``export`` and ``verify`` (``quantmill.serving.commands``).

The ``quantmill`` program (``app.main``) composes these with the pipeline's
and the stack's commands; ``python -m quantmill.cli`` runs these alone.
"""

from __future__ import annotations

import argparse
import json

from quantmill.config import CalibrationSpec
from quantmill.serving import commands as serving

COMMANDS = ("quantize", "eval", "outliers", "methods", *serving.COMMANDS)


def add_commands(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a model with a recipe and evaluate it")
    _model_args(q)
    q.add_argument("--recipe", required=True, help="shipped recipe name or recipe file (YAML/JSON)")
    q.add_argument("--out", required=True, help="output folder for the packed checkpoint")
    q.add_argument("--calib-data", help="calibration text file (overrides the recipe)")
    q.add_argument("--calib-samples", type=int, help="number of calibration samples")
    q.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument(
        "--format",
        choices=["packed", "fake", "gguf"],
        default="packed",
        help="packed: compressed-tensors integers (default); fake: float weights; gguf: "
        "packed, and a GGUF file for llama.cpp beside it (OUT.gguf)",
    )
    add_engine_args(q)
    _eval_args(q)

    e = sub.add_parser("eval", help="perplexity, size and bits per weight of any checkpoint")
    _model_args(e)
    e.add_argument("--recipe", help="take the evaluation settings from this recipe")
    e.add_argument(
        "--original",
        action="store_true",
        help="the model is unquantized: evaluate it block by block from its files (cached)",
    )
    _device_args(e)
    _eval_args(e)

    o = sub.add_parser("outliers", help="per-layer activation and weight outlier report")
    o.add_argument("model", help="preset (smollm2-135m), local folder, .gguf file or Hub repo id")
    o.add_argument("--out", required=True, help="folder for outliers.json, .csv and .png")
    o.add_argument("--calib-data", help="calibration text file (default: WikiText-2 train)")
    calib = CalibrationSpec.model_fields
    o.add_argument(
        "--calib-samples",
        type=int,
        help=f"calibration samples (default: {calib['num_samples'].default})",
    )
    o.add_argument(
        "--seq-len", type=int, help=f"tokens per sample (default: {calib['seq_len'].default})"
    )
    o.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _device_args(o)

    sub.add_parser("methods", help="list the registered quantization methods")
    serving.add_commands(sub)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="preset (smollm2-135m), local folder, .gguf file or Hub repo id",
    )
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) to pin")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code to run (off by default)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="compute dtype (auto: the checkpoint's on a GPU, float32 on a CPU)",
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Device, dtype, offloading, shard size and resuming of a quantization run."""
    _device_args(p)
    p.add_argument(
        "--offload",
        choices=["auto", "none", "cpu"],
        help="where calibration activations wait between blocks (auto: on the device if they fit)",
    )
    p.add_argument("--max-shard-size", help="largest safetensors shard of the output (default 5GB)")
    p.add_argument("--threads", type=int, help="CPU threads of torch's operators (default: all)")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even when an interrupted run into the same output could resume",
    )


def engine_spec(args: argparse.Namespace):
    """The engine settings given on the command line; the rest are ``EngineSpec``'s defaults."""
    from pydantic import ValidationError

    from quantmill.config import EngineSpec
    from quantmill.errors import ConfigError

    given = {
        "device": getattr(args, "device", None),
        "dtype": getattr(args, "dtype", None),
        "offload": getattr(args, "offload", None),
        "max_shard_size": getattr(args, "max_shard_size", None),
        "threads": getattr(args, "threads", None),
        "resume": False if getattr(args, "no_resume", False) else None,
    }
    try:
        return EngineSpec(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        lines = [
            f"--{str(err['loc'][0]).replace('_', '-')} = {err['input']!r}: "
            + err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        ]
        raise ConfigError("\n".join(lines)) from None


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", help="evaluation text file (overrides the recipe)")
    p.add_argument("--eval-windows", type=int, help="cap on evaluation windows (0: all)")
    p.add_argument("--eval-seq-len", type=int, help="evaluation window length in tokens")
    p.add_argument(
        "--kv-cache",
        metavar="BITS[:token|head]",
        help="quantize keys and values while evaluating (8, 4, 4:head; none: off)",
    )
    from quantmill.accuracy.tasks import DATA_ENV, SHIPPED

    p.add_argument(
        "--tasks",
        help="zero-shot tasks through lm-evaluation-harness, comma-separated: "
        f"{', '.join(SHIPPED)}, or task YAML files (none: off)",
    )
    p.add_argument(
        "--limit", type=int, help="documents per task, for quick runs (default: every one)"
    )
    p.add_argument(
        "--task-data",
        help=f"folder of the tasks' local copies (default: ${DATA_ENV}, else the Hub)",
    )


def _methods() -> int:
    """Each registered method with the first line of its module's description."""
    import importlib

    from quantmill.methods import get_method, method_names

    for name in method_names():
        module = importlib.import_module(get_method(name).impl.__module__)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {summary}")
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    """The data settings given on the command line (``None``: the recipe's)."""
    return {
        "calib_data": getattr(args, "calib_data", None),
        "calib_samples": getattr(args, "calib_samples", None),
        "eval_data": args.eval_data,
        "eval_windows": args.eval_windows,
        "eval_seq_len": args.eval_seq_len,
        "kv_cache": args.kv_cache,
        "tasks": args.tasks,
        "limit": args.limit,
        "task_data": args.task_data,
    }


def run(args: argparse.Namespace) -> int:
    """Run one of ``COMMANDS``; a ``QuantmillError`` is the caller's to report."""
    if args.command == "methods":
        return _methods()
    if args.command == "outliers":
        return _outliers(args)
    if args.command == "quantize":
        return _quantize(args)
    if args.command in serving.COMMANDS:
        return serving.run(args)
    return _evaluate(args)


def _quantize(args: argparse.Namespace) -> int:
    from quantmill import report
    from quantmill.api import quantize
    from quantmill.recipe import load_recipe

    recipe = load_recipe(args.recipe, **_overrides(args))  # parsed once, overrides included
    summary = quantize(
        args.model,
        recipe,
        args.out,
        revision=args.revision,
        evaluate=not args.no_eval,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        export_format=args.format,
        progress=not args.quiet,
        engine=engine_spec(args),
    )
    data = summary.to_dict()
    shown = {k: v for k, v in data.items() if k != "layers"}  # quantmill_layers.json has them
    print(json.dumps(shown, indent=2) if args.json else report.summary_table(data))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from quantmill import report
    from quantmill.api import evaluate_checkpoint
    from quantmill.config import EvalSpec
    from quantmill.recipe import load_recipe, spec_with_overrides

    base = load_recipe(args.recipe).evaluation if args.recipe else EvalSpec()
    evaluation = spec_with_overrides(base, **_overrides(args))
    result = evaluate_checkpoint(
        args.model, evaluation, revision=args.revision, progress=not args.quiet,
        cache=args.original, engine=engine_spec(args),
    )  # fmt: skip
    from quantmill.accuracy.models import without_harness

    print(json.dumps(without_harness(result), indent=2) if args.json else report.eval_table(result))
    return 0


def _outliers(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from quantmill.data import calibration_ids
    from quantmill.errors import ConfigError
    from quantmill.models import load_tokenizer
    from quantmill.outliers import outliers_of, save_report, worst_layers_table
    from quantmill.recipe import format_validation_error
    from quantmill.sources import resolve_model

    given = {"dataset": args.calib_data, "num_samples": args.calib_samples, "seq_len": args.seq_len}
    try:
        spec = CalibrationSpec(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:  # --calib-samples / --seq-len out of range
        raise ConfigError(format_validation_error(exc, "calibration settings")) from None
    resolved = resolve_model(args.model, args.revision)
    ids = calibration_ids(load_tokenizer(resolved), spec)
    report = outliers_of(resolved.path, ids, spec.batch_size, not args.quiet, engine_spec(args))
    paths = save_report(report, args.out)
    print(worst_layers_table(report))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The library's commands alone (the ``quantmill`` program has more: ``app.main``)."""
    import logging
    import sys

    from quantmill.errors import QuantmillError

    parser = argparse.ArgumentParser(prog="python -m quantmill.cli", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("quantmill.progress").setLevel(logging.WARNING)
    try:
        return run(args)
    except QuantmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
