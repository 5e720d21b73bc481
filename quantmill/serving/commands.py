"""The serving commands of the ``quantmill`` program: ``export`` (GGUF for llama.cpp)
and ``verify`` (load a checkpoint in vLLM and compare with transformers)."""

from __future__ import annotations

import argparse
import json

from quantmill import defaults

COMMANDS = ("export", "verify")


def add_commands(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp")
    x.add_argument("checkpoint", help="a quantmill checkpoint folder (or a transformers folder)")
    x.add_argument("--format", choices=["gguf"], default="gguf", help="the file format (gguf)")
    x.add_argument("--out", required=True, help="the file to write (FILE.gguf)")
    x.add_argument(
        "--requantize",
        choices=["q4_0", "q4_1", "q8_0"],
        help="for grids GGUF cannot hold exactly: dequantize and re-quantize by llama.cpp's "
        "rules (the GPTQ/AWQ rounding is lost)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    x.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name (default: detected)")
    x.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("verify", help="load checkpoints in vLLM, compare tokens with transformers")
    v.add_argument("checkpoints", nargs="+", help="checkpoint folders")
    v.add_argument("--engine", choices=["vllm"], default="vllm", help="the serving engine")
    v.add_argument("--prompt", default=defaults.VERIFY_PROMPT, help="what to generate from")
    v.add_argument("--tokens", type=int, default=defaults.VERIFY_TOKENS, help="greedy tokens")
    v.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    return _export(args) if args.command == "export" else _verify(args)


def _export(args: argparse.Namespace) -> int:
    from quantmill.serving.gguf_export import export_gguf

    report = export_gguf(
        args.checkpoint, args.out, requantize=args.requantize, overwrite=args.overwrite,
        tokenizer_pre=args.tokenizer_pre,
    ).to_dict()  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    types = ", ".join(f"{n} {kind}" for kind, n in sorted(report["tensor_types"].items()))
    print(f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB): {types}")
    print(f"exact from the checkpoint's integers: {report['exact_layers']} layers; "
          f"re-quantized: {report['requantized_layers']}")  # fmt: skip
    if report["q4_1_groups"]:
        rounded, groups = report["q4_1_rounded_minimums"], report["q4_1_groups"]
        print(f"Q4_1 minimums rounded to float16: {rounded} of {groups} groups")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from quantmill.serving.verify import verify_vllm

    results = verify_vllm(args.checkpoints, args.prompt, args.tokens)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in [] if args.json else results:
        if result["ok"]:
            print(f"{result['folder']}: vLLM loaded it ({', '.join(result['kernels']) or 'dense'});"
                  f" {result['agree']}/{args.tokens} greedy tokens agree with transformers:"
                  f" {result['text']!r}")  # fmt: skip
        else:
            print(f"{result['folder']}: refused: {result['reason']}")
    return 0 if all(r["ok"] for r in results) else 1
