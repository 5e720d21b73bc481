"""Write a checkpoint folder as a GGUF file that llama.cpp runs.

Quantized layers whose grid a GGUF block type expresses are written from the
checkpoint's own integers and scales, bit-exactly, never re-quantized:
symmetric 4-bit groups of 32 → Q4_0, asymmetric 4-bit groups of 32 → Q4_1
(the minimum ``-(z + 8)·s`` is rounded to float16; the groups where that
changes a value are counted), symmetric 8-bit groups of 32 → Q8_0. Any other
grid is refused, naming the nearest exact recipe, unless ``requantize`` is
given: then the dequantized weights are re-quantized by llama.cpp's own rules
(``gguf.quants``) and the GPTQ/AWQ rounding is lost. Other tensors are float16
(1-D ones, the norms, float32). The file is written beside its target and
renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantmill.errors import ExportError
from quantmill.folder import CONFIG_FILE, weight_files
from quantmill.serving import gguf_blocks
from quantmill.serving.gguf_meta import ARCHS, GgufArch, add_tokenizer, rope_factors

log = logging.getLogger(__name__)

GROUP = gguf_blocks.BLOCK
REQUANTIZE_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0"}


@dataclass
class Grid:
    """One quantized layer as the checkpoint stores it."""

    bits: int
    symmetric: bool
    group_size: int | None
    q: np.ndarray  # int8 [out, in]
    scale: np.ndarray  # float16 [out, groups]
    zero: np.ndarray | None  # int8 [out, groups]


@dataclass
class GgufReport:
    path: str
    tensors: dict[str, str] = field(default_factory=dict)  # GGUF name → block type
    exact: int = 0  # quantized layers written from their own integers
    requantized: int = 0
    rounded_minimums: int = 0  # Q4_1 groups whose float16 minimum changed a value
    groups: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for kind in self.tensors.values():
            types[kind] = types.get(kind, 0) + 1
        return {
            "path": self.path, "tensor_types": types, "exact_layers": self.exact,
            "requantized_layers": self.requantized, "q4_1_groups": self.groups,
            "q4_1_rounded_minimums": self.rounded_minimums, "bytes": self.bytes,
        }  # fmt: skip


def exact_type(bits: int, symmetric: bool, group_size: int | None) -> str | None:
    """The GGUF block type that holds such a grid exactly, or None."""
    if group_size != GROUP:
        return None
    if bits == 4:
        return "Q4_0" if symmetric else "Q4_1"
    if bits == 8 and symmetric:
        return "Q8_0"
    return None


def block_type(grid: Grid) -> str | None:
    return exact_type(grid.bits, grid.symmetric, grid.group_size)


def gguf_path(checkpoint: str | Path) -> Path:
    """Where ``--format gguf`` puts a run's GGUF file: beside its checkpoint folder."""
    folder = Path(checkpoint)
    return folder.with_name(f"{folder.name}.gguf")


def check_exact(steps) -> None:
    """Refuse, before any work, a recipe whose grids GGUF cannot hold exactly."""
    from quantmill.errors import ConfigError

    for index, step in enumerate(steps):
        inexact = [
            s
            for s in step.weight_schemes()
            if exact_type(s.bits, s.symmetric, s.group_size) is None
        ]
        w = inexact[0] if inexact else step.weights
        if step.quantizes and exact_type(w.bits, w.symmetric, w.group_size) is None:
            raise ConfigError(
                f"steps.{index}.weights = {w.bits}-bit, group_size {w.group_size}, "
                f"{'symmetric' if w.symmetric else 'asymmetric'}: GGUF holds exactly only "
                "4-bit groups of 32 (Q4_0 symmetric, Q4_1 asymmetric) and 8-bit symmetric "
                "groups of 32 (Q8_0); use the recipe gptq-w4g32, or export packed and run "
                "`quantmill export --requantize q4_0` (GPTQ/AWQ rounding is then lost)"
            )


def nearest_recipe(grid: Grid) -> str:
    bits = 8 if grid.bits >= 8 else 4
    sym = "symmetric: true" if grid.symmetric or bits == 8 else "symmetric: false"
    return f"weights: {{bits: {bits}, group_size: 32, {sym}}}"


