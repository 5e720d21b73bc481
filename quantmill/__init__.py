"""quantmill: post-training quantization of causal language models.

The library computes; it never imports prefect or mlflow (tracking and
orchestration live in ``tasks/`` and ``flows/``).
"""

from __future__ import annotations

from quantmill.errors import (
    CalibrationDataError,
    CheckpointError,
    ConfigError,
    ExportError,
    ModelSourceError,
    QuantmillError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "ModelSourceError",
    "QuantmillError",
    "UnsupportedArchitectureError",
    "__version__",
]
