"""vLLM (CPU) on one checkpoint folder: greedy decode speed at batch sizes 1 and 16 and
peak memory. Run by the Python of vLLM's own venv (``scripts/vllm-venv.sh``), engine in
this process; prints one JSON line.

    VENV/bin/python vllm_bench.py DIR --batches 1,16 --tokens 64
"""

import argparse
import json
import os
import resource
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.folder, dtype="bfloat16", max_model_len=512, enforce_eager=True,
              seed=0, disable_log_stats=True)  # fmt: skip
    result = {"load_seconds": round(time.perf_counter() - start, 2)}
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    prompt = "The capital of France is"
    llm.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    for batch in (int(b) for b in args.batches.split(",")):
        start = time.perf_counter()
        outs = llm.generate([prompt] * batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        made = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"batch{batch}_tokens_per_s"] = round(made / seconds, 2)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("QUANTMILL_BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
