"""AutoRound on tiny models: the grid math, the block output error against RTN, the
export of the trained grid, and the refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantmill.api import quantize
from quantmill.config import EngineSpec, QuantScheme
from quantmill.data import calibration_ids
from quantmill.driver import quantize_model
from quantmill.errors import ConfigError
from quantmill.models import load_tokenizer
from quantmill.quant.autoround import autoround_grid, autoround_weight
from quantmill.quant.grid import compute_qparams, fake_quantize
from quantmill.quant.grid import quantize as to_ints
from quantmill.recipe import parse_recipe
from quantmill.sources import resolve_model
from tests.conftest import tiny_config, tiny_tokenizer

IDS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("symmetric", [True, False])
def test_no_offsets_and_full_ranges_are_rtns_minmax_grid(symmetric):
    scheme = QuantScheme(bits=4, group_size=16, symmetric=symmetric, observer="minmax")
    W = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))  # a partial group
    ones = torch.ones(12, 3)
    scale, zero = autoround_grid(W, ones, ones, scheme)
    want_scale, want_zero = compute_qparams(W, scheme)
    assert torch.equal(scale, want_scale)
    assert (zero is None and want_zero is None) or torch.equal(zero, want_zero)
    got = autoround_weight(W, torch.zeros_like(W), ones, ones, scheme)
    assert torch.equal(got, fake_quantize(W, want_scale, want_zero, scheme))


def test_an_offset_moves_a_weight_to_the_next_step_and_gradients_reach_every_parameter():
    scheme = QuantScheme(bits=4, group_size=8, symmetric=False, observer="minmax")
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    V = torch.zeros_like(W, requires_grad=True)
    alpha = torch.ones(4, 1, requires_grad=True)
    beta = torch.ones(4, 1, requires_grad=True)
    base = autoround_weight(W, V, alpha, beta, scheme)
    base.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (V, alpha, beta))
    scale, _ = autoround_grid(W, alpha, beta, scheme)
    nudged = V.detach().clone()
    frac = W / scale.detach() - torch.floor(W / scale.detach())
    i, j = int((frac - 0.45).abs().argmin() // 8), int((frac - 0.45).abs().argmin() % 8)
    nudged[i, j] = 0.1  # 0.45 + 0.1 rounds up instead of down
    moved = autoround_weight(W, nudged, alpha.detach(), beta.detach(), scheme)
    step = float(scale[i, 0])
    assert float(moved[i, j] - base[i, j]) == pytest.approx(step, rel=1e-4)


def autoround_recipe(text_files, **settings):
    calib, evaluation = text_files
    step = {"method": "autoround", "weights": {"bits": 3, "group_size": 16}, "iters": 40,
            "batch_size": 4, **settings}  # fmt: skip
    return parse_recipe(
        {
            "steps": [step],
            "calibration": {"dataset": str(calib), "num_samples": 8, "seq_len": 32},
            "evaluation": {"dataset": str(evaluation), "seq_len": 64, "max_windows": 4},
        }
    )


def test_autoround_lowers_every_blocks_output_error_below_rtn(tiny_model, text_files):
    recipe = autoround_recipe(text_files)
    outcome = quantize_model(tiny_model("llama"), recipe.steps, IDS, 4, False)
    blocks = [r for r in outcome.reports if r.method == "autoround-block"]
    assert [r.name for r in blocks] == ["model.layers.0", "model.layers.1"]
    for report in blocks:
        assert report.loss < 0.9 * report.extra["initial_loss"], report
        assert report.extra["kept"] == "tuned"
    # the grids handed on are the trained ones: every weight lies on its layer's grid
    model = tiny_model("llama")
    outcome = quantize_model(model, recipe.steps, IDS, 4, False)
    for name, quant in outcome.layers.items():
        W = model.get_submodule(name).weight.detach().float()
        on_grid = fake_quantize(W, quant.scale, quant.zero, quant.scheme)
        assert torch.equal(W, on_grid), name


def test_zero_steps_and_a_bad_rate_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"steps\.0\.iters"):
        parse_recipe({"steps": [{"method": "autoround", "iters": 0}]})
    with pytest.raises(ConfigError, match=r"steps\.0\.lr"):
        parse_recipe({"steps": [{"method": "autoround", "lr": 0}]})
    with pytest.raises(ConfigError, match=r"steps\.0\.weights\.observer: mse does not apply"):
        parse_recipe({"steps": [{"method": "autoround", "weights": {"observer": "mse"}}]})


def test_gpt2s_conv1d_layers_are_refused_before_work(tiny_model):
    from quantmill.driver import build_methods

    recipe = parse_recipe({"steps": [{"method": "autoround"}]})
    with pytest.raises(ConfigError, match="steps.0.method: autoround trains nn.Linear"):
        build_methods(tiny_model("gpt2"), recipe.steps)


def test_autoround_on_the_engine_packs_the_trained_grid_exactly(tmp_path, text_files):
    torch.manual_seed(0)
    source = tmp_path / "source"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    recipe = autoround_recipe(text_files, iters=10)
    out = tmp_path / "out"
    summary = quantize(str(source), recipe, out, progress=False, evaluate=False,
                       engine=EngineSpec(max_shard_size="60KB"))  # fmt: skip
    memory = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = calibration_ids(load_tokenizer(resolve_model(str(source))), recipe.calibration)
    outcome = quantize_model(memory, recipe.steps, ids, recipe.calibration.batch_size, False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(memory(IDS).logits, reloaded(IDS).logits)
    blocks = [r for r in summary.layers if r["method"] == "autoround-block"]
    assert len(blocks) == 2 and all(r["loss"] <= r["extra"]["initial_loss"] for r in blocks)
    for name, quant in outcome.layers.items():  # integers in range: the packed grid holds them
        q = to_ints(memory.get_submodule(name).weight.detach(), quant.scale, quant.zero,
                    quant.scheme)  # fmt: skip
        assert int(q.min()) >= quant.scheme.q_min and int(q.max()) <= quant.scheme.q_max
