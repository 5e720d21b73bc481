"""Which device and dtype a run computes on, resolved once before any work.

``auto`` means a CUDA device when one is visible, else the CPU; the compute
dtype ``auto`` is the checkpoint's own on a GPU (bfloat16 stays bfloat16) and
float32 on a CPU, where half-precision matmuls are slow and inexact.
Statistics (Hessians, channel maxima, errors) always accumulate in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from quantmill.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Calibration activations stay on the device while they take at most this share of
# the memory free there when the run starts; beyond it they wait in CPU memory.
DEVICE_SHARE = 0.5
F = TypeVar("F", bound=Callable[..., Any])


def available_devices() -> list[str]:
    """``cpu`` and every visible CUDA device, as ``--device`` takes them."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(count)]


def resolve_device(spec: str) -> torch.device:
    """``auto|cpu|cuda|cuda:N`` → a device that exists here, or ``ConfigError``."""
    there = available_devices()
    if spec == "auto":
        return torch.device("cuda:0" if len(there) > 1 else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    wanted = "cuda:0" if spec == "cuda" else spec
    if wanted not in there:
        reason = "no CUDA device is visible" if len(there) == 1 else f"{wanted} does not exist"
        raise ConfigError(
            f"device = {spec!r}: {reason} on this machine (devices here: {', '.join(there)}); "
            "pass --device auto or one of those"
        )
    return torch.device(wanted)


def resolve_dtype(spec: str, device: torch.device, source: torch.dtype) -> torch.dtype:
    """The compute dtype: ``auto`` → ``source`` on a GPU, float32 on a CPU."""
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cpu" or not source.is_floating_point:
        return torch.float32
    return source


def offload_to(spec: str, device: torch.device, nbytes: int) -> torch.device:
    """Where ``nbytes`` of calibration activations wait between blocks."""
    if device.type == "cpu" or spec == "none":
        return device
    if spec == "cpu":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_SHARE * free else torch.device("cpu")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def uses_engine_threads(fn: F) -> F:
    """Run ``fn`` with torch's CPU threads set to its ``engine`` keyword's ``threads``
    (restored after; torch's thread count is per OS thread, so concurrent calls in
    other threads keep theirs)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        engine = kwargs.get("engine")
        threads = getattr(engine, "threads", None)
        if threads is None:
            return fn(*args, **kwargs)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]
