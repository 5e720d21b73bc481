"""Write a quantized model as a checkpoint folder that transformers loads.

The weights go through ``ShardWriter`` in one fixed order: the non-block
tensors that come before the decoder blocks (embeddings), the blocks one by
one, then the rest (final norm, output head). The engine writes each block as
soon as it is quantized; ``save_quantized`` writes a model held in memory the
same way, so both give the same bytes. Quantized layers are stored packed
(compressed-tensors ``pack-quantized``/``int-quantized``) or, with ``fake``,
as float32 weights on their grid; every other tensor keeps the dtype it is
given (the source checkpoint's, when known).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from quantmill.arch import arch_for, stored_name
from quantmill.devices import dtype_name
from quantmill.errors import ExportError
from quantmill.export.compressed import build_schemes, compress_layer, quantization_config
from quantmill.export.shards import ShardWriter
from quantmill.layers import LayerQuant
from quantmill.layers import in_features as in_features_of
from quantmill.quant.grid import fake_quantize
from quantmill.runtime import write_runtime

ExportFormat = Literal["packed", "fake"]
DtypeOf = Callable[[str], torch.dtype]
DEFAULT_SHARD_BYTES = 5 * 10**9


def state_names(model: nn.Module) -> list[str]:
    """What a checkpoint of ``model`` holds, in state-dict order (tied copies once)."""
    seen: set[int] = set()
    names = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return names


def split_around_blocks(model: nn.Module) -> tuple[list[str], list[str]]:
    """Non-block tensor names before the decoder blocks and after them."""
    prefix = arch_for(model).blocks + "."
    names = state_names(model)
    first = next((i for i, n in enumerate(names) if n.startswith(prefix)), len(names))
    outside = [(i, n) for i, n in enumerate(names) if not n.startswith(prefix)]
    return [n for i, n in outside if i < first], [n for i, n in outside if i > first]


def module_tensors(
    module: nn.Module,
    prefix: str,
    layers: dict[str, LayerQuant],
    fmt: ExportFormat,
    dtype_of: DtypeOf,
    conv1d: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """``(full name, tensor)`` for everything ``module`` stores, quantized layers replaced."""
    done: set[str] = set()
    for name, sub in module.named_modules():
        full = prefix + name
        if full in layers and fmt == "packed":
            yield from compress_layer(full, sub, layers[full], conv1d).items()
            done.add(f"{full}.weight")
        elif full in layers:
            quant = layers[full]
            W = sub.weight.data.t() if conv1d else sub.weight.data
            Q = fake_quantize(W.float(), quant.scale, quant.zero, quant.scheme)
            yield f"{full}.weight", Q.t().contiguous() if conv1d else Q
            done.add(f"{full}.weight")
    for name in state_names(module):
        full = prefix + name
        if full not in done:
            yield full, _cast(_tensor(module, name), dtype_of(full))


def write_weights(
    writer: ShardWriter,
    model: nn.Module,
    layers: dict[str, LayerQuant],
    fmt: ExportFormat,
    dtype_of: DtypeOf,
) -> None:
    """Every tensor of an in-memory ``model`` through ``writer``, in the fixed order."""
    before, after = split_around_blocks(model)
    for name in before:
        writer.add(name, _cast(_tensor(model, name), dtype_of(name)))
    spec = arch_for(model)
    for index, block in enumerate(model.get_submodule(spec.blocks)):
        prefix = f"{spec.blocks}.{index}."
        for name, tensor in module_tensors(block, prefix, layers, fmt, dtype_of, spec.conv1d):
            writer.add(stored_name(spec, name), tensor)
    for name in after:
        writer.add(name, _cast(_tensor(model, name), dtype_of(name)))


def write_config(
    folder: Path,
    model: nn.Module,
    layers: dict[str, LayerQuant],
    fmt: ExportFormat,
    dtype: torch.dtype,
    in_features: dict[str, int],
) -> None:
    """``config.json`` (with ``quantization_config`` when packed), the generation config
    and the runtime file."""
    config = model.config
    config.architectures = [type(model).__name__]
    saved_dtype = getattr(config, "dtype", None)
    config.dtype = dtype_name(dtype)
    if fmt == "packed" and layers:
        spec = arch_for(model)
        stored = {stored_name(spec, n): q for n, q in layers.items()}
        widths = {stored_name(spec, n): w for n, w in in_features.items()}
        config.quantization_config = quantization_config(build_schemes(stored, widths))
    try:
        config.save_pretrained(folder)
    finally:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = saved_dtype
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(folder)
    write_runtime(folder, layers)


def save_quantized(
    model: nn.Module,
    tokenizer,
    layers: dict[str, LayerQuant],
    folder: Path,
    fmt: ExportFormat = "packed",
    dtype_of: DtypeOf | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write ``model`` with its quantized ``layers`` into ``folder`` (made if missing).

    ``packed``: compressed-tensors checkpoint with ``quantization_config``.
    ``fake``: ordinary float weights that lie on the quantization grid.
    ``dtype_of`` gives each unquantized tensor's stored dtype (default: its own).
    """
    if fmt not in ("packed", "fake"):
        raise ExportError(f"unknown export format {fmt!r}; allowed: packed, fake")
    dtype_of = dtype_of or (lambda name: _tensor(model, name).dtype)
    Path(folder).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(Path(folder), max_shard_bytes)
    try:
        write_weights(writer, model, layers, fmt, dtype_of)
        writer.finish()
    finally:
        writer.abort()
    conv1d = arch_for(model).conv1d
    in_features = {n: in_features_of(model.get_submodule(n), conv1d) for n in layers}
    write_config(Path(folder), model, layers, fmt, main_dtype(model, dtype_of), in_features)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def main_dtype(model: nn.Module, dtype_of: DtypeOf) -> torch.dtype:
    """The dtype most of the unquantized weights are stored in: what ``config.dtype`` says."""
    sizes: dict[torch.dtype, int] = {}
    for name, param in model.named_parameters():
        dtype = dtype_of(name)
        if dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + param.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32


def write_json(folder: Path, name: str, data: object) -> None:
    (Path(folder) / name).write_text(json.dumps(data, indent=2, default=str) + "\n")


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


def _tensor(model: nn.Module, name: str) -> Tensor:
    getter = model.get_parameter if _is_param(model, name) else model.get_buffer
    return getter(name).detach()


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
