"""Mixed precision under a bits budget: the solver, the recipe's rules, and a run on a
tiny model whose checkpoint holds several schemes and whose saved recipe reproduces it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantmill.api import quantize
from quantmill.config import EngineSpec, QuantScheme
from quantmill.errors import ConfigError
from quantmill.folder import RECIPE_FILE, weight_files
from quantmill.quant.budget import LayerChoice, average_bits, scheme_cost, solve_budget
from quantmill.recipe import load_recipe, parse_recipe
from tests.conftest import tiny_config, tiny_tokenizer


def test_a_schemes_cost_is_what_the_packed_checkpoint_stores(tmp_path, tiny_model):
    assert scheme_cost(QuantScheme(bits=4, group_size=64), 576) == 4.25
    # 3-bit: 10 values to an int32 word (576 → 58 words), zero points packed alike
    assert scheme_cost(QuantScheme(bits=3, group_size=64, symmetric=False), 576) == pytest.approx(
        (58 * 32 + 9 * 16 + 9 * 3.2) / 576
    )
    assert scheme_cost(QuantScheme(bits=4, group_size=None), 512) == 4 + 16 / 512
    from quantmill.driver import quantize_model
    from quantmill.evaluate import bits_per_weight
    from quantmill.export.checkpoint import save_quantized

    model = tiny_model("llama")  # the cost of every layer against the bytes written
    steps = parse_recipe({"steps": [{"method": "rtn", "weights": {"bits": 3, "group_size": 16}}]})
    outcome = quantize_model(model, steps.steps, None, 4, False)
    save_quantized(model, None, outcome.layers, tmp_path)
    sizes = {n: model.get_submodule(n).weight.shape for n in outcome.layers}
    want = sum(r * c * scheme_cost(outcome.layers[n].scheme, c) for n, (r, c) in sizes.items())
    total = sum(r * c for r, c in sizes.values())
    shapes = 128 * len(sizes)  # each packed layer's weight_shape: two int64
    assert bits_per_weight(tmp_path) == pytest.approx((want + shapes) / total)


def random_layers(count: int, seed: int) -> list[LayerChoice]:
    rng = random.Random(seed)
    layers = []
    for i in range(count):
        n = rng.choice([4096, 16384, 65536])
        base = rng.uniform(0.1, 10)
        layers.append(LayerChoice(f"l{i}", n, (3.25, 4.25, 8.25), (base, base / 3, base / 40)))
    return layers


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [3.3, 3.5, 4.0, 5.0])
def test_the_budget_is_never_exceeded_and_missed_by_less_than_one_layer(seed, target):
    layers = random_layers(40, seed)
    chosen = solve_budget(layers, target)
    reached = average_bits(layers, chosen)
    assert reached <= target + 1e-9
    total = sum(layer.weights for layer in layers)
    # what is left unspent is less than the cheapest upgrade still open
    upgrades = [
        layer.weights * (layer.costs[j] - layer.costs[chosen[layer.name]])
        for layer in layers
        for j in range(3)
        if layer.costs[j] > layer.costs[chosen[layer.name]]
    ]
    assert (target - reached) * total < min(upgrades, default=float("inf"))


def test_the_bits_go_where_they_remove_the_most_error():
    layers = [
        LayerChoice("loud", 1000, (3.0, 4.0), (100.0, 10.0)),
        LayerChoice("quiet", 1000, (3.0, 4.0), (1.0, 0.5)),
    ]
    assert solve_budget(layers, 3.5) == {"loud": 1, "quiet": 0}
    with pytest.raises(ValueError, match="cheapest allowed schemes take 3.000"):
        solve_budget(layers, 2.9)


MIXED = {  # on the tiny llama a group of 16 adds 1 bit: these cost 4 and 5 bits a weight
    "target_bits_per_weight": 4.5,
    "schemes": [{"bits": 3, "group_size": 16}, {"bits": 4, "group_size": 16}],
}


def test_a_budget_below_the_smallest_scheme_is_refused_naming_the_field():
    bad = {**MIXED, "target_bits_per_weight": 2.5}
    with pytest.raises(ConfigError, match=r"steps\.0\.mixed: target_bits_per_weight = 2.5 is"):
        parse_recipe({"steps": [{"method": "gptq", "mixed": bad}]})
    with pytest.raises(ConfigError, match=r"steps\.1\.mixed: one step"):
        parse_recipe(
            {"steps": [{"method": "gptq", "mixed": MIXED}, {"method": "rtn", "mixed": MIXED}]}
        )
    with pytest.raises(ConfigError, match=r"steps\.0\.mixed\.schemes"):
        parse_recipe(
            {"steps": [{"method": "rtn", "mixed": {**MIXED, "schemes": MIXED["schemes"][:1]}}]}
        )


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "source"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def mixed_recipe(text_files, method="gptq", **mixed):
    calib, evaluation = text_files
    return parse_recipe(
        {
            "steps": [{"method": method, "mixed": {**MIXED, **mixed}}],
            "calibration": {"dataset": str(calib), "num_samples": 8, "seq_len": 32},
            "evaluation": {"dataset": str(evaluation), "seq_len": 64, "max_windows": 4},
        }
    )


def test_a_mixed_checkpoint_holds_both_schemes_and_its_recipe_reproduces_it(
    source, text_files, tmp_path
):
    recipe = mixed_recipe(text_files)
    out = tmp_path / "out"
    summary = quantize(str(source), recipe, out, progress=False, evaluate=False,
                       engine=EngineSpec(max_shard_size="60KB"))  # fmt: skip
    schemes = {r["name"]: r["extra"]["scheme"] for r in summary.layers if r["method"] == "gptq"}
    assert set(schemes.values()) == {"w3g16s", "w4g16s"}
    for block in ("model.layers.0", "model.layers.1"):  # what vLLM fuses has one scheme
        assert len({schemes[f"{block}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert schemes[f"{block}.mlp.gate_proj"] == schemes[f"{block}.mlp.up_proj"]
    original = AutoModelForCausalLM.from_pretrained(source)
    sizes = {n: original.get_submodule(n).weight.numel() for n in schemes}
    per_weight = {"w3g16s": 3 + 16 / 16, "w4g16s": 4 + 16 / 16}  # a float16 scale per 16
    bits = sum(sizes[n] * per_weight[s] for n, s in schemes.items()) / sum(sizes.values())
    assert bits <= 4.5
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32
    )  # transformers loads it
    assert reloaded is not None
    saved = load_recipe(str(out / RECIPE_FILE))
    chosen = saved.steps[0].mixed.chosen
    assert chosen == {n: (0 if s == "w3g16s" else 1) for n, s in schemes.items()}
    from quantmill.card import CheckpointInfo, render_card

    card = render_card(CheckpointInfo.load(out))
    counts = {s: list(schemes.values()).count(s) for s in ("w3g16s", "w4g16s")}
    assert f"{counts['w3g16s']} layers w3g16s, {counts['w4g16s']} layers w4g16s" in card
    again = tmp_path / "again"
    quantize(str(source), saved, again, progress=False, evaluate=False,
             engine=EngineSpec(max_shard_size="60KB"))  # fmt: skip
    assert [f.read_bytes() for f in weight_files(again)] == [
        f.read_bytes() for f in weight_files(out)
    ]


def test_a_budget_only_the_models_shapes_rule_out_is_refused_before_work(tiny_model):
    from quantmill.driver import build_methods

    recipe = parse_recipe(
        {"steps": [{"method": "gptq", "mixed": {**MIXED, "target_bits_per_weight": 3.9}}]}
    )
    with pytest.raises(
        ConfigError, match=r"steps\.0\.mixed\.target_bits_per_weight = 3.9 is below what"
    ):
        build_methods(tiny_model("llama"), recipe.steps)


def test_the_random_baseline_spends_the_same_bits_on_other_layers(source, text_files, tmp_path):
    maps = {}
    for choose in ("sensitivity", "random"):
        # seed 0 happens to draw the very same map on this two-block model
        recipe = mixed_recipe(text_files, "rtn", choose=choose, seed=1)
        summary = quantize(str(source), recipe,
                           tmp_path / choose, progress=False, evaluate=False)  # fmt: skip
        maps[choose] = {r["name"]: r["extra"]["scheme"] for r in summary.layers}
    original = AutoModelForCausalLM.from_pretrained(source)
    weights = {
        choose: {
            scheme: sum(
                original.get_submodule(n).weight.numel() for n, s in m.items() if s == scheme
            )
            for scheme in ("w3g16s", "w4g16s")
        }
        for choose, m in maps.items()
    }
    assert weights["sensitivity"] == weights["random"]  # the same bits
    assert maps["sensitivity"] != maps["random"]  # on other layers
