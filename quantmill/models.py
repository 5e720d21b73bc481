"""Load a resolved model and its tokenizer, refusing checkpoints that cannot be trusted."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from quantmill.errors import CheckpointError
from quantmill.lazy import LOAD_LOCK, loading_error
from quantmill.sources import ResolvedModel

log = logging.getLogger(__name__)


def load_model(
    resolved: ResolvedModel,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> tuple[nn.Module, object]:
    """The whole model (eval mode, float32 on the CPU by default) and its tokenizer, the way
    ``transformers`` users load it (quantized checkpoints decompressed).

    Remote code is never run unless ``trust_remote_code`` is passed explicitly.
    """
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}  # straight onto the device
    try:
        with LOAD_LOCK:
            model = _from_pretrained(resolved, dtype, kwargs)
            tokenizer = load_tokenizer(resolved, trust_remote_code)
    except ValueError as exc:
        raise loading_error(resolved.source, exc, "it could not be loaded") from exc
    except Exception as exc:  # safetensors, OSError, JSON errors: all mean a bad checkpoint
        raise CheckpointError(
            f"model {resolved.source!r} at {resolved.path} could not be loaded "
            f"({type(exc).__name__}: {exc}); the files may be corrupted or incomplete — "
            "re-download or re-convert them"
        ) from exc
    if resolved.gguf_file:
        # transformers dequantizes GGUF on load; the marker would mislead later saves.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
    _decompress(model)
    check_finite(model, resolved.source)
    model.eval()
    return model, tokenizer


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    try:
        return AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        if "trust_remote_code" in str(exc):
            raise loading_error(resolved.source, exc, "its tokenizer cannot be loaded") from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"model {resolved.source!r} has no usable tokenizer in {resolved.path} ({first}); "
            "a checkpoint folder needs its tokenizer files (tokenizer.json, "
            "tokenizer_config.json): copy them from the original model"
        ) from None


def _from_pretrained(resolved: ResolvedModel, dtype: torch.dtype, kwargs: dict) -> nn.Module:
    """``from_pretrained``, retrying a compressed-tensors checkpoint on the dequantizing path.

    transformers' compressed path cannot load asymmetric ``group``/``channel``
    checkpoints (their int32-packed zero points, as llmcompressor writes them:
    the empty model expects them unpacked); its dequantizing path unpacks them.
    The compressed path is tried first because it reproduces the quantized
    weights exactly (the dequantizing path multiplies in the scales' float16).
    """
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, **kwargs)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc) or not _is_compressed_tensors(resolved):
            raise
    from transformers.utils.quantization_config import CompressedTensorsConfig

    log.info("%s: loading through transformers' dequantizing path", resolved.source)
    dequantize = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=dtype, quantization_config=dequantize, **kwargs
    )


def _is_compressed_tensors(resolved: ResolvedModel) -> bool:
    config = resolved.path / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def _decompress(model: nn.Module) -> None:
    """Unpack a compressed-tensors checkpoint now rather than on the first full forward.

    transformers leaves packed weights in place and decompresses them in a
    forward pre-hook on the top-level model; code that calls a submodule first
    (the decoder alone, one block) would otherwise meet layers with no weight.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(model, "ct_decompress_hook", None) is not None and quantizer is not None:
        quantizer.compressor.decompress_model(model)


def check_finite(model: nn.Module, source: str) -> None:
    """Raise ``CheckpointError`` naming the first parameter holding NaN or inf."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise CheckpointError(
                f"model {source!r}: parameter {name} holds NaN or inf values; "
                "the checkpoint is corrupted and cannot be quantized"
            )
