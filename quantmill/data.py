"""Calibration samples and evaluation text, from ``datasets`` or a local file.

A spec's ``dataset`` is either a path to a local text file or a dataset name
on the Hub (loaded through ``datasets``, e.g. ``wikitext`` /
``wikitext-2-raw-v1``). Rows are joined with "\\n\\n" as in the GPTQ paper.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from quantmill.config import CalibrationSpec, EvalSpec
from quantmill.errors import CalibrationDataError

log = logging.getLogger(__name__)

JOIN = "\n\n"  # rows are joined this way in the GPTQ paper's protocol


def load_rows(dataset: str, config: str | None, split: str) -> list[str]:
    """The text rows of a local file (its lines) or of a ``datasets`` split."""
    path = Path(dataset).expanduser()
    if path.exists() or dataset.startswith((".", "/", "~")) or path.suffix in {".txt", ".raw"}:
        if path.is_dir():
            raise CalibrationDataError(
                f"data file {path} is a folder: give a UTF-8 text file in it, e.g. "
                f"{path / 'wiki.valid.tokens'}"
            )
        if not path.is_file():
            raise CalibrationDataError(f"data file {path} does not exist")
        # Rows as the Hub's wikitext has them: each line with its "\n", blank lines as "".
        # (This is what reproduces the published perplexities from the raw file.)
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError as exc:
            raise CalibrationDataError(
                f"data file {path} is not UTF-8 text (byte {exc.start} is "
                f"{exc.object[exc.start]:#04x}): give a plain text file, a line of text per line"
            ) from None
        return [line if line.strip() else "" for line in lines]
    try:
        import datasets

        data = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # datasets raises many types for offline/missing data
        raise CalibrationDataError(
            f"could not load dataset {dataset!r} (config {config!r}, split {split!r}) through "
            f"datasets: {exc}. Pass a local text file as the dataset instead."
        ) from exc
    column = "text" if "text" in data.column_names else data.column_names[0]
    return list(data[column])


def calibration_ids(tokenizer, spec: CalibrationSpec) -> Tensor:
    """``[num_samples, seq_len]`` token ids: random windows of the joined text (GPTQ protocol)."""
    ids = tokenize_rows(tokenizer, load_rows(spec.dataset, spec.dataset_config, spec.split))
    if ids.numel() <= spec.seq_len:
        raise CalibrationDataError(
            f"calibration data {spec.dataset!r} has {ids.numel()} tokens; "
            f"calibration.seq_len = {spec.seq_len} needs more. Use more text or a shorter seq_len."
        )
    starts = calibration_starts(ids.numel(), spec)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])


def calibration_starts(tokens: int, spec: CalibrationSpec) -> Tensor:
    """``[num_samples]`` first positions of the calibration windows in a text of
    ``tokens`` ids (seeded: the same text and spec always give the same windows)."""
    generator = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, tokens - spec.seq_len, (spec.num_samples,), generator=generator)


def ids_digest(ids: Tensor) -> str:
    """``sha256:<hex>`` of token ids ``[N, L]`` as int64, row-major, shape included: two
    tools given the same calibration rows report the same digest."""
    import hashlib

    data = ids.to(torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def eval_ids(tokenizer, spec: EvalSpec) -> Tensor:
    """``[windows, seq_len]``: non-overlapping windows of the joined test text, capped."""
    rows = load_rows(spec.dataset, spec.dataset_config, spec.split)
    # Whole-text tokenization here, so windows match the published protocol exactly.
    ids = tokenize_rows(tokenizer, rows, chunk_chars=None)
    windows = ids.numel() // spec.seq_len
    if windows == 0:
        raise CalibrationDataError(
            f"evaluation data {spec.dataset!r} has {ids.numel()} tokens, fewer than one "
            f"window of evaluation.seq_len = {spec.seq_len}; use more text or a shorter "
            "--eval-seq-len"
        )
    if spec.max_windows is not None:
        windows = min(windows, spec.max_windows)
    return ids[: windows * spec.seq_len].view(windows, spec.seq_len)


def tokenize_rows(tokenizer, rows: list[str], chunk_chars: int | None = 1 << 16) -> Tensor:
    """Token ids of ``"\n\n".join(rows)``, tokenized in pieces of about ``chunk_chars``.

    Pieces end on row boundaries and are joined by the separator's own tokens,
    so the result matches tokenizing the whole text except where a token
    would span a piece boundary; it keeps the tokenizer's memory small.
    ``chunk_chars=None`` tokenizes the whole text at once.
    """
    if not any(row.strip() for row in rows):
        raise CalibrationDataError("the data holds no text (empty file or split)")
    separator = _encode(tokenizer, JOIN)
    pieces: list[Tensor] = []
    start, size = 0, 0
    for end, row in enumerate(rows, start=1):
        size += len(row) + len(JOIN)
        if (chunk_chars is not None and size >= chunk_chars) or end == len(rows):
            if pieces:
                pieces.append(separator)
            pieces.append(_encode(tokenizer, JOIN.join(rows[start:end])))
            start, size = end, 0
    return torch.cat(pieces)


def _encode(tokenizer, text: str) -> Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False).input_ids
    return torch.tensor(ids, dtype=torch.long)
