"""llama.cpp (llama-cpp-python) on one GGUF file: perplexity over given token windows,
batch-1 greedy speed and peak memory. Run by the Python of llama.cpp's own venv
(``benchmarks/serving/setup-llamacpp.sh``); prints one JSON line.

    VENV/bin/python llamacpp_probe.py FILE.gguf --windows ids.npy --threads 2
"""

import argparse
import json
import math
import resource
import time

import numpy as np


def perplexity(llm, windows):
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)[:-1]
        logits -= logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits).sum(axis=1))
        targets = window[1:]
        total += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(total / count), count


def speed(llm, prompt_ids, tokens):
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    prefill = time.perf_counter() - start
    eos = llm.token_eos()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        logits[eos] = -np.inf
        llm.eval([int(logits.argmax())])
    return tokens / (time.perf_counter() - start), prefill


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--windows", required=True, help=".npy of int token windows [n, len]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from llama_cpp import Llama

    windows = np.load(args.windows)
    start = time.perf_counter()
    llm = Llama(
        model_path=args.gguf, n_ctx=int(windows.shape[1]), n_batch=512, logits_all=True,
        n_threads=args.threads, verbose=False,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl, count = perplexity(llm, windows)
    ppl_s = time.perf_counter() - start
    tok_s, prefill_s = speed(llm, windows[0, :16].tolist(), args.tokens)
    print(json.dumps({
        "perplexity": ppl, "tokens_scored": count, "perplexity_seconds": round(ppl_s, 1),
        "batch1_tokens_per_s": round(tok_s, 2), "load_seconds": round(load_s, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": args.threads,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
