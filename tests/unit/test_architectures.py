"""Architectures beyond Llama's layout: Phi-3's fused layers, Gemma's norms and its
two kinds of attention block; each quantized, written packed and reloaded by
transformers with the logits of the in-memory model."""

import pytest
import torch

from quantmill.arch import arch_for, decoder_blocks
from quantmill.blocks import capture_block_inputs, run_block
from quantmill.driver import quantize_model
from quantmill.export.checkpoint import save_quantized
from quantmill.recipe import parse_recipe

NEW = ["phi3", "gemma2", "gemma3_text", "qwen3"]
# every dense architecture of the table but GPT-2, whose packed export is refused
DENSE = ["llama", "mistral", "qwen2", "opt", "gpt_neox", *NEW]


def ids(n=8, seq=32):
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "model_type,method",
    # GPT-NeoX has no mapping table: AWQ refuses it before work, as it does GPT-2
    [(t, "gptq") for t in DENSE] + [(t, "awq") for t in DENSE if t != "gpt_neox"],
)
def test_packed_checkpoint_reloads_with_the_in_memory_logits(
    tmp_path, tiny_model, model_type, method
):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    steps = parse_recipe(
        {"steps": [{"method": method, "weights": {"bits": 4, "group_size": 16}}]}
    ).steps
    outcome = quantize_model(model, steps, ids(), 4, False)
    spec = arch_for(model)
    assert len(outcome.layers) == len(decoder_blocks(model, spec)) * len(spec.linears)
    save_quantized(model, None, outcome.layers, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    probe = ids(2, 24)
    with torch.no_grad():
        assert torch.equal(model(probe).logits, reloaded(probe).logits)


def _last_block_output(model, probe):
    """What the model's last decoder block returns in its own forward."""
    seen = []
    block = decoder_blocks(model, arch_for(model))[-1]
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(probe)
    handle.remove()
    return seen[0][0] if isinstance(seen[0], tuple) else seen[0]


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_each_kind_of_block_runs_with_its_own_mask_and_positions(tiny_model, model_type):
    """Block 1 attends over the full sequence, block 0 over a window of 8: run block by
    block, each gets its kind's arguments and the result is the model's own; with
    block 0's arguments for both (what a first-block capture alone gives) it is not."""
    model = tiny_model(model_type)
    probe = ids(2, 32)
    expected = _last_block_output(model, probe)
    blocks = decoder_blocks(model, arch_for(model))
    inputs = capture_block_inputs(model, blocks[0], probe, 2)
    assert inputs.layer_types == ("sliding_attention", "full_attention")
    wrong = [h.clone() for h in inputs.hidden]
    for index, block in enumerate(blocks):
        inputs.enter(index)
        run_block(block, inputs, keep_outputs=True)
    torch.testing.assert_close(inputs.hidden[0], expected)
    inputs.hidden = wrong
    inputs.enter(0)
    for block in blocks:
        run_block(block, inputs, keep_outputs=True)
    assert not torch.allclose(inputs.hidden[0], expected, atol=1e-3)
    assert list(blocks) == list(decoder_blocks(model, arch_for(model)))  # restored


@pytest.mark.parametrize("model_type", ["gemma2", "phi3"])
@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_smoothing_alone_leaves_the_float_model_unchanged(tiny_model, model_type, method):
    """Gemma's norms scale by 1 + weight: the scales fold into that, not into weight."""
    model = tiny_model(model_type)
    probe = ids(8, 24)
    with torch.no_grad():
        reference = model(probe).logits
    recipe = parse_recipe({"steps": [{"method": method, "smooth_only": True}]})
    outcome = quantize_model(model, recipe.steps, probe, batch_size=4, progress=False)
    smoothed = [r for r in outcome.reports if "skipped" not in r.extra]
    per_block = {"gemma2": 3, "phi3": 2}[model_type]  # Gemma's v → o skipped: 2 kv heads
    assert len(smoothed) == 2 * per_block
    before = tiny_model(model_type).model.layers[0].input_layernorm.weight
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, before)
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, reference, atol=1e-4, rtol=1e-4)


