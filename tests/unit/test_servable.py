"""Grids no serving engine loads are refused before any work, unless the recipe opts out."""

import json

import pytest

from quantmill.api import SUMMARY_FILE, check_recipe, quantize
from quantmill.card import CheckpointInfo, render_card
from quantmill.driver import quantize_model
from quantmill.errors import ConfigError, ExportError
from quantmill.export.checkpoint import save_quantized
from quantmill.recipe import parse_recipe
from quantmill.servable import dividing_sizes, partial_groups
from tests.conftest import tiny_recipe


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(tiny_model):
    model = tiny_model("llama")  # inputs: 64 (attention, up/gate) and 128 (down_proj)
    recipe = parse_recipe({"steps": [{"method": "rtn", "weights": {"group_size": 48}}]})
    with pytest.raises(ConfigError) as caught:
        check_recipe(model, recipe)
    message = str(caught.value)
    assert "steps.0.weights.group_size = 48" in message
    assert "model.layers.0.self_attn.q_proj takes 64 inputs" in message
    assert "13 more layers" in message
    assert "64, 128 inputs): 8, 16, 32, 64;" in message
    assert "export.servable: false" in message
    check_recipe(model, recipe, export_format="fake")  # floats on the grid load anywhere
    fine = parse_recipe({"steps": [{"method": "rtn", "weights": {"group_size": 32}}]})
    check_recipe(model, fine)
    assert partial_groups(model, fine.steps) == []


def test_only_the_layers_a_step_selects_count(tiny_model):
    model = tiny_model("llama")
    steps = parse_recipe(
        {"steps": [{"method": "rtn", "weights": {"group_size": 128}, "targets": ["down_proj"]}]}
    ).steps
    assert partial_groups(model, steps) == []  # down_proj takes 128 inputs
    assert dividing_sizes([576, 1536]) == [8, 16, 24, 32, 48, 64, 96, 192]  # SmolLM2


def test_the_packed_writer_refuses_a_partial_group(tmp_path, tiny_model):
    model = tiny_model("llama")
    steps = parse_recipe({"steps": [{"method": "rtn", "weights": {"group_size": 48}}]}).steps
    layers = quantize_model(model, steps, None, 4, False).layers
    with pytest.raises(ExportError, match="--format fake"):
        save_quantized(model, None, layers, tmp_path)


def test_servable_false_writes_floats_on_the_grid_and_the_card_says_why(
    tiny_checkpoint, text_files, tmp_path
):
    recipe = tiny_recipe("rtn", *text_files, group_size=48)
    with pytest.raises(ConfigError, match="group_size = 48"):
        quantize(str(tiny_checkpoint("llama")), recipe, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()  # refused before any work
    recipe = recipe.model_copy(
        update={"export": recipe.export.model_copy(update={"servable": False})}
    )
    out = tmp_path / "out"
    summary = quantize(str(tiny_checkpoint("llama")), recipe, out, progress=False)
    assert summary.serving["format"] == "fake" and summary.serving["servable"] is False
    assert (
        "does not divide model.layers.0.self_attn.q_proj's 64 inputs"
        in summary.serving["reasons"][0]
    )
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / SUMMARY_FILE).read_text())["serving"]["servable"] is False
    card = render_card(CheckpointInfo.load(out))
    assert "Not servable as a quantized model" in card and "floats on the quantization grid" in card


def test_a_float_export_asked_for_is_not_called_unservable(tiny_checkpoint, text_files, tmp_path):
    recipe = tiny_recipe("rtn", *text_files, group_size=48)  # servable: true, the default
    out = tmp_path / "out"
    summary = quantize(
        str(tiny_checkpoint("llama")), recipe, out, export_format="fake", progress=False
    )
    assert summary.serving == {"format": "fake", "servable": True, "reasons": []}
    assert "Not servable" not in render_card(CheckpointInfo.load(out))


@pytest.mark.parametrize("given", [None, "1"])
def test_the_vllm_probe_runs_weight_only_checkpoints_as_written_unless_told(
    given, tmp_path, monkeypatch
):
    """vLLM on AMX CPUs would run a W4A16 checkpoint as W4A8 (and refuse per-channel
    weights of 576 inputs there); the probe turns that off unless the caller set it."""
    import subprocess

    from quantmill.serving import verify

    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setenv("QUANTMILL_VLLM_PYTHON", str(python))
    if given is None:
        monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_INT4_W4A8", given)
    seen = {}

    def run(command, env, **kwargs):
        seen.update(env)
        folder = command[-1]
        line = verify.MARK + json.dumps({"folder": folder, "loaded": False, "reason": "x"})
        return subprocess.CompletedProcess(command, 0, stdout=line + "\n", stderr="")

    monkeypatch.setattr(verify.subprocess, "run", run)
    (result,) = verify.probe_vllm([tmp_path])
    assert result["reason"] == "x"
    assert seen["VLLM_CPU_INT4_W4A8"] == (given or "0")
