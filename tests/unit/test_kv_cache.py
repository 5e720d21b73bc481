"""KV-cache quantization: the per-token grid (quant/kv.py) and the attention rewiring."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantmill.kv_cache as kv_cache
from quantmill.config import KVCacheSpec
from quantmill.errors import ConfigError
from quantmill.evaluate import perplexity
from quantmill.kv_cache import check_kv_supported, kv_cache_quantized
from quantmill.quant.kv import fake_quantize_kv, kv_qparams

SHAPE = (2, 4, 16, 32)  # batch, heads, tokens, head_dim


def _kv(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _err(x: torch.Tensor, spec: KVCacheSpec) -> float:
    return float((fake_quantize_kv(x, spec) - x).abs().mean())


# ---- the math ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["token", "head"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_step(bits, symmetric, granularity):
    x = _kv()
    spec = KVCacheSpec(bits=bits, granularity=granularity, symmetric=symmetric)
    scale, zero = kv_qparams(x, spec)
    assert (zero is None) == symmetric
    error = (fake_quantize_kv(x, spec) - x).abs()
    assert torch.all(error <= scale / 2 * (1 + 1e-5) + 1e-7)


def test_scale_shapes_follow_the_granularity():
    x = _kv()
    token, _ = kv_qparams(x, KVCacheSpec(granularity="token"))
    head, _ = kv_qparams(x, KVCacheSpec(granularity="head"))
    assert token.shape == (2, 1, 16, 1)
    assert head.shape == (2, 4, 16, 1)


def test_symmetric_scale_is_absmax_over_q_max():
    x = _kv()
    scale, _ = kv_qparams(x, KVCacheSpec(bits=8, symmetric=True))
    absmax = x.abs().amax(dim=(1, 3), keepdim=True)
    # float16 storage rounds the scale up by at most one float16 step (2^-10 relative)
    assert torch.all(scale <= absmax / 127 * (1 + 2**-9))
    assert torch.all(scale >= absmax / 128)


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_four_bits_err_more_than_eight(granularity):
    x = _kv()
    e8 = _err(x, KVCacheSpec(bits=8, granularity=granularity))
    e4 = _err(x, KVCacheSpec(bits=4, granularity=granularity))
    assert 0 < e8 < e4 / 8


def test_per_head_scales_help_when_heads_differ_in_range():
    x = _kv() * torch.tensor([0.01, 1.0, 10.0, 100.0])[None, :, None, None]

    def per_head(granularity: str) -> torch.Tensor:
        out = fake_quantize_kv(x, KVCacheSpec(bits=8, granularity=granularity))
        return (out - x).abs().mean(dim=(0, 2, 3))

    head, token = per_head("head"), per_head("token")
    assert torch.all(head <= token * (1 + 1e-6))
    # the narrow heads keep their precision instead of rounding to the wide head's step
    assert torch.all(head[:3] < token[:3] / 5)


@pytest.mark.parametrize("granularity", ["token", "head"])
def test_asymmetric_fits_all_positive_data_better(granularity):
    x = _kv().abs() + 0.5
    asym = _err(x, KVCacheSpec(bits=4, granularity=granularity, symmetric=False))
    sym = _err(x, KVCacheSpec(bits=4, granularity=granularity, symmetric=True))
    assert asym < sym / 1.5


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_ranges_give_zeros_not_nans(symmetric):
    x = _kv()
    x[:, :, 3] = 0.0  # one token all zeros, over every head
    out = fake_quantize_kv(x, KVCacheSpec(bits=4, symmetric=symmetric))
    assert torch.isfinite(out).all()
    assert torch.all(out[:, :, 3] == 0)
    assert torch.equal(fake_quantize_kv(torch.zeros(SHAPE), KVCacheSpec()), torch.zeros(SHAPE))


def test_dtype_is_kept():
    x = _kv().to(torch.bfloat16)
    out = fake_quantize_kv(x, KVCacheSpec(bits=8))
    assert out.dtype == torch.bfloat16
    assert float((out.float() - x.float()).abs().max()) < 0.1


def test_refuses_a_tensor_that_is_not_four_dimensional():
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        fake_quantize_kv(torch.zeros(4, 16, 32), KVCacheSpec())


# ---- the rewiring on a tiny Llama -----------------------------------------------------------


@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture
def ids():
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def test_int8_keys_values_change_logits_a_little_and_int4_more(llama, ids):
    before = _logits(llama, ids)
    with kv_cache_quantized(llama, KVCacheSpec(bits=8)):
        kv8 = _logits(llama, ids)
    with kv_cache_quantized(llama, KVCacheSpec(bits=4)):
        kv4 = _logits(llama, ids)
    after = _logits(llama, ids)
    d8, d4 = float((kv8 - before).abs().max()), float((kv4 - before).abs().max())
    assert 0 < d8 < 0.02 * float(before.abs().max())
    assert d4 > 4 * d8
    assert torch.equal(after, before)
    assert llama.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_give_the_same_quantized_logits(llama, ids):
    # Also proves the causal mask survives the rename: without one, eager sees the future.
    spec = KVCacheSpec(bits=4, granularity="head")
    with kv_cache_quantized(llama, spec):
        sdpa = _logits(llama, ids)
    llama.set_attn_implementation("eager")
    with kv_cache_quantized(llama, spec):
        eager = _logits(llama, ids)
    assert llama.config._attn_implementation == "eager"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-4)


def test_the_implementation_is_restored_when_the_body_raises(llama, ids):
    before = _logits(llama, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with kv_cache_quantized(llama, KVCacheSpec(bits=4)):
            assert llama.config._attn_implementation.startswith("quantmill_kv")
            raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(llama, ids), before)


def test_no_spec_changes_nothing(llama, ids):
    before = _logits(llama, ids)
    with kv_cache_quantized(llama, None):
        assert llama.config._attn_implementation == "sdpa"
        assert torch.equal(_logits(llama, ids), before)


def test_the_hook_sees_keys_and_values_per_kv_head(llama, ids, monkeypatch):
    seen: list[tuple[int, ...]] = []

    def spy(t, spec):
        seen.append(tuple(t.shape))
        return fake_quantize_kv(t, spec)

    monkeypatch.setattr(kv_cache, "fake_quantize_kv", spy)
    with kv_cache_quantized(llama, KVCacheSpec()):
        _logits(llama, ids)
    config = llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    # a key and a value per layer, each [batch, kv_heads, tokens, head_dim]
    assert seen == [(2, config.num_key_value_heads, 24, head_dim)] * (2 * config.num_hidden_layers)


def test_perplexity_sees_the_quantized_cache(llama, ids):
    plain = perplexity(llama, ids, progress=False).perplexity
    with kv_cache_quantized(llama, KVCacheSpec(bits=4)):
        kv4 = perplexity(llama, ids, progress=False).perplexity
    assert kv4 != plain
    assert abs(kv4 - plain) < 0.05 * plain


# ---- refusals ---------------------------------------------------------------------------------


def test_an_architecture_without_kv_cache_support_is_refused(tiny_model):
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="kv_cache") as info:
        check_kv_supported(gpt2)
    message = str(info.value)
    assert "evaluation.kv_cache" in message and "'gpt2'" in message
    assert "llama" in message and "ArchSpec" in message
    with pytest.raises(ConfigError, match="kv_cache"):
        with kv_cache_quantized(gpt2, KVCacheSpec()):
            pytest.fail("the body must not run")
    assert gpt2.config._attn_implementation == "sdpa"


def test_an_attention_that_bypasses_the_interface_is_refused(llama):
    from transformers.models.llama.modeling_llama import LlamaAttention

    class HandRolledAttention(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            return nn.functional.scaled_dot_product_attention(
                hidden_states, hidden_states, hidden_states
            ), None

    llama.model.layers[1].self_attn.__class__ = HandRolledAttention
    with pytest.raises(ConfigError, match="HandRolledAttention") as info:
        check_kv_supported(llama)
    assert "evaluation.kv_cache" in str(info.value)


def test_contexts_do_not_nest(llama):
    with kv_cache_quantized(llama, KVCacheSpec(bits=8)):
        with pytest.raises(ConfigError, match="cannot wrap"):
            with kv_cache_quantized(llama, KVCacheSpec(bits=4)):
                pytest.fail("the body must not run")
        assert llama.config._attn_implementation.startswith("quantmill_kv8")
    assert llama.config._attn_implementation == "sdpa"
