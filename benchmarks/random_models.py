"""Write random-weight models with the exact configs of Llama-3.2-1B and Llama-3.1-8B.

Their perplexity means nothing; their sizes and shapes are real, which is what
memory and speed figures need. Each is a sharded bfloat16 safetensors folder
(5 GB shards with an index, as the Hub has them) written tensor by tensor, in
row blocks, so this script itself stays small; the tokenizer is SmolLM2's
(its ids fit the larger vocabulary). Weights are N(0, 0.02), norms 1.

    .venv/bin/python benchmarks/random_models.py --out /work/models llama-3.2-1b llama-3.1-8b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROPE_LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
CONFIGS = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        tie_word_embeddings=True, rope_scaling={**ROPE_LLAMA3, "factor": 32.0},
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        tie_word_embeddings=False, rope_scaling={**ROPE_LLAMA3, "factor": 8.0},
    ),
}  # fmt: skip
COMMON = dict(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
              bos_token_id=128000, eos_token_id=128001, hidden_act="silu")  # fmt: skip
ROWS_PER_PART = 2048


def random_rows(shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """N(0, 0.02) in bfloat16, ``ROWS_PER_PART`` rows at a time."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, shape[0], ROWS_PER_PART):
        rows = min(ROWS_PER_PART, shape[0] - start)
        part = torch.randn((rows, *shape[1:]), generator=generator) * 0.02
        yield part.to(torch.bfloat16)


def write_model(name: str, folder: Path, tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    from quantmill.export.shards import ShardWriter
    from quantmill.lazy import empty_model_from_config

    start = time.perf_counter()
    config = LlamaConfig(**COMMON, **CONFIGS[name])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    model = empty_model_from_config(config, torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, 5 * 10**9)
    for index, (tensor_name, param) in enumerate(model.named_parameters()):
        shape = tuple(param.shape)
        if len(shape) == 1:
            writer.add(tensor_name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.add_rows(tensor_name, shape, random_rows(shape, seed=index))
    files = writer.finish()
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {
        "model": name,
        "folder": str(folder),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": size,
        "shards": len(set(files.values())),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, required=True, help="one folder per model here")
    args = parser.parse_args(argv)
    from quantmill.sources import resolve_model

    tokenizer_dir = resolve_model("smollm2-135m").path
    for name in args.models:
        target = args.out / name
        if (target / "config.json").is_file():
            print(json.dumps({"model": name, "folder": str(target), "reused": True}))
            continue
        print(json.dumps(write_model(name, target, tokenizer_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
