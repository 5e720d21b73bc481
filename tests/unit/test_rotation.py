"""Rotations (QuaRot-style): the Hadamard constructions, the float model unchanged by
the folded rotation, the rotated-then-quantized checkpoint reloaded exactly, and the
refusals before work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantmill.api import quantize
from quantmill.config import EngineSpec
from quantmill.data import calibration_ids
from quantmill.driver import quantize_model
from quantmill.errors import ConfigError
from quantmill.lazy import LazyModel
from quantmill.models import load_tokenizer
from quantmill.quant.hadamard import hadamard, random_hadamard
from quantmill.recipe import parse_recipe
from quantmill.rotation import write_rotated
from quantmill.sources import resolve_model
from quantmill.weights import WeightFiles
from tests.conftest import tiny_config, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 104, 576, 1536])
def test_hadamard_orders_we_build_are_hadamard(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    Q = random_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_orders_without_a_construction_say_so():
    assert hadamard(9) is None and hadamard(116) is None


def source(tmp_path, model_type="llama", tied=True, dtype=torch.float32, **sizes):
    config = tiny_config(model_type)
    config.tie_word_embeddings = tied
    for key, value in sizes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # norms that are not all ones, so folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    folder = tmp_path / f"{model_type}-source"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


PROBE = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "model_type,tied,kind",
    [
        ("llama", True, "hadamard"),
        ("llama", False, "orthogonal"),
        ("qwen2", True, "hadamard"),  # biases on q, k, v
        ("qwen3", True, "hadamard"),  # norms on q and k heads
        ("phi3", False, "hadamard"),  # fused qkv: the value heads are not rotated
        ("mistral", True, "hadamard"),
    ],
)
def test_the_rotated_float_model_computes_the_same_logits(tmp_path, model_type, tied, kind):
    folder, model = source(tmp_path, model_type, tied)
    lazy = LazyModel.open(folder, CPU, torch.float32)
    out = write_rotated(lazy, tmp_path / "rotated", kind, seed=3, heads=True, progress=False)
    rotated = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        want, got = model(PROBE).logits, rotated(PROBE).logits
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4), (want - got).abs().max()
    files = WeightFiles(out)
    assert not torch.allclose(
        files.read("model.embed_tokens.weight"), model.model.embed_tokens.weight
    )  # rotated, not copied
    assert torch.equal(
        files.read("model.layers.1.input_layernorm.weight"),
        torch.ones(model.config.hidden_size),
    )  # folded into q, k, v


def test_a_complete_rotation_is_reused_and_another_rewritten(tmp_path):
    folder, _ = source(tmp_path)
    lazy = LazyModel.open(folder, CPU, torch.float32)
    out = write_rotated(lazy, tmp_path / "rotated", "hadamard", 0, True, progress=False)
    first = (out / "model.safetensors").stat().st_mtime_ns
    write_rotated(lazy, out, "hadamard", 0, True, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    write_rotated(lazy, out, "hadamard", 1, True, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns != first


def rotate_recipe(text_files, bits=4, **rotate):
    calib, evaluation = text_files
    return parse_recipe(
        {
            "steps": [
                {"method": "rotate", **rotate},
                {"method": "rtn", "weights": {"bits": bits, "group_size": 16}},
            ],
            "calibration": {"dataset": str(calib), "num_samples": 8, "seq_len": 32},
            "evaluation": {"dataset": str(evaluation), "seq_len": 64, "max_windows": 4},
        }
    )


def test_rotate_then_rtn_packed_reloads_as_computed_in_memory(tmp_path, text_files):
    folder, model = source(tmp_path, dtype=torch.bfloat16)
    recipe = rotate_recipe(text_files)
    out = tmp_path / "out"
    summary = quantize(
        str(folder), recipe, out, progress=False, evaluate=False,
        engine=EngineSpec(max_shard_size="60KB"),
    )  # fmt: skip
    assert not (out.parent / ".out.journal").exists()  # the rotated copy went with it
    lazy = LazyModel.open(folder, CPU, torch.bfloat16)
    rotated = write_rotated(lazy, tmp_path / "rotated", "hadamard", 0, True, progress=False)
    memory = AutoModelForCausalLM.from_pretrained(rotated, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(resolve_model(str(folder)))
    steps = recipe.quantizing_steps()
    quantize_model(memory, steps, calibration_ids(tokenizer, recipe.calibration), 4, False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(memory(PROBE).logits, reloaded(PROBE).logits)
    assert [s["method"] for s in summary.recipe["steps"]] == ["rotate", "rtn"]
    assert all(layer["method"] == "rtn" for layer in summary.layers)


def outlier_model(tmp_path):
    """A llama whose layers reading the residual stream have four outlier input
    columns (ten times the rest), which a rotation spreads over every column."""
    folder, model = source(tmp_path)
    with torch.no_grad():
        for block in model.model.layers:
            for layer in (
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.mlp.gate_proj,
                block.mlp.up_proj,
            ):
                layer.weight[:, :4] *= 10  # fmt: skip
    model.save_pretrained(folder)
    return folder, model


def test_rotation_lowers_rtns_error_on_outlier_channels(tmp_path, text_files):
    folder, model = outlier_model(tmp_path)
    errors = {}
    for name, steps in {
        "rtn": [{"method": "rtn", "weights": {"bits": 3, "group_size": 64}}],
        "rotate+rtn": [
            {"method": "rotate"},
            {"method": "rtn", "weights": {"bits": 3, "group_size": 64}},
        ],
    }.items():
        recipe = parse_recipe({"steps": steps})
        out = tmp_path / name
        quantize(str(folder), recipe, out, progress=False, evaluate=False, export_format="fake")
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            errors[name] = float((got(PROBE).logits - model(PROBE).logits).square().mean())
    assert errors["rotate+rtn"] < 0.7 * errors["rtn"], errors  # measured: 0.53


@pytest.mark.parametrize(
    "steps,match",
    [
        ([{"method": "rtn"}, {"method": "rotate"}], "steps.1.method: rotate rewrites the whole"),
        ([{"method": "rotate"}], "quantizes nothing by itself"),
        (
            [{"method": "rotate"}, {"method": "gptq", "sequential": False}],
            "steps.1.sequential: false reads the original",
        ),
        ([{"method": "rotate", "targets": ["*.q_proj"]}, {"method": "rtn"}], "whole model"),
        ([{"method": "rotate", "kind": "spiral"}, {"method": "rtn"}], "steps.0.kind"),
    ],
)
def test_recipes_that_cannot_rotate_are_refused(steps, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe({"steps": steps})


@pytest.mark.parametrize("model_type", ["opt", "gemma2", "qwen3_moe"])
def test_architectures_without_a_rotation_table_are_refused_before_work(model_type, tiny_model):
    from quantmill.api import check_recipe

    recipe = parse_recipe({"steps": [{"method": "rotate"}, {"method": "rtn"}]})
    with pytest.raises(ConfigError, match="steps.0.method: rotate needs the architecture's"):
        check_recipe(tiny_model(model_type), recipe, "fake")


def test_a_width_without_a_hadamard_matrix_names_it_and_the_way_out():
    from quantmill.api import check_recipe

    config = tiny_config("llama")
    config.hidden_size, config.num_attention_heads = 116, 4
    model = AutoModelForCausalLM.from_config(config)
    recipe = parse_recipe({"steps": [{"method": "rotate"}, {"method": "rtn"}]})
    with pytest.raises(ConfigError, match="hidden_size = 116.*use kind: orthogonal"):
        check_recipe(model, recipe, "fake")
    orthogonal = parse_recipe(
        {"steps": [{"method": "rotate", "kind": "orthogonal"}, {"method": "rtn"}]}
    )
    check_recipe(model, orthogonal, "fake")
