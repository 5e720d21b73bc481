"""Load checkpoint folders in vLLM and greedy-generate from a prompt: one JSON line each.

Run by the Python of vLLM's own virtual environment, never imported: it needs
only the standard library and vLLM. ``quantmill.serving.verify`` starts it and
reads its output; a folder vLLM refuses gives ``"loaded": false`` and the
reason, and the next folder is still tried.

    VENV/bin/python vllm_probe.py --prompt "The capital of France is" --tokens 8 DIR...
"""

import argparse
import gc
import json
import os
import sys
import time


def probe(folder, prompt, tokens, dtype, max_model_len):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    try:
        llm = LLM(
            model=folder, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
            seed=0, disable_log_stats=True,
        )  # fmt: skip
    except Exception as exc:  # vLLM refuses the checkpoint: report why, go on
        return {"folder": folder, "loaded": False, "reason": _reason(exc)}
    loaded_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    result = {
        "folder": folder, "loaded": True, "reason": None, "token_ids": list(out.token_ids),
        "text": out.text, "load_seconds": round(loaded_s, 2)
    }  # fmt: skip
    del llm
    gc.collect()
    return result


def _reason(exc):
    """The error in a few lines: its type and message, without pydantic's link lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information")]
    return f"{type(exc).__name__}: {' | '.join(lines)}"[:600]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # the engine in this process: a refused folder raises here, with vLLM's own message
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for folder in args.folders:
        result = probe(folder, args.prompt, args.tokens, args.dtype, args.max_model_len)
        print("QUANTMILL_PROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
