"""Forward hooks that never outlive the work they were registered for."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def hooks_removed(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Remove every hook handle on exit, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
