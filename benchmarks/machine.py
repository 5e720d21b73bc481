"""What a benchmark row records of the machine it ran on (standard library only)."""

from __future__ import annotations

import os
import platform


def machine(threads: int = 2) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": threads,
            "cores": os.cpu_count()}  # fmt: skip
