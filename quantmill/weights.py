"""The tensors of a safetensors checkpoint folder, found from headers and read on demand.

A folder holds one ``model.safetensors`` or shards named by
``model.safetensors.index.json``. Opening it reads only the headers and checks
them (every shard the index names exists, no file is truncated); a tensor's
bytes are read when asked for, into a fresh tensor, so memory holds what the
caller keeps and nothing of the rest of the file. ``reads`` counts the
tensors read, which is how a test proves that weights stream.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from quantmill.errors import CheckpointError
from quantmill.folder import INDEX_FILE, SINGLE_WEIGHTS_FILE
from quantmill.tensorfile import CODE_DTYPES, Entry, HeaderError, read_header, read_tensor


@dataclass(frozen=True)
class Located:
    """One tensor: its file, where the file's data starts, and its entry there."""

    file: Path
    data_start: int
    entry: Entry

    @property
    def dtype(self) -> torch.dtype:
        return CODE_DTYPES[self.entry.dtype]


class WeightFiles:
    """Every tensor of the checkpoint in ``folder``, by name (headers only until read)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, Located] = {}
        self.reads = 0
        for file in self._files():
            try:
                entries, _, data_start = read_header(file)
            except (HeaderError, OSError) as exc:
                raise CheckpointError(
                    f"weight file {file} cannot be used: {exc}. The download or conversion "
                    "was interrupted or the file is corrupted; download or convert it again"
                ) from None
            for name, entry in entries.items():
                self.tensors[name] = Located(file, data_start, entry)

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index} is not a valid shard index ({exc})") from None
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} names {len(missing)} shard(s) that are missing from "
                    f"{self.folder}: {', '.join(missing[:5])}. Download the checkpoint again"
                )
            return [self.folder / n for n in names]
        single = self.folder / SINGLE_WEIGHTS_FILE
        files = [single] if single.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"model folder {self.folder} has no safetensors weights "
                f"({SINGLE_WEIGHTS_FILE} or shards with {INDEX_FILE}); quantmill reads "
                "safetensors checkpoints: convert .bin weights with save_pretrained"
            )
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].entry.shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def main_dtype(self) -> torch.dtype:
        """The floating dtype most of the weights are stored in (by bytes)."""
        counts: Counter[torch.dtype] = Counter()
        for located in self.tensors.values():
            if located.dtype.is_floating_point:
                counts[located.dtype] += located.entry.nbytes
        return counts.most_common(1)[0][0] if counts else torch.float32

    def read(
        self,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rows: slice | None = None,
    ) -> Tensor:
        """Tensor ``name`` (or rows of it) on ``device``; floating tensors cast to ``dtype``."""
        located = self.tensors[name]
        try:
            tensor = read_tensor(located.file, located.entry, located.data_start, rows)
        except (HeaderError, OSError) as exc:
            raise CheckpointError(f"cannot read {name} from {located.file}: {exc}") from None
        self.reads += 1
        if dtype is not None and tensor.dtype.is_floating_point:
            tensor = tensor.to(dtype)
        return tensor if device is None else tensor.to(device)

    def nbytes(self, names: list[str] | None = None) -> int:
        chosen = self.tensors if names is None else {n: self.tensors[n] for n in names}
        return sum(located.entry.nbytes for located in chosen.values())
