"""Evaluate a model as if its KV cache were quantized (``evaluation.kv_cache``).

In transformers 5 an attention module fetches its attention function by name,
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``,
and passes it keys and values as ``[batch, kv_heads, tokens, head_dim]``.
Inside :func:`kv_cache_quantized` that name points to a registered wrapper that
fake-quantizes the keys and values (quantmill/quant/kv.py), then calls the
function the model was using (sdpa, eager, ...). The math lives in the
quant module; this file only rewires.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from quantmill.arch import ARCHITECTURES, arch_for, decoder_blocks
from quantmill.config import KVCacheSpec
from quantmill.errors import ConfigError, UnsupportedArchitectureError
from quantmill.quant.kv import fake_quantize_kv

log = logging.getLogger(__name__)

# Registered names start with this, so a wrapper is never wrapped twice.
NAME_PREFIX = "quantmill_kv"
# What an attention module's forward calls when it dispatches through the interface.
INTERFACE_CALL = "ALL_ATTENTION_FUNCTIONS.get_interface("


def check_kv_supported(model: nn.Module) -> None:
    """Raise :class:`ConfigError` unless keys and values of ``model`` can be quantized."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        spec = arch_for(model)
    except UnsupportedArchitectureError:
        spec = None
    if spec is None or not spec.kv_cache:
        raise ConfigError(_unsupported(model_type, "its architecture entry has kv_cache=False"))
    for attention in _attention_modules(model):
        if not _uses_interface(attention):
            cls = type(attention)
            raise ConfigError(
                _unsupported(
                    model_type,
                    f"its attention module {cls.__module__}.{cls.__qualname__} does not call "
                    "transformers' attention interface (or has no eager_attention_forward)",
                )
            )
    current = model.config._attn_implementation
    if not _wrappable(current):
        raise ConfigError(
            f"evaluation.kv_cache cannot wrap the attention implementation {current!r} of model "
            f"type {model_type!r}; load the model with attn_implementation='sdpa' or 'eager', "
            "or remove evaluation.kv_cache"
        )


def _unsupported(model_type: object, reason: str) -> str:
    supported = sorted(name for name, entry in ARCHITECTURES.items() if entry.kv_cache)
    return (
        f"evaluation.kv_cache is set but model type {model_type!r} cannot quantize its KV "
        f"cache: {reason}. Supported model types: {', '.join(supported)}. Remove "
        "evaluation.kv_cache, or add kv_cache=True to the architecture's ArchSpec in "
        "quantmill/arch.py after checking that its attention uses transformers' attention "
        "interface with keys and values as [batch, heads, tokens, head_dim]."
    )


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's attention: the parent of its first linear layer (q/k/v), per arch.py."""
    spec = arch_for(model)
    path = spec.linears[0].rpartition(".")[0]
    return [block.get_submodule(path) for block in decoder_blocks(model, spec)]


def _uses_interface(attention: nn.Module) -> bool:
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    return INTERFACE_CALL in source and _eager_function(attention) is not None


def _eager_function(attention: nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` the module passes as the interface's default."""
    return getattr(sys.modules.get(type(attention).__module__), "eager_attention_forward", None)


def _wrappable(implementation: object) -> bool:
    from transformers import AttentionInterface

    return (
        isinstance(implementation, str)
        and not implementation.startswith(("paged|", NAME_PREFIX))
        and (implementation == "eager" or implementation in AttentionInterface())
    )


def _registered_name(spec: KVCacheSpec, original: str) -> str:
    """Registers the wrapper of ``original`` for ``spec``; returns its name.

    The name keeps ``original`` in it because transformers reads substrings of it
    ("sdpa", "flash") to pick dispatch checks and input preparation.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = (
        f"{NAME_PREFIX}{spec.bits}_{spec.granularity}_"
        f"{'sym' if spec.symmetric else 'asym'}_{original}"
    )
    # The same name always gets an equivalent function, so registering again (or
    # from another thread) is harmless and the entry may outlive the context.
    AttentionInterface.register(name, _wrapper(spec, original))
    if original in ALL_MASK_ATTENTION_FUNCTIONS:
        # Without a mask function of its own, transformers builds no mask at all for
        # the name: eager attention would then see the future (no causal mask).
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _wrapper(spec: KVCacheSpec, original: str) -> Callable:
    from transformers import AttentionInterface

    interface = AttentionInterface()

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs,
    ):
        function = interface.get_interface(original, _eager_function(module))
        key = fake_quantize_kv(key, spec)
        value = fake_quantize_kv(value, spec)
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


@contextmanager
def kv_cache_quantized(model: nn.Module, spec: KVCacheSpec | None) -> Iterator[None]:
    """Within the block, ``model``'s attention sees keys and values fake-quantized by ``spec``.

    ``None`` changes nothing. The model's attention implementation is restored
    on exit, also when the block raises.
    """
    if spec is None:
        yield
        return
    check_kv_supported(model)
    original = model.config._attn_implementation
    name = _registered_name(spec, original)
    try:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise ConfigError(
                f"transformers refused the attention implementation {name!r} for "
                f"{type(model).__name__}; remove evaluation.kv_cache"
            )
        log.debug("attention %s → %s", original, name)
        yield
    finally:
        model.set_attn_implementation(original)
