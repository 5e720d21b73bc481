"""Write a quantized model as a compressed-tensors checkpoint that transformers loads.

Module rewiring stays out of here: this module turns the grids found by the
methods (``LayerQuant``) into compressed-tensors schemes and per-module
compressed state dicts, using the compressed-tensors compressors:
``pack-quantized`` (sub-8-bit integers packed into int32, asymmetric zero
points packed too) and ``int-quantized`` for 8 bits (int8 weights).

Asymmetric weights use the ``group``/``channel`` strategies with packed zero
points, as llm-compressor writes them and vLLM loads them. compressed-tensors
0.18 to 0.20.1 cannot load those in ``transformers``: on the meta device their
``compress`` leaves the zero points unpacked, so the empty model expects
``[out, groups]`` where the file holds ``[out/8, groups]`` (pyproject pins
``compressed-tensors<0.18``; 0.17 is also what vLLM 0.32 runs).
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from torch import nn

from quantmill.config import QuantScheme
from quantmill.errors import ExportError
from quantmill.layers import LayerQuant, get_weight
from quantmill.quant.grid import SCALE_DTYPE


def compression_format(scheme: QuantScheme, at_run_time: bool = False) -> CompressionFormat:
    """int8 storage for 8-bit weights whose inputs are treated at run time (W8A8,
    LLM.int8(); vLLM reads ``int-quantized`` as an activation-quantizing format and
    refuses it without activations); every weight-only scheme packed into int32 words
    (vLLM's WNA16 kernels)."""
    if scheme.bits == 8 and at_run_time:
        return CompressionFormat.int_quantized
    return CompressionFormat.pack_quantized


def _at_run_time(quant: LayerQuant) -> bool:
    """True for layers whose inputs our runtime treats (W8A8, LLM.int8()'s outliers):
    they read int8 weights as stored."""
    return quant.activations is not None or quant.outlier_threshold is not None


def quantization_args(scheme: QuantScheme, in_features: int) -> QuantizationArgs:
    """The compressed-tensors description of ``scheme`` for a layer of ``in_features``."""
    common: dict[str, Any] = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "observer": scheme.observer if scheme.observer == "mse" else "minmax",
    }
    group = scheme.group_size
    if group is None:
        return QuantizationArgs(strategy="channel", **common)
    if in_features % group:
        # compressed-tensors' "group" needs exact division; its "block" pads, but no serving
        # engine loads it and compressed-tensors 0.17 cannot decompress a padded block
        raise ExportError(
            f"group size {group} does not divide a layer's {in_features} inputs: the packed "
            "format cannot hold a partial last group; export with --format fake (float "
            "weights on the grid), or pick a group size that divides every layer's inputs"
        )
    return QuantizationArgs(strategy="group", group_size=group, **common)


def activation_args(quant: LayerQuant) -> QuantizationArgs | None:
    """Dynamic per-token input quantization, as compressed-tensors describes it.

    LLM.int8()'s outlier decomposition has no compressed-tensors form: those
    layers are stored weight-only (int8 per channel) and the threshold lives in
    ``quantmill_runtime.json``.
    """
    act = quant.activations
    if act is None or quant.outlier_threshold is not None:
        return None
    return QuantizationArgs(
        num_bits=act.bits, type="int", symmetric=act.symmetric, strategy="token", dynamic=True
    )


def build_schemes(
    layers: dict[str, LayerQuant], in_features: dict[str, int]
) -> dict[str, QuantizationScheme]:
    """One compressed-tensors scheme per distinct (args, format), targeting exact module names."""
    by_key: dict[
        str, tuple[QuantizationArgs, QuantizationArgs | None, CompressionFormat, list[str]]
    ] = {}
    for name, quant in layers.items():
        args = quantization_args(quant.scheme, in_features[name])
        acts = activation_args(quant)
        fmt = compression_format(quant.scheme, _at_run_time(quant))
        key = args.model_dump_json() + (acts.model_dump_json() if acts else "") + fmt.value
        by_key.setdefault(key, (args, acts, fmt, []))[3].append(name)
    return {
        f"group_{i}": QuantizationScheme(
            targets=names, weights=args, input_activations=acts, format=fmt.value
        )
        for i, (args, acts, fmt, names) in enumerate(by_key.values())
    }


def quantization_config(schemes: dict[str, QuantizationScheme]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``."""
    formats = {scheme.format for scheme in schemes.values()}
    fmt = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
    config = QuantizationConfig(
        config_groups=schemes,
        format=fmt,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=[],
    )
    return config.model_dump(exclude_none=True)


def layer_scheme(quant: LayerQuant, in_features: int) -> QuantizationScheme:
    """The compressed-tensors scheme of one quantized layer."""
    fmt = compression_format(quant.scheme, _at_run_time(quant))
    return QuantizationScheme(
        targets=["layer"],
        weights=quantization_args(quant.scheme, in_features),
        input_activations=activation_args(quant),
        format=fmt.value,
    )


def compress_layer(
    name: str, module: nn.Module, quant: LayerQuant, conv1d: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors that replace ``name.weight`` in a packed checkpoint (full names).
    ``conv1d``: the module is GPT-2's Conv1D (``[in, out]``); its weight is stored in
    nn.Linear's ``[out, in]`` layout, as vLLM's GPT-2 reads quantized weights."""
    if not isinstance(module, nn.Linear) and not conv1d:
        raise ExportError(
            f"{name} is a {type(module).__name__}, not nn.Linear; compressed-tensors stores "
            "only nn.Linear weights. Export this architecture with --format fake."
        )
    weight = get_weight(module, conv1d)
    scheme = layer_scheme(quant, weight.shape[1])
    local = {
        "weight": weight.float(),
        "weight_scale": quant.scale.to(module.weight.device, SCALE_DTYPE).contiguous(),
    }
    if quant.zero is not None:
        local["weight_zero_point"] = quant.zero.to(module.weight.device, torch.int8).contiguous()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    compressed = compressor.compress(local, scheme)
    return {f"{name}.{key}": tensor.contiguous() for key, tensor in compressed.items()}
