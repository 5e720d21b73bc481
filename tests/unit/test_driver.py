"""The sequential driver on tiny random models of every supported architecture."""

import pytest
import torch
from torch import nn

from quantmill.arch import ARCHITECTURES, arch_for, block_linears, decoder_blocks
from quantmill.driver import quantize_model
from quantmill.errors import CalibrationDataError, UnsupportedArchitectureError
from quantmill.layers import get_weight
from quantmill.quant.grid import fake_quantize
from quantmill.recipe import parse_recipe

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox", "phi3", "gemma2",
         "gemma3_text"]  # fmt: skip


def steps(method: str, **weights):
    return parse_recipe({"steps": [{"method": method, "weights": weights}]}).steps


def calib(n=8, seq=32, vocab=256):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_block_linear_is_quantized_onto_its_grid(tiny_model, model_type, method):
    model = tiny_model(model_type)
    outcome = quantize_model(model, steps(method, bits=4, group_size=16), calib(), 4, False)
    spec = arch_for(model)
    n_blocks = len(decoder_blocks(model, spec))
    assert len(outcome.layers) == n_blocks * len(spec.linears)
    for name, quant in outcome.layers.items():
        W = get_weight(model.get_submodule(name), spec.conv1d).float()
        assert torch.allclose(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W, atol=1e-6)
    assert all(r.loss >= 0 for r in outcome.reports)
    assert not any(
        hasattr(m, "_forward_pre_hooks") and m._forward_pre_hooks for m in model.modules()
    )


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_gptq_beats_rtn_on_model_outputs(tiny_model, model_type):
    ids = calib(16, 32)
    reference = tiny_model(model_type)
    with torch.no_grad():
        target = reference(ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model(model_type)
        quantize_model(model, steps(method, bits=3, group_size=16), ids, 8, False)
        with torch.no_grad():
            errors[method] = float((model(ids).logits - target).square().mean())
    assert errors["gptq"] < errors["rtn"]


def test_block_1_is_calibrated_on_block_0s_quantized_outputs(tiny_model):
    """The sequential driver feeds block 1 what the *quantized* block 0 computes: against
    statistics of the float model (``sequential: false``), block 0 (same inputs either
    way) quantizes the same, block 1 does not."""
    from quantmill.stats import collect_statistics

    ids = calib()

    def gptq(sequential: bool):
        return parse_recipe(
            {"steps": [{"method": "gptq", "sequential": sequential,
                        "weights": {"bits": 2, "group_size": 16}}]}
        ).steps  # fmt: skip

    chained = tiny_model("llama")
    quantize_model(chained, gptq(True), ids, 4, False)
    floats = tiny_model("llama")
    statistics = collect_statistics(floats, ids, 4, progress=False)
    quantize_model(floats, gptq(False), None, 4, False, statistics=statistics)

    def differing(block: int) -> float:
        a = chained.model.layers[block].mlp.down_proj.weight
        b = floats.model.layers[block].mlp.down_proj.weight
        return (a != b).float().mean().item()

    assert differing(0) < 0.01  # the same inputs: the same grid points (float noise aside)
    assert differing(1) > 0.05  # inputs from the quantized block 0 moved its choices


def test_targets_and_ignore_limit_what_is_quantized(tiny_model):
    model = tiny_model("llama")
    original = {n: p.clone() for n, p in model.named_parameters()}
    recipe_steps = parse_recipe(
        {"steps": [{"method": "rtn", "targets": ["re:.*mlp.*"], "ignore": ["*.down_proj"]}]}
    ).steps
    outcome = quantize_model(model, recipe_steps, None, 4, False)
    assert sorted({n.split(".")[-1] for n in outcome.layers}) == ["gate_proj", "up_proj"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, original[n])}
    assert changed == {f"{n}.weight" for n in outcome.layers}


def test_rtn_needs_no_calibration_but_gptq_does(tiny_model):
    quantize_model(tiny_model(), steps("rtn"), None, 4, False)
    with pytest.raises(CalibrationDataError, match="calibration"):
        quantize_model(tiny_model(), steps("gptq"), None, 4, False)
    with pytest.raises(CalibrationDataError):
        quantize_model(tiny_model(), steps("gptq"), torch.empty(0, 32, dtype=torch.long), 4, False)


def test_unsupported_architecture_lists_the_supported_ones():
    class Toy(nn.Module):
        class config:
            model_type = "mamba"

    with pytest.raises(UnsupportedArchitectureError) as info:
        arch_for(Toy())
    for name in ARCHITECTURES:
        assert name in str(info.value)


def test_mismatched_architecture_table_entry_is_reported(tiny_model):
    model = tiny_model("llama")
    block = decoder_blocks(model, arch_for(model))[0]
    del block.mlp.down_proj
    with pytest.raises(UnsupportedArchitectureError, match="does not match"):
        block_linears(block, arch_for(model))


def test_non_positive_definite_hessian_falls_back_to_rtn(tiny_model, monkeypatch):
    import quantmill.methods.gptq as gptq_method
    from quantmill.quant.gptq import HessianNotPositiveDefinite

    def refuse(*args, **kwargs):
        raise HessianNotPositiveDefinite("H + λI is not positive definite")

    monkeypatch.setattr(gptq_method, "gptq_quantize_weight", refuse)
    model = tiny_model("llama")
    outcome = quantize_model(model, steps("gptq", bits=4, group_size=16), calib(), 4, False)
    assert all(r.extra.get("fallback") == "rtn" for r in outcome.reports)
    name, quant = next(iter(outcome.layers.items()))
    W = get_weight(model.get_submodule(name), False)
    assert torch.allclose(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W)
