"""Save a quantized model atomically: everything goes to a temporary folder
beside the destination and is renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from torch import nn

from quantmill.errors import ExportError
from quantmill.export.compressed import build_schemes, compressed_state_dict, quantization_config
from quantmill.layers import LayerQuant
from quantmill.runtime import write_runtime

ExportFormat = Literal["packed", "fake"]


@contextmanager
def staged_output(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"output folder {out_dir} already exists and is not empty; "
            "choose another --out or pass --overwrite"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_quantized(
    model: nn.Module,
    tokenizer,
    layers: dict[str, LayerQuant],
    folder: Path,
    fmt: ExportFormat = "packed",
) -> None:
    """Write ``model`` with its quantized ``layers`` into ``folder`` (which must exist).

    ``packed``: compressed-tensors checkpoint with ``quantization_config``.
    ``fake``: ordinary float weights that lie on the quantization grid.
    """
    if fmt == "fake":
        model.save_pretrained(folder)
    elif fmt == "packed":
        in_features = {name: model.get_submodule(name).weight.shape[1] for name in layers}
        schemes = build_schemes(layers, in_features)
        state = compressed_state_dict(model, layers, schemes)
        model.config.quantization_config = quantization_config(schemes)
        try:
            model.save_pretrained(folder, state_dict=state)
        finally:
            del model.config.quantization_config
    else:
        raise ExportError(f"unknown export format {fmt!r}; allowed: packed, fake")
    write_runtime(folder, layers)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_json(folder: Path, name: str, data: object) -> None:
    (Path(folder) / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