def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    requantize: str | None = None,
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
) -> GgufReport:
    """Write ``checkpoint`` (a quantmill or plain transformers folder) as ``out``."""
    folder, out = Path(checkpoint), Path(out)
    config = _read_config(folder)
    arch = _arch(config)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it, or another --out")
    if requantize is not None and requantize not in REQUANTIZE_TYPES:
        raise ExportError(f"--requantize {requantize!r}: allowed {', '.join(REQUANTIZE_TYPES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        report = _write(folder, config, arch, tmp, requantize, tokenizer_pre)
        report.path = str(out)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report.bytes = out.stat().st_size
    return report


def _write(
    folder: Path, config: dict, arch: GgufArch, tmp: Path, requantize: str | None,
    tokenizer_pre: str | None,
) -> GgufReport:  # fmt: skip
    import gguf

    writer = gguf.GGUFWriter(str(tmp), arch.name)
    arch.add_metadata(writer, config, folder.name)
    add_tokenizer(writer, folder, config["vocab_size"], tokenizer_pre)
    report = GgufReport(str(tmp))
    schemes = _schemes(config)

    def permute(name: str, rows: np.ndarray) -> np.ndarray:
        return arch.permute(name, rows, config)

    for module, leaf, tensors in _tensors(folder):
        name = arch.tensor_name(f"{module}.{leaf}")
        if name is None:
            raise ExportError(f"{module}.{leaf}: no GGUF name for this tensor ({arch.name})")
        grid = _grid(module, tensors, schemes.get(module)) if leaf == "weight" else None
        data, kind = _tensor(permute, name, module, tensors.get(leaf), grid, requantize, report)
        writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        report.tensors[name] = kind
    factors = rope_factors(config)
    if factors is not None:  # Llama 3's scaled rotary frequencies
        writer.add_tensor("rope_freqs.weight", factors, raw_dtype=gguf.GGMLQuantizationType.F32)
        report.tensors["rope_freqs.weight"] = "F32"
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return report


def _tensor(permute, name, hf_name, tensor, grid, requantize, report):
    """The bytes (or floats) of one GGUF tensor and its type name."""
    from gguf import GGMLQuantizationType, quants

    if grid is None:
        weight = permute(name, tensor.float().numpy())
        if weight.ndim == 1:
            return weight.astype(np.float32), "F32"
        return weight.astype(np.float16), "F16"
    kind = block_type(grid)
    if kind is None:
        if requantize is None:
            raise ExportError(
                f"{hf_name}: {grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} "
                f"weights in groups of {grid.group_size or 'a whole row'} have no exact GGUF "
                f"block type (Q4_0, Q4_1 and Q8_0 take groups of 32). Quantize with "
                f"{nearest_recipe(grid)} for an exact file, or pass --requantize "
                "q4_0|q4_1|q8_0 to re-quantize the dequantized weights by llama.cpp's rules "
                "(the GPTQ/AWQ rounding is then lost)"
            )
        kind = REQUANTIZE_TYPES[requantize]
        weight = permute(name, _dequantize(grid))
        report.requantized += 1
        return quants.quantize(weight, getattr(GGMLQuantizationType, kind)), kind
    q = permute(name, grid.q)
    scale = permute(name, grid.scale)
    report.exact += 1
    if kind == "Q4_0":
        return gguf_blocks.pack_q4_0(q, scale), kind
    if kind == "Q8_0":
        return gguf_blocks.pack_q8_0(q, scale), kind
    data, rounded = gguf_blocks.pack_q4_1(q, scale, permute(name, grid.zero))
    report.rounded_minimums += rounded
    report.groups += scale.size
    return data, kind


def _dequantize(grid: Grid) -> np.ndarray:
    """Our float weights for ``grid``: ``quantmill.quant.grid.dequantize`` on its arrays."""
    from quantmill.config import QuantScheme
    from quantmill.quant.grid import dequantize

    scheme = QuantScheme(bits=grid.bits, group_size=grid.group_size, symmetric=grid.symmetric)
    zero = None if grid.zero is None else torch.from_numpy(grid.zero).float()
    q, scale = torch.from_numpy(grid.q), torch.from_numpy(grid.scale).float()
    return dequantize(q, scale, zero, scheme).numpy()


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not folder.is_dir() or not path.is_file():
        raise ExportError(
            f"{folder} is not a checkpoint folder ({CONFIG_FILE} missing): pass the output "
            "folder of `quantmill quantize` or `quantmill run`, or a transformers model folder"
        )
    if not weight_files(folder):
        raise ExportError(f"{folder} holds no *.safetensors weights: the checkpoint is incomplete")
    return json.loads(path.read_text())


def _arch(config: dict) -> GgufArch:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ExportError(
            f"GGUF export knows the {', '.join(sorted(ARCHS))} architectures; this checkpoint "
            f"is {model_type!r}"
        )
    return ARCHS[model_type]


def _schemes(config: dict) -> dict[str, dict]:
    """Quantized layer name → its compressed-tensors weight arguments and format."""
    qc = config.get("quantization_config") or {}
    found = {}
    for group in (qc.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            found[target] = {**group["weights"], "format": group.get("format") or qc.get("format")}
    return found


QUANT_LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _tensors(folder: Path) -> Iterator[tuple[str, str, dict[str, torch.Tensor]]]:
    """``(module, "weight" or "bias", tensors)``, one at a time; a quantized weight comes
    with its packed integers, scale, zero point and shape (whichever shards hold them)."""
    from safetensors import safe_open

    files = weight_files(folder)
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            where.update({key: path for key in f.keys()})
    modules: dict[tuple[str, str], list[str]] = {}
    for key in where:
        module, _, leaf = key.rpartition(".")
        kind = "weight" if leaf == "weight" or leaf in QUANT_LEAVES else leaf
        modules.setdefault((module, kind), []).append(key)
    handles = {path: safe_open(str(path), "pt") for path in files}
    for (module, kind), keys in modules.items():
        tensors = {}
        for key in keys:
            tensors[key.rpartition(".")[2]] = handles[where[key]].get_tensor(key)
        yield module, kind, tensors


def _grid(name: str, tensors: dict[str, torch.Tensor], scheme: dict | None) -> Grid | None:
    if scheme is None:
        if "weight_packed" in tensors or "weight_scale" in tensors:
            raise ExportError(f"{name} holds quantized tensors that config.json does not describe")
        return None
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, symmetric = scheme["num_bits"], scheme.get("symmetric", True)
    strategy, group = scheme.get("strategy"), scheme.get("group_size")
    scale = tensors["weight_scale"]
    if "weight_packed" in tensors:
        shape = torch.Size(tensors["weight_shape"].tolist())
        q = unpack_from_int32(tensors["weight_packed"], bits, shape)
    else:
        q = tensors["weight"]
        shape = q.shape
    zero = tensors.get("weight_zero_point")
    if zero is not None and "weight_packed" in tensors and strategy in ("group", "channel"):
        zero = unpack_from_int32(zero, bits, torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
    return Grid(
        bits=bits,
        symmetric=symmetric,
        group_size=group if strategy == "group" else None,
        q=q.to(torch.int8).numpy(),
        scale=scale.to(torch.float16).numpy(),
        zero=None if symmetric or zero is None else zero.to(torch.int8).numpy(),
    )
