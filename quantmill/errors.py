"""Errors a user can act on: each message names the input at fault and the fix."""

from __future__ import annotations


class QuantmillError(Exception):
    """Base class for every error quantmill raises on purpose."""


class ConfigError(QuantmillError, ValueError):
    """A recipe or config value is invalid (raised before any work starts)."""


class ModelSourceError(QuantmillError):
    """A model id, path or preset cannot be resolved or loaded.

    ``transient`` marks failures worth retrying (network, rate limits, server
    errors), as opposed to a wrong id or path, which no retry fixes.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class UnsupportedArchitectureError(QuantmillError):
    """The model's architecture has no entry in the architecture table."""


class CalibrationDataError(QuantmillError):
    """Calibration or evaluation data is missing, empty or too short."""


class CheckpointError(QuantmillError):
    """A checkpoint on disk is corrupted, incomplete or holds invalid values."""


class ExportError(QuantmillError):
    """A quantized model cannot be written in the requested format."""


class OutOfSpaceError(ExportError):
    """The disk filled up while a checkpoint was written; the run can resume once there is
    space. ``needed`` is the number of bytes that could not be written at that moment."""

    def __init__(self, message: str, folder: object = None, needed: int = 0) -> None:
        super().__init__(message)
        self.folder = folder
        self.needed = needed


class RunLockedError(QuantmillError):
    """Another run is writing the same output folder."""


class PublishError(QuantmillError):
    """Publishing to the Hub failed or was refused (token, repo, upload, verification).

    ``transient`` marks failures worth retrying (network, rate limits, server errors).
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RegistryError(QuantmillError):
    """The model registry could not be reached or refused a registration."""


class StorageError(QuantmillError):
    """The object store (S3) holding artifacts and the cache failed or is misconfigured."""


class TrainingDivergedError(QuantmillError):
    """Quantization-aware training produced a non-finite loss; the last good checkpoint
    is kept so a run with a lower learning rate resumes from it."""


class ServingError(QuantmillError):
    """A serving engine is missing or could not be run (not: it refused a checkpoint)."""
