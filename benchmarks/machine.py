"""What a benchmark row records of the machine it ran on (standard library only)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor", "AMD EPYC 9B14"): results of
    bfloat16 arithmetic differ between CPUs, so a row says which one made it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_label(cpu: str | None) -> str:
    """A CPU in two words: "Intel Xeon", "AMD EPYC"."""
    words = (cpu or "?").replace("(R)", "").split()
    return " ".join(words[:2])


def machine(threads: int = 2) -> dict:
    return {"cpu": cpu_model(), "threads": threads, "cores": os.cpu_count()}
