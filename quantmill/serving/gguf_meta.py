"""What llama.cpp needs besides the tensors: architecture keys, tensor names and
the tokenizer, as data per architecture.

Tensor names follow llama.cpp's ``convert_hf_to_gguf.py`` for ``llama``; its
query and key rows are permuted from the Hugging Face (rotate-half) order to
llama.cpp's interleaved rotary order. Only rows move, so the 32-wide groups
of a row stay whole and exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.errors import ExportError

log = logging.getLogger(__name__)

LLAMA_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# The tokenizer.json pre-tokenizers llama.cpp knows by name (sha256 of the JSON, keys sorted).
PRE_TOKENIZERS = {
    "baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "smollm",  # SmolLM2
}


@dataclass(frozen=True)
class GgufArch:
    name: str  # general.architecture
    tensors: dict[str, str]
    permuted: tuple[str, ...] = ("attn_q", "attn_k")

    def tensor_name(self, hf_name: str) -> str | None:
        """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``."""
        module, _, leaf = hf_name.rpartition(".")
        match = BLOCK.match(module)
        if match:
            mapped = self.tensors.get(match.group(2))
            return None if mapped is None else f"blk.{match.group(1)}.{mapped}.{leaf}"
        mapped = self.tensors.get(module)
        return None if mapped is None else f"{mapped}.{leaf}"

    def add_metadata(self, writer, config: dict[str, Any], name: str) -> None:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // heads
        writer.add_name(name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
        writer.add_rope_freq_base(rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config["vocab_size"])

    def permute(self, gguf_name: str, rows: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """Rows of a query/key tensor (weights, integers, scales) in llama.cpp's order."""
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
        if kind not in self.permuted or rows.ndim == 1:
            return rows
        heads = config["num_attention_heads"]
        if kind == "attn_k":
            heads = config.get("num_key_value_heads") or heads
        shape = rows.shape
        return (
            rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        )


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps them in ``rope_parameters``; older configs at the top level
    and in ``rope_scaling``."""
    found = dict(config.get("rope_scaling") or {})
    found.update(config.get("rope_parameters") or {})
    if "rope_theta" not in found and "rope_theta" in config:
        found["rope_theta"] = config["rope_theta"]
    return found


def rope_theta(config: dict[str, Any]) -> float:
    return float(rope_parameters(config).get("rope_theta", 10000.0))


def rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """``rope_freqs.weight`` for Llama 3's frequency scaling (as llama.cpp's converter
    computes it); None for plain RoPE; an error for scalings llama.cpp takes otherwise."""
    rope = rope_parameters(config)
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "default":
        return None
    if kind != "llama3":
        raise ExportError(f"GGUF export knows plain and llama3 RoPE; this model uses {kind!r}")
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    scaled = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, between))
    return scaled.astype(np.float32)


ARCHS = {
    "llama": GgufArch("llama", LLAMA_TENSORS),
    "mistral": GgufArch("llama", LLAMA_TENSORS),  # llama.cpp runs Mistral as llama
}


def tokenizer_pre(tokenizer: dict[str, Any], given: str | None) -> str:
    """llama.cpp's name for the pre-tokenizer (its regex split)."""
    if given:
        return given
    pre = tokenizer.get("pre_tokenizer") or {}
    key = hashlib.sha256(json.dumps(pre, sort_keys=True).encode()).hexdigest()
    if key in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[key]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning(
        "GGUF: llama.cpp has no known name for this tokenizer's pre-tokenizer; writing "
        "'default' (pass --tokenizer-pre NAME if llama.cpp tokenizes differently)"
    )
    return "default"


def add_tokenizer(writer, folder: Path, vocab_size: int, pre: str | None) -> None:
    """A byte-level BPE tokenizer (``tokenizer.json``) as llama.cpp's ``gpt2`` model."""
    import gguf
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json: llama.cpp needs the tokenizer")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers; {path} is {model.get('type')!r}"
        )
    hf = AutoTokenizer.from_pretrained(folder)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            special = added.get("special")
            types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(data, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token in (
        (writer.add_bos_token_id, hf.bos_token_id),
        (writer.add_eos_token_id, hf.eos_token_id),
        (writer.add_unk_token_id, hf.unk_token_id),
        (writer.add_pad_token_id, hf.pad_token_id),
    ):
        if token is not None:
            setter(int(token))
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (
        folder / "tokenizer_config.json"
    ).is_file() else {}  # fmt: skip
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if getattr(hf, "chat_template", None):
        writer.add_chat_template(hf.chat_template)