def test_the_streaming_engine_quantizes_gemma_as_the_in_memory_driver_does(tmp_path, text_files):
    """Blocks read one at a time from bfloat16 shards, each kind of block with its own
    arguments: the checkpoint's logits are those of the whole model quantized in memory."""
    from transformers import AutoModelForCausalLM

    from quantmill.api import quantize
    from quantmill.config import EngineSpec
    from quantmill.data import calibration_ids
    from quantmill.models import load_tokenizer
    from quantmill.sources import resolve_model
    from tests.conftest import tiny_config, tiny_recipe, tiny_tokenizer

    torch.manual_seed(0)
    source = tmp_path / "source"
    AutoModelForCausalLM.from_config(tiny_config("gemma2")).to(torch.bfloat16).save_pretrained(
        source, max_shard_size="100KB"
    )
    tiny_tokenizer().save_pretrained(source)
    recipe = tiny_recipe("gptq", *text_files)
    out = tmp_path / "out"
    quantize(str(source), recipe, out, progress=False, evaluate=False,
             engine=EngineSpec(max_shard_size="60KB"))  # fmt: skip
    memory = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    calib = calibration_ids(load_tokenizer(resolve_model(str(source))), recipe.calibration)
    quantize_model(memory, recipe.steps, calib, recipe.calibration.batch_size, False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    probe = ids(2, 24)
    with torch.no_grad():
        assert torch.equal(memory(probe).logits, reloaded(probe).logits)


def test_gpt2_packed_weights_are_stored_in_linear_layout(tmp_path, tiny_model):
    """GPT-2's Conv1D holds [in, out]; the packed checkpoint holds [out, in] (what vLLM's
    GPT-2 reads; tests/serving runs it), values on our grid."""
    from safetensors import safe_open

    from quantmill.layers import get_weight
    from quantmill.quant.grid import fake_quantize

    model = tiny_model("gpt2")  # c_attn: 64 inputs, 192 outputs
    steps = parse_recipe({"steps": [{"method": "rtn", "weights": {"group_size": 16}}]}).steps
    outcome = quantize_model(model, steps, None, 4, False)
    save_quantized(model, None, outcome.layers, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("transformer.h.0.attn.c_attn.weight_packed")
        shape = f.get_tensor("transformer.h.0.attn.c_attn.weight_shape")
        scale = f.get_tensor("transformer.h.0.attn.c_attn.weight_scale")
    assert shape.tolist() == [192, 64] and list(packed.shape) == [192, 64 // 8]
    assert list(scale.shape) == [192, 64 // 16]
    layer = model.transformer.h[0].attn.c_attn
    quant = outcome.layers["transformer.h.0.attn.c_attn"]
    W = get_weight(layer, True).float()  # [out, in]
    assert torch.equal(fake_quantize(W, quant.scale, quant.zero, quant.scheme), W)
    assert torch.allclose(scale.float(), quant.scale.float(), rtol=1e-3)


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "gemma3_text", "qwen3_moe", "mixtral"])
def test_kv_cache_quantization_reaches_the_new_architectures(tiny_model, model_type):
    from quantmill.config import KVCacheSpec
    from quantmill.kv_cache import check_kv_supported, kv_cache_quantized

    model = tiny_model(model_type)
    check_kv_supported(model)
    probe = ids(1, 32)
    with torch.no_grad():
        plain = model(probe).logits
        errors = {}
        for bits in (8, 4):
            with kv_cache_quantized(model, KVCacheSpec(bits=bits)):
                errors[bits] = float((model(probe).logits - plain).abs().mean())
        assert torch.equal(model(probe).logits, plain)  # the wrapper is gone after
    assert 0 < errors[8] < errors[4]
