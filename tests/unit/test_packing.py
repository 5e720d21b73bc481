"""Round trips through the compressed-tensors compressors the export uses."""

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor

from quantmill.config import QuantScheme
from quantmill.export.compressed import build_schemes, compression_format
from quantmill.layers import LayerQuant
from quantmill.quant.grid import compute_qparams, fake_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [None, 32, 48])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compress_decompress_round_trip(bits, group_size, symmetric):
    torch.manual_seed(bits)
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    rows, cols = 24, 96  # 96 = 2 × 48: the 48 case packs a partial 32-value word
    W = torch.randn(rows, cols)
    scale, zero = compute_qparams(W, scheme)
    Wq = fake_quantize(W, scale, zero, scheme)
    ct_scheme = build_schemes({"layer": LayerQuant(scheme, scale, zero)}, {"layer": cols})[
        "group_0"
    ]
    compressor = BaseCompressor.get_value_from_registry(compression_format(scheme).value)
    assert ct_scheme.format == compression_format(scheme).value
    state = {"weight": Wq, "weight_scale": scale.half()}
    if zero is not None:
        state["weight_zero_point"] = zero.to(torch.int8)
    packed = compressor.compress(state, ct_scheme)
    assert packed["weight_packed"].dtype == torch.int32  # weight-only: packed, 8 bits too
    # compressed-tensors 0.17 (the pinned one) packs 32 // bits values per word
    words = -(-cols // (32 // bits))
    assert packed["weight_packed"].shape == (rows, words)
    assert packed["weight_scale"].dtype == torch.float16  # stored as written
    # transformers loads the float16 scale into the model's float32 parameter first
    packed["weight_scale"] = packed["weight_scale"].float()
    restored = compressor.decompress(packed, ct_scheme)["weight"]
    assert torch.equal(restored, Wq)


def test_weight_only_is_packed_and_eight_bit_with_activations_is_int8():
    """vLLM reads int-quantized as W8A8 and refuses it without activation settings."""
    assert compression_format(QuantScheme(bits=8), at_run_time=True).value == "int-quantized"
    for bits in (2, 3, 4, 8):
        assert compression_format(QuantScheme(bits=bits)).value == "pack-quantized"
