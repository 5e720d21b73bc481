"""Check that two checkpoint folders hold the same model: same logits on a fixed
prompt and the same greedy continuation, each loaded the way users load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PROMPT = "The capital of France is"


def load_plain(folder: Path):
    """``(model, tokenizer)`` as plain transformers loads the folder, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantmill.models import LOAD_LOCK

    with LOAD_LOCK:  # transformers' loading patches are process-wide
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def logits_and_text(folder: Path, prompt: str, max_new_tokens: int) -> tuple[torch.Tensor, str]:
    model, tokenizer = load_plain(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits[0].float()
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return logits, tokenizer.decode(out[0][inputs["input_ids"].shape[1] :])


def compare_checkpoints(
    local: str | Path,
    other: str | Path,
    prompt: str = PROMPT,
    max_new_tokens: int = 8,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """``match`` is True when the logits agree within ``atol`` and the texts are equal."""
    mine, my_text = logits_and_text(Path(local), prompt, max_new_tokens)
    theirs, their_text = logits_and_text(Path(other), prompt, max_new_tokens)
    diff = float((mine - theirs).abs().max()) if mine.shape == theirs.shape else float("inf")
    return {
        "match": diff <= atol and my_text == their_text,
        "max_abs_logit_diff": diff,
        "prompt": prompt,
        "generated": their_text,
        "local_generated": my_text,
    }
