"""Shared calibration statistics (non-sequential GPTQ) and the file cache."""

from __future__ import annotations

import pytest
import torch

from quantmill.cache import cache_key, cached_file
from quantmill.driver import quantize_model
from quantmill.recipe import parse_recipe, with_overrides
from quantmill.stats import StatisticsFile, collect_statistics, save_statistics


def gptq_steps(sequential: bool):
    recipe = parse_recipe(
        {"steps": [{"method": "gptq", "sequential": sequential, "weights": {"group_size": 16}}]}
    )
    return recipe.steps


def test_statistics_cover_every_linear_and_round_trip(tiny_model, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (6, 16))
    stats = collect_statistics(model, ids, batch_size=3, progress=False)
    save_statistics(stats, tmp_path / "s.safetensors")
    saved = StatisticsFile(tmp_path / "s.safetensors")
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    ]
    assert len(names) == 14 and saved.samples == 6
    for name in names:
        assert torch.equal(saved.hessian(name), stats.hessian(name))
        assert saved.absmax(name).shape == (model.get_submodule(name).in_features,)
    # q, k and v read one input: one Hessian, stored once
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert saved.groups[q] == saved.groups[k]
    assert len([key for key in saved.keys if key.startswith("hessian/")]) == 8
    with pytest.raises(KeyError, match="no statistics for layer"):
        saved.hessian("model.layers.9.mlp.up_proj")


def test_absmax_is_the_largest_input_magnitude(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (4, 16))
    seen = {}
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    stats = collect_statistics(model, ids, batch_size=4, progress=False)
    expected = seen["x"].reshape(-1, seen["x"].shape[-1]).abs().amax(dim=0)
    assert torch.allclose(stats.absmax["model.layers.1.mlp.down_proj"], expected, atol=1e-5)


def test_shared_statistics_replace_calibration_passes(tiny_model, tmp_path):
    """Non-sequential GPTQ from a statistics file needs no calibration ids and gives the
    same weights as collecting the same statistics in place."""
    ids = torch.randint(0, 320, (6, 16))
    inline = tiny_model("llama")
    quantize_model(inline, gptq_steps(False), ids, batch_size=3, progress=False)
    source = tiny_model("llama")
    save_statistics(collect_statistics(source, ids, 3, False), tmp_path / "s.safetensors")
    shared = tiny_model("llama")
    quantize_model(
        shared,
        gptq_steps(False),
        None,
        progress=False,
        statistics=StatisticsFile(tmp_path / "s.safetensors"),
    )
    for (name, a), (_, b) in zip(inline.named_parameters(), shared.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    sequential = tiny_model("llama")
    quantize_model(sequential, gptq_steps(True), ids, batch_size=3, progress=False)
    # block 1 of the sequential run saw quantized inputs: its result differs
    assert not torch.equal(
        sequential.model.layers[1].mlp.down_proj.weight, shared.model.layers[1].mlp.down_proj.weight
    )


def test_cached_file_produces_once_and_never_exposes_a_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path))
    calls = []

    def produce(path):
        calls.append(path)
        path.write_text("done")

    key = cache_key(model="abc", spec={"n": 1})
    first, hit1 = cached_file("things", key, "x.txt", produce)
    second, hit2 = cached_file("things", key, "x.txt", produce)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and first == second
    assert first.read_text() == "done"

    def broken(path):
        path.write_text("half")
        raise RuntimeError("interrupted")

    other = cache_key(model="abc", spec={"n": 2})
    assert other != key
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_file("things", other, "x.txt", broken)
    assert list((tmp_path / "things" / other).iterdir()) == []


def test_recipe_overrides_replace_data_settings_and_validate():
    recipe = parse_recipe({"steps": [{"method": "rtn"}]})
    changed = with_overrides(recipe, calib_data="c.txt", calib_samples=4, eval_windows=0)
    assert changed.calibration.dataset == "c.txt" and changed.calibration.num_samples == 4
    assert changed.evaluation.max_windows is None and recipe.calibration.num_samples == 128
    with pytest.raises(ValueError, match="calibration.num_samples = 0"):
        with_overrides(recipe, calib_samples=0)
