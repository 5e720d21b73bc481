"""Each bad input gives a clear error and leaves no output behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from quantmill.api import quantize
from quantmill.errors import (
    CalibrationDataError,
    CheckpointError,
    ExportError,
    ModelSourceError,
    UnsupportedArchitectureError,
)
from tests.conftest import tiny_recipe, tiny_tokenizer


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


@pytest.fixture
def recipe(text_files):
    return tiny_recipe("gptq", *text_files)


def test_unknown_model_id_or_path(tmp_path, recipe):
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match="not a preset .* not an existing local folder"):
        quantize("no-such-model", recipe, out, progress=False)
    with pytest.raises(ModelSourceError, match="not found"):
        quantize(str(tmp_path / "missing" / "dir"), recipe, out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        quantize(str(empty), recipe, out, progress=False)
    assert_no_output(out)


def test_unreachable_hub_repo(tmp_path, recipe, monkeypatch):
    # a closed local port stands in for an unreachable Hub
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    code = (
        "from quantmill.sources import resolve_model\n"
        "from quantmill.errors import ModelSourceError\n"
        "try:\n    resolve_model('nobody/nothing-here')\n"
        "except ModelSourceError as e:\n    print('ERR', e)\n"
    )
    env = {
        **__import__("os").environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "ERR model 'nobody/nothing-here'" in result.stdout, result.stderr[-2000:]


def test_unsupported_architecture(tmp_path, recipe):
    from transformers import BloomConfig, BloomForCausalLM

    folder = tmp_path / "bloom"
    BloomForCausalLM(
        BloomConfig(vocab_size=320, hidden_size=32, n_layer=1, n_head=4)
    ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedArchitectureError, match="'bloom' is not supported.*llama"):
        quantize(str(folder), recipe, out, progress=False)
    assert_no_output(out)


def test_corrupted_safetensors(tmp_path, tiny_checkpoint, recipe):
    folder = tiny_checkpoint()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="truncated"):
        quantize(str(folder), recipe, out, progress=False)
    assert_no_output(out)


def test_weights_containing_nan(tmp_path, tiny_checkpoint, recipe):
    folder = tiny_checkpoint()
    state = load_file(folder / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[key][3, 5] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"{key}.*NaN"):
        quantize(str(folder), recipe, out, progress=False)
    assert_no_output(out)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_calibration_data(tmp_path, tiny_checkpoint, text_files, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(CalibrationDataError, match="no text"):
        quantize(
            str(tiny_checkpoint()), tiny_recipe("gptq", empty, text_files[1]), out, progress=False
        )
    assert_no_output(out)


def test_missing_calibration_file(tmp_path, tiny_checkpoint, text_files):
    out = tmp_path / "out"
    recipe = tiny_recipe("gptq", tmp_path / "nope.txt", text_files[1])
    with pytest.raises(CalibrationDataError, match="does not exist"):
        quantize(str(tiny_checkpoint()), recipe, out, progress=False)
    assert_no_output(out)


def test_calibration_text_shorter_than_one_sample(tmp_path, tiny_checkpoint, text_files):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    out = tmp_path / "out"
    with pytest.raises(CalibrationDataError, match="seq_len"):
        quantize(
            str(tiny_checkpoint()), tiny_recipe("gptq", short, text_files[1]), out, progress=False
        )
    assert_no_output(out)


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_checkpoint, recipe, monkeypatch):
    from quantmill.export.shards import ShardWriter

    def half_write(self, name, tensor):
        self._data.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "add", half_write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        quantize(str(tiny_checkpoint()), recipe, out, progress=False)
    assert_no_output(out)


def test_existing_output_is_not_overwritten_by_default(tmp_path, tiny_checkpoint, recipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        quantize(str(tiny_checkpoint()), recipe, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what quantmill wrote: a folder of the user's is kept
    with pytest.raises(ExportError, match="was not written by quantmill"):
        quantize(str(tiny_checkpoint()), recipe, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    quantize(str(tiny_checkpoint()), recipe, out, evaluate=False, progress=False)
    first = (out / "config.json").stat().st_mtime_ns
    quantize(str(tiny_checkpoint()), recipe, out, overwrite=True, evaluate=False, progress=False)
    assert (out / "config.json").stat().st_mtime_ns != first  # our checkpoint, replaced


def test_remote_code_is_refused_without_the_flag(tmp_path, tiny_checkpoint, recipe):
    folder = tiny_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match="--trust-remote-code"):
        quantize(str(folder), recipe, out, progress=False)
    assert_no_output(out)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - method: gptq\n    weights: {bits: 12}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "quantize",
            "--model",
            "x",
            "--recipe",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "steps.0.weights.bits = 12" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_hub_dataset_unreachable_names_the_dataset_and_the_fix(tmp_path):
    code = (
        "from quantmill.data import load_rows\n"
        "from quantmill.errors import CalibrationDataError\n"
        "try:\n    load_rows('wikitext', 'wikitext-2-raw-v1', 'train')\n"
        "except CalibrationDataError as e:\n    print('ERR', e)\n"
    )
    env = {
        **__import__("os").environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "ds"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert "ERR could not load dataset 'wikitext'" in result.stdout, result.stderr[-2000:]
    assert "local text file" in result.stdout
