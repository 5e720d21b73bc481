"""Convert a GGUF file into a safetensors folder, once, one tensor at a time.

Names and layouts follow transformers' own GGUF reader (its name map and its
per-architecture tensor processors, e.g. Llama's reversed q/k permutation), so
the folder holds exactly the weights ``from_pretrained(gguf_file=...)`` would
give. Tensors stored as floats keep their dtype (F16 stays float16, BF16
bfloat16); quantized ones (Q4_1, Q8_0, ...) are dequantized to float32, the
narrowest dtype that holds them exactly. Memory holds one tensor at a time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quantmill.devices import dtype_name
from quantmill.errors import CheckpointError
from quantmill.export.shards import ShardWriter
from quantmill.folder import SOURCE_FILE
from quantmill.hashing import file_sha256

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 5 * 10**9
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def convert_gguf(
    gguf: Path, target: Path, lineage: dict[str, str] | None = None, progress: bool = False
) -> Path:
    """Write ``gguf`` as a plain safetensors folder at ``target`` (config, tokenizer, weights).

    Written into a sibling folder and renamed into place when complete, so an
    interrupted conversion never leaves a folder that looks complete; one process
    at a time converts into ``target`` (the others wait, then use its result).
    ``lineage`` (``base_model``, ``license``) goes to ``quantmill_source.json``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # converted while this one waited
            return target
        return _convert(gguf, target, lineage, progress)


def _unreadable(gguf: Path, exc: Exception) -> str:
    """Why a GGUF file cannot be read, in the user's terms."""
    nbytes = gguf.stat().st_size if gguf.exists() else 0
    size = f"{nbytes / 1e6:.1f} MB" if nbytes >= 10**6 else f"{nbytes} bytes"
    if "cannot reshape array" in str(exc) or isinstance(exc, IndexError):
        # its header names tensors whose data lies past the end of the file
        return (f"{gguf} is truncated: it ends ({size}) before the data its header "
                "describes; download it again (compare its size or SHA-256 "
                "with the source's)")  # fmt: skip
    return f"{gguf} is not a readable GGUF file ({exc}); it may be corrupted: download it again"


def _convert(gguf: Path, target: Path, lineage: dict[str, str] | None, progress: bool) -> Path:
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    try:
        reader = GGUFReader(str(gguf))
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, IndexError) as exc:
        raise CheckpointError(_unreadable(gguf, exc)) from None
    names, processor, parsed, architectures = _name_map(gguf, config, reader)
    tmp = target.with_name(f".{target.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = ShardWriter(tmp, DEFAULT_SHARD_BYTES)
        dtypes: set[torch.dtype] = set()
        for tensor in tqdm(reader.tensors, desc="converting GGUF", disable=not progress):
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(
                weights=weights, name=tensor.name, tensor_key_mapping=names,
                parsed_parameters=parsed,
            )  # fmt: skip
            if result.name not in names:
                continue
            dtype = _FLOAT_TYPES.get(tensor.tensor_type.name, torch.float32)
            # np.array copies: the file is mapped read-only
            value = torch.from_numpy(np.array(result.weights)).to(dtype)
            dtypes.add(dtype)
            writer.add(names[result.name], value)
        writer.finish()
        config.architectures = architectures
        config.dtype = dtype_name(max(dtypes, key=lambda d: d.itemsize, default=torch.float32))
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        lineage = {"gguf": gguf.name, "sha256": file_sha256(gguf), **(lineage or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(lineage, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _name_map(gguf: Path, config, reader):
    """GGUF tensor name → transformers parameter name, and the architecture's processor."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from quantmill.lazy import empty_model_from_config

    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
    parsed["tensors"] = {}
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    model = empty_model_from_config(config, torch.float32)
    names = get_gguf_hf_weights_map(model, processor)
    return names, processor, parsed, [type(model).__name__]
