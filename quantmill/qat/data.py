"""Data-free training text for LLM-QAT: sequences the original model writes itself.

Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for Large Language
Models" (2023), section 2.1: the first token is drawn uniformly from the
vocabulary, the next few are the model's top-1 choices, the rest are sampled
from its distribution. The sequences are saved as a ``datasets`` dataset under
the cache, keyed by model and settings, so a second run (or a resumed one)
trains on the same text without generating it again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

GREEDY_TOKENS = 3  # after the random first token, before sampling starts


@torch.no_grad()
def generate_sequences(
    model: nn.Module, num: int, length: int, seed: int, batch_size: int = 16, progress: bool = True
) -> Tensor:
    """``[num, length]`` token ids written by ``model`` from random first tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    out = []
    bar = tqdm(total=num * length, desc="generating training text", disable=not progress)
    with bar:
        for start in range(0, num, batch_size):
            rows = min(batch_size, num - start)
            ids = torch.randint(vocab, (rows, 1), generator=generator).to(device)
            cache = None
            step_input = ids
            for position in range(1, length):
                result = model(input_ids=step_input, cache=cache, use_cache=True)
                cache = result.cache
                logits = result.logits[:, -1, :].float()
                if position <= GREEDY_TOKENS:
                    step_input = logits.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(logits, dim=-1)
                    # drawn on the CPU: the same text whatever device the model is on
                    pick = torch.multinomial(probs.cpu(), 1, generator=generator)
                    step_input = pick.to(device)
                ids = torch.cat([ids, step_input], dim=1)
                bar.update(rows)
            bar.update(rows)
            out.append(ids.cpu())
    return torch.cat(out)


def generated_dataset(
    model: nn.Module,
    num: int,
    length: int,
    seed: int,
    cache: bool,
    model_key: str,
    progress: bool = True,
) -> Tensor:
    """The generated sequences, from the cache (``quantmill.cache``) when this model made
    them before; ``cache = False`` generates them afresh."""
    from safetensors.torch import load_file, save_file

    from quantmill.cache import cache_key, cached_file

    if not cache:
        return generate_sequences(model, num, length, seed, progress=progress)
    key = cache_key(model=model_key, num=num, length=length, seed=seed, greedy=GREEDY_TOKENS)

    def produce(tmp: Path) -> None:
        ids = generate_sequences(model, num, length, seed, progress=progress)
        save_file({"ids": ids.contiguous()}, str(tmp))

    path, hit = cached_file("generated", key, "ids.safetensors", produce)
    if hit:
        log.info("reusing generated training text %s", path)
    return load_file(str(path))["ids"]  # host: training moves batches to the device
