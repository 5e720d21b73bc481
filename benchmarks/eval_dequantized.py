"""Perplexity of a compressed-tensors checkpoint on transformers' dequantizing path.

``quantmill eval`` loads a checkpoint the way transformers loads it by default:
the compressed path, which reproduces symmetric checkpoints exactly, and the
dequantizing path only where the compressed one cannot load (asymmetric groups
with int32-packed zero points, as llmcompressor writes them). A benchmark of two
tools then evaluates one side's asymmetric checkpoints on a different path than
the other's. This script puts every checkpoint on the dequantizing path, whoever
wrote it, and scores it with the same windows and code as ``quantmill eval``::

    .venv/bin/python benchmarks/eval_dequantized.py --model out/ --data wiki.test.raw --windows 8

Prints one line of JSON: perplexity, windows, path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a compressed-tensors checkpoint folder")
    parser.add_argument("--data", required=True, help="evaluation text file")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from quantmill.config import EvalSpec
    from quantmill.data import eval_ids
    from quantmill.evaluate import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    spec = EvalSpec(dataset=args.data, seq_len=args.seq_len, max_windows=args.windows)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True),
    )
    with torch.no_grad():
        result = perplexity(model, eval_ids(tokenizer, spec), progress=False)
    print(json.dumps({"perplexity": result.perplexity, "windows": args.windows,
                      "path": "transformers dequantize=True"}))  # fmt: skip


if __name__ == "__main__":
    main()
