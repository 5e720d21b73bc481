"""Every kind of checkpoint we write, loaded by vLLM's CPU build from its own venv
(``scripts/vllm-venv.sh``, run by ``scripts/test.sh``) and compared with transformers.

One vLLM process loads the five checkpoints in turn (RTN on SmolLM2's first
blocks: what is checked is the format, not the depth)."""

import json

import pytest

from quantmill.driver import quantize_model
from quantmill.export.checkpoint import save_quantized
from quantmill.recipe import parse_recipe
from quantmill.serving.verify import verify_vllm, vllm_python

KINDS = {
    "sym-group": [{"method": "rtn", "weights": {"bits": 4, "group_size": 64}}],
    "asym-group": [{"method": "rtn", "weights": {"bits": 4, "group_size": 64, "symmetric": False}}],
    "channel": [{"method": "rtn", "weights": {"bits": 4, "group_size": None}}],
    "w8a8": [
        {"method": "rtn", "weights": {"bits": 8, "group_size": None}, "activations": {"bits": 8}}
    ],
    "llm-int8": [{"method": "llm_int8"}],
}


@pytest.fixture(scope="module")
def verdicts(short_smollm2, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        vllm_python()
    except Exception as exc:  # scripts/test.sh installs it; a bare pytest may not have it
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = AutoTokenizer.from_pretrained(short_smollm2)
    calib = tokenizer(["The capital of France is Paris. " * 8] * 4, return_tensors="pt").input_ids
    folders = {}
    for kind, steps in KINDS.items():
        model = AutoModelForCausalLM.from_pretrained(short_smollm2).eval()
        outcome = quantize_model(model, parse_recipe({"steps": steps}).steps, calib, 4, False)
        save_quantized(model, tokenizer, outcome.layers, root / kind)
        folders[kind] = root / kind
    results = verify_vllm(list(folders.values()))
    return {kind: result for kind, result in zip(folders, results, strict=True)}, folders


@pytest.mark.parametrize("kind", ["sym-group", "asym-group", "channel", "w8a8"])
def test_vllm_serves_each_scheme_we_write_and_chooses_what_transformers_does(verdicts, kind):
    result = verdicts[0][kind]
    assert result["loaded"], result["reason"]
    assert result["ok"], result["reason"]
    assert len(result["token_ids"]) == 8
    assert result["ranks"][0] == 0  # the first token is transformers' choice
    assert result["agree"] >= 6  # the rest: equal, or near ties of bfloat16 arithmetic
    kernel = "CPUInt8ScaledMMLinearKernel" if kind == "w8a8" else "CPUWNA16LinearKernel"
    assert kernel in result["kernels"]


def test_asymmetric_weights_are_written_as_group_with_packed_zero_points(verdicts):
    config = json.loads((verdicts[1]["asym-group"] / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["weights"]["strategy"] == "group" and group["weights"]["symmetric"] is False


def test_llm_int8_is_refused_with_the_reason(verdicts):
    result = verdicts[0]["llm-int8"]
    assert not result["ok"]
    assert "outlier decomposition" in result["reason"]
