import pytest

from quantmill.errors import ConfigError
from quantmill.recipe import load_recipe, parse_recipe, save_recipe
from quantmill.recipes import SHIPPED_DIR

RECIPES = sorted(SHIPPED_DIR.glob("*.yaml"))


def test_example_recipes_exist_and_parse():
    assert len(RECIPES) >= 5
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.steps and recipe.name == path.stem


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_round_trips_through_files(tmp_path, suffix):
    recipe = parse_recipe(
        {
            "name": "two-steps",
            "steps": [
                {"method": "rtn", "weights": {"bits": 8, "group_size": -1}},
                {
                    "method": "gptq",
                    "weights": {"bits": 3, "group_size": 32, "symmetric": False},
                    "actorder": False,
                    "static_groups": True,
                    "dampening": 0.05,
                    "targets": ["re:.*mlp.*"],
                    "ignore": ["lm_head", "*.down_proj"],
                },
            ],
            "calibration": {"dataset": "some.txt", "num_samples": 4, "seq_len": 64, "seed": 3},
        }
    )
    path = tmp_path / f"r{suffix}"
    save_recipe(recipe, path)
    again = load_recipe(path)
    assert again == recipe
    assert again.steps[0].weights.group_size is None  # -1 means per-channel
    assert [type(s).__name__ for s in again.steps] == ["RTNConfig", "GPTQConfig"]


def test_lm_head_is_ignored_by_default():
    step = parse_recipe({"steps": [{"method": "rtn"}]}).steps[0]
    assert not step.selects("lm_head")
    assert step.selects("model.layers.0.mlp.down_proj")


def test_patterns_select_by_glob_and_regex():
    step = parse_recipe(
        {"steps": [{"method": "rtn", "targets": ["re:.*self_attn\\..*"], "ignore": ["*.o_proj"]}]}
    ).steps[0]
    assert step.selects("model.layers.3.self_attn.q_proj")
    assert not step.selects("model.layers.3.self_attn.o_proj")
    assert not step.selects("model.layers.3.mlp.up_proj")


BAD = [
    ({"steps": [{"method": "gptq", "weights": {"bits": 9}}]}, "steps.0.weights.bits", "9"),
    ({"steps": [{"method": "gptq", "weights": {"bits": 1}}]}, "steps.0.weights.bits", "1"),
    (
        {"steps": [{"method": "rtn", "weights": {"group_size": 0}}]},
        "steps.0.weights.group_size",
        "0",
    ),
    ({"steps": [{"method": "gptq", "dampening": -0.1}]}, "steps.0.dampening", "-0.1"),
    ({"steps": [{"method": "gptq", "block_size": 0}]}, "steps.0.block_size", "0"),
    (
        {"steps": [{"method": "gptq", "weights": {"observer": "max"}}]},
        "steps.0.weights.observer",
        "'max'",
    ),
    ({"steps": [{"method": "awq9"}]}, "steps", "awq9"),
    ({"steps": []}, "steps", "at least 1"),
    ({"steps": [{"method": "rtn", "bitz": 4}]}, "steps.0.bitz", "4"),
    (
        {"steps": [{"method": "rtn"}], "calibration": {"num_samples": 0}},
        "calibration.num_samples",
        "0",
    ),
    ({"steps": [{"method": "rtn"}], "calibration": {"seq_len": 2}}, "calibration.seq_len", "2"),
    (
        {"steps": [{"method": "rtn"}], "evaluation": {"max_windows": -3}},
        "evaluation.max_windows",
        "-3",
    ),
    ({"steps": [{"method": "rtn", "targets": ["re:(["]}]}, "steps.0.targets", "bad regular"),
]


@pytest.mark.parametrize("data,field,fragment", BAD, ids=[b[1] for b in BAD])
def test_invalid_values_name_the_field_and_value(data, field, fragment):
    with pytest.raises(ConfigError) as info:
        parse_recipe(data)
    message = str(info.value)
    assert field in message and fragment in message


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(scalar)


def test_what_a_step_needs_is_read_from_its_registry_entry_without_building_it(monkeypatch):
    from quantmill.methods import base, get_method
    from quantmill.recipe import needs_of

    def no_building(*args, **kwargs):
        raise AssertionError("a method was built to read its needs")

    monkeypatch.setattr(base.Method, "__init__", no_building)
    sequential = parse_recipe({"steps": [{"method": "gptq"}]})
    shared = parse_recipe({"steps": [{"method": "gptq", "sequential": False}]})
    no_lkd = parse_recipe({"steps": [{"method": "zeroquant", "lkd_steps": 0}]})
    assert sequential.needs_calibration() and not sequential.uses_shared_statistics()
    assert shared.uses_shared_statistics()
    assert not no_lkd.needs_calibration()
    assert not needs_of(no_lkd.steps[0]).targets
    assert get_method("peqa").base_needs.after == ("rtn", "gptq")


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        (
            [{"method": "llm_qat", "generated_samples": 4}, {"method": "rtn"}],
            "steps.1.method: rtn is a post-training step after a training step",
        ),
        ([{"method": "peqa"}], "steps.0.method: peqa trains the grids of an earlier rtn or gptq"),
        (
            [{"method": "rtn", "targets": ["*.mlp.*"]}, {"method": "peqa"}],
            "steps.1.method: peqa trains the grids of an earlier rtn or gptq",
        ),
    ],
)
def test_step_order_rules_fail_when_the_recipe_is_parsed(steps, fragment):
    with pytest.raises(ConfigError) as info:
        parse_recipe({"steps": steps})
    assert fragment in str(info.value)


def test_peqa_after_rtn_on_the_same_layers_parses():
    recipe = parse_recipe({"steps": [{"method": "rtn"}, {"method": "peqa"}]})
    assert recipe.trains()


def test_shipped_recipes_are_found_by_name_and_files_by_path(tmp_path):
    from quantmill.recipes import find_recipe, shipped_recipes

    assert "gptq-w4g64" in shipped_recipes()
    assert load_recipe("gptq-w4g64").name == "gptq-w4g64"
    own = tmp_path / "gptq-w4g64.yaml"  # a file of the same name is a file, not the shipped one
    own.write_text("name: mine\nsteps: [{method: rtn}]\n")
    assert find_recipe(str(own)) == own and load_recipe(str(own)).name == "mine"
    with pytest.raises(ConfigError, match="shipped recipes: .*gptq-w4g64"):
        load_recipe("no-such-recipe")


def test_overrides_apply_before_the_one_parse(monkeypatch):
    from quantmill import recipe as recipe_module

    parses = []
    real = recipe_module.Recipe.model_validate
    monkeypatch.setattr(
        recipe_module.Recipe,
        "model_validate",
        classmethod(lambda cls, data, **kw: parses.append(1) or real(data, **kw)),
    )
    loaded = load_recipe("gptq-w4g64", calib_samples=3, eval_windows=0, kv_cache="4:head")
    assert parses == [1]
    assert loaded.calibration.num_samples == 3 and loaded.evaluation.max_windows is None
    assert loaded.evaluation.kv_cache.bits == 4
