"""The pipeline's stages as library calls that read and write files.

An orchestrator (``tasks/``) runs, retries and caches each stage apart, so
every stage takes paths and small values and returns paths and small dicts,
never a model or a tensor. Prepared calibration data and calibration
statistics are cached, keyed by model commit hash + calibration spec + code
version, and checked on every read (``quantmill.cache``): a second run with
the same inputs reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from quantmill.cache import cache_key, cached_file
from quantmill.config import CalibrationSpec, EngineSpec
from quantmill.data import calibration_ids
from quantmill.devices import resolve_device, resolve_dtype, uses_engine_threads
from quantmill.hashing import file_sha256
from quantmill.sources import ResolvedModel
from quantmill.stats import collect_statistics, save_statistics
from quantmill.weights import WeightFiles


@dataclass
class Cached:
    path: str
    hit: bool  # True when the file came from the cache and no work was done
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "hit": self.hit, "key": self.key}


def calibration_key(resolved: ResolvedModel, spec: CalibrationSpec) -> str:
    return cache_key(
        model=resolved.revision,
        calibration=spec.model_dump(exclude={"all_experts"}),  # the ids do not depend on it
        data=data_fingerprint(spec.dataset),
    )


def prepare_calibration(resolved: ResolvedModel, spec: CalibrationSpec) -> Cached:
    """Token ids ``[num_samples, seq_len]`` saved as ``ids`` in a safetensors file."""
    key = calibration_key(resolved, spec)

    def produce(tmp: Path) -> None:
        from quantmill.models import load_tokenizer

        tokenizer = load_tokenizer(resolved)
        save_file({"ids": calibration_ids(tokenizer, spec).contiguous()}, str(tmp))

    path, hit = cached_file("calibration", key, "ids.safetensors", produce)
    return Cached(str(path), hit, key)


def load_calibration(path: str | Path) -> Tensor:
    return load_file(str(path))["ids"]


@uses_engine_threads
def prepare_statistics(
    resolved: ResolvedModel,
    spec: CalibrationSpec,
    calibration: str | Path,
    progress: bool = True,
    *,
    engine: EngineSpec | None = None,  # keyword: its threads apply (uses_engine_threads)
) -> Cached:
    """The original model's calibration statistics (``quantmill.stats``), cached per
    model, calibration and compute (device type, dtype); one block in memory at a time."""
    from quantmill.engine import LazyStore
    from quantmill.lazy import LazyModel

    engine = engine or EngineSpec()
    device = resolve_device(engine.device)
    source = WeightFiles(resolved.path).main_dtype()
    dtype = resolve_dtype(engine.dtype, device, source)
    key = cache_key(
        base=calibration_key(resolved, spec), compute=f"{device.type}/{dtype}",
        all_experts=spec.all_experts,
    )  # fmt: skip

    def produce(tmp: Path) -> None:
        lazy = LazyModel.open(resolved.path, device, dtype)
        ids = load_calibration(calibration)
        store = LazyStore(lazy, engine.offload)
        stats = collect_statistics(
            lazy.model, ids, spec.batch_size, progress, store, spec.all_experts
        )
        save_statistics(stats, tmp)

    path, hit = cached_file("statistics", key, "stats.safetensors", produce)
    return Cached(str(path), hit, key)


def data_fingerprint(dataset: str) -> str:
    """Content hash of a local data file; the name itself for a ``datasets`` dataset."""
    path = Path(dataset).expanduser()
    if not path.is_file():
        return dataset
    return file_sha256(path)
