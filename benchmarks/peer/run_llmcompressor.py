"""Quantize a plain Hugging Face Llama folder with the peer toolkit llmcompressor.

The other side of the quantmill benchmark: the same model, the same
calibration rows (an int64 ``[N, L]`` tensor of token ids saved with
``torch.save``) and the same weight-only scheme, run through llmcompressor's
``oneshot`` (GPTQModifier for ``gptq``, AWQModifier for ``awq``,
QuantizationModifier for ``rtn``) on CPU (float32 unless ``--dtype bfloat16``),
saved as a compressed-tensors ``pack-quantized`` checkpoint.

Run it with the peer environment's python (``benchmarks/peer/setup.sh``)::

    benchmarks/peer/.venv/bin/python benchmarks/peer/run_llmcompressor.py \\
        --model-dir /tmp/smollm2-hf --calib /tmp/calib.pt \\
        --method gptq --bits 4 --group-size 64 --symmetric --out /tmp/peer-gptq

Logs go to stderr; stdout carries exactly one line of JSON: method, bits,
group_size, symmetric, quant_seconds (``oneshot`` only), total_seconds (the
whole script, imports, loading and saving included) and out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, TextIO

_T0 = time.perf_counter()  # before the heavy imports: total_seconds counts them


def _stdout_to_stderr() -> TextIO:
    """Point fd 1 at stderr and return a stream on the real stdout.

    llmcompressor's loguru sink is stdout and it already logs while being
    imported; this keeps every log line (Python or native) on stderr and the
    real stdout for the one JSON line. A script, never imported as a library.
    """
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


_RESULT_STREAM = _stdout_to_stderr()

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Quantize a HF Llama folder with llmcompressor (peer benchmark side)."
    )
    p.add_argument("--model-dir", required=True, help="plain HF safetensors folder")
    p.add_argument("--calib", required=True, help=".pt file: int64 tensor [N, L]")
    p.add_argument("--method", choices=["gptq", "awq", "rtn"], required=True)
    p.add_argument("--bits", type=int, choices=[3, 4, 8], required=True)
    p.add_argument("--group-size", type=int, default=64, help="0 or -1: per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    # llmcompressor 0.14 keeps only "static" (alias of "weight") and none;
    # "group" is offered for parity and is refused by the peer's own validator.
    p.add_argument("--actorder", choices=["static", "group", "none"], default="static")
    # the weight observer by its llmcompressor name: min-max, or the MSE search
    p.add_argument("--observer", choices=["minmax", "mse"], default="minmax")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--dampening-frac", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def build_scheme(
    bits: int, group_size: int, symmetric: bool, observer: str = "minmax"
) -> QuantizationScheme:
    """Weight-only int scheme on every Linear: group-wise, or per output channel."""
    per_channel = group_size in (0, -1)
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else group_size,
        observer=observer,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


def build_recipe(args: argparse.Namespace) -> Any:
    """One modifier; built before the model loads so a bad config fails fast."""
    groups = {"group_0": build_scheme(args.bits, args.group_size, args.symmetric, args.observer)}
    if args.method == "rtn":
        return QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if args.method == "awq":
        from llmcompressor.modifiers.awq import AWQModifier  # its default Llama mappings

        return AWQModifier(config_groups=groups, ignore=["lm_head"])
    return GPTQModifier(
        config_groups=groups,
        ignore=["lm_head"],
        actorder=None if args.actorder == "none" else args.actorder,
        dampening_frac=args.dampening_frac,
        block_size=args.block_size,
    )


def load_calibration(path: str) -> Dataset:
    """The exact ``[N, L]`` rows as a tokenized dataset (no padding, all ones mask)."""
    ids = torch.load(path)
    if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.ndim == 2):
        raise ValueError(f"{path}: expected an int64 tensor [N, L], got {ids!r:.80}")
    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    recipe = build_recipe(args)
    calib = load_calibration(args.calib)
    num_samples, seq_len = len(calib), len(calib[0]["input_ids"])

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    t_quant = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=calib,
        recipe=recipe,
        max_seq_length=seq_len,
        num_calibration_samples=num_samples,
        shuffle_calibration_samples=False,  # every row exactly once, in order
    )
    quant_seconds = time.perf_counter() - t_quant

    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    result = {
        "method": args.method,
        "bits": args.bits,
        "group_size": -1 if args.group_size in (0, -1) else args.group_size,
        "symmetric": args.symmetric,
        "observer": args.observer,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "quant_seconds": round(quant_seconds, 3),
        "total_seconds": round(time.perf_counter() - _T0, 3),
        "out": args.out,
    }
    print(json.dumps(result), file=_RESULT_STREAM, flush=True)
    return result


if __name__ == "__main__":
    main()
