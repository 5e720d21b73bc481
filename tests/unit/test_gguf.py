"""GGUF export: our grids written bit-exactly as Q4_0/Q4_1/Q8_0, read back with gguf."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from quantmill.driver import quantize_model
from quantmill.errors import ExportError
from quantmill.export.checkpoint import save_quantized
from quantmill.recipe import parse_recipe
from quantmill.serving import gguf_blocks
from quantmill.serving.gguf_export import export_gguf
from quantmill.serving.gguf_meta import ARCHS
from tests.conftest import tiny_tokenizer

RNG = np.random.default_rng(0)


def test_q4_0_and_q8_0_round_trip_and_are_what_ggml_dequantizes():
    q4 = RNG.integers(-8, 8, (6, 96)).astype(np.int8)
    q8 = RNG.integers(-128, 128, (6, 96)).astype(np.int8)
    scale = (RNG.random((6, 3)) * 0.05 + 1e-3).astype(np.float16)
    for q, pack, unpack, kind in (
        (q4, gguf_blocks.pack_q4_0, gguf_blocks.unpack_q4_0, GGMLQuantizationType.Q4_0),
        (q8, gguf_blocks.pack_q8_0, gguf_blocks.unpack_q8_0, GGMLQuantizationType.Q8_0),
    ):
        data = pack(q, scale)
        back, back_scale = unpack(data)
        assert np.array_equal(back, q) and np.array_equal(back_scale, scale)
        ours = q.reshape(6, 3, 32) * scale.astype(np.float32)[..., None]
        assert np.array_equal(dequantize(data, kind), ours.reshape(6, 96))


def test_q4_1_round_trips_and_counts_the_minimums_float16_rounds():
    q = RNG.integers(-8, 8, (4, 64)).astype(np.int8)
    scale = np.full((4, 2), 0.5, np.float16)  # -(z + 8) * 0.5 is exact in float16
    zero = RNG.integers(-8, 8, (4, 2)).astype(np.int8)
    data, rounded = gguf_blocks.pack_q4_1(q, scale, zero)
    assert rounded == 0
    n, d, m = gguf_blocks.unpack_q4_1(data)
    assert np.array_equal(n.astype(np.int16) - 8, q) and np.array_equal(d, scale)
    ours = (q.reshape(4, 2, 32) - zero[..., None]) * 0.5
    assert np.array_equal(dequantize(data, GGMLQuantizationType.Q4_1), ours.reshape(4, 64))
    odd = np.full((4, 2), 0.0123, np.float16)  # 11 significant bits: x 9 needs more
    assert gguf_blocks.pack_q4_1(q, odd, np.full((4, 2), 1, np.int8))[1] == 8
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        gguf_blocks.pack_q4_0(q * 2, scale)


def checkpoint(tmp_path, tiny_model, weights):
    model = tiny_model("llama")
    steps = parse_recipe({"steps": [{"method": "rtn", "weights": weights}]}).steps
    layers = quantize_model(model, steps, None, 4, False).layers
    folder = tmp_path / "ckpt"
    save_quantized(model, tiny_tokenizer(), layers, folder)
    return model, folder


@pytest.mark.parametrize(
    "weights, kind",
    [
        (dict(bits=4, group_size=32, symmetric=True), "Q4_0"),
        (dict(bits=4, group_size=32, symmetric=False), "Q4_1"),
        (dict(bits=8, group_size=32, symmetric=True), "Q8_0"),
    ],
)
def test_every_quantized_tensor_dequantizes_to_our_weights(tmp_path, tiny_model, weights, kind):
    model, folder = checkpoint(tmp_path, tiny_model, weights)
    report = export_gguf(folder, tmp_path / "m.gguf")
    assert report.exact == 14 and report.requantized == 0
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    fields = {
        k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "llama."))
    }
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.rope.freq_base"] == pytest.approx(
        model.config.rope_parameters["rope_theta"]
    )
    assert fields["llama.attention.head_count_kv"] == 2
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 320
    tensors = {t.name: t for t in reader.tensors}
    config = model.config.to_dict()
    llama = ARCHS["llama"]
    exact = rounded = 0
    for index in range(2):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                         ("mlp.down_proj", "ffn_down")):  # fmt: skip
            tensor = tensors[f"blk.{index}.{name}.weight"]
            assert tensor.tensor_type.name == kind
            ours = model.get_submodule(f"model.layers.{index}.{hf}").weight.detach().numpy()
            ours = llama.permute(f"blk.{index}.{name}.weight", ours, config)
            theirs = dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
            exact += int(np.array_equal(theirs, ours))
            rounded += int(not np.array_equal(theirs, ours))
            assert np.abs(theirs - ours).max() <= 1e-3 * np.abs(ours).max()
    if kind == "Q4_1":  # exact wherever the float16 minimum did not round
        assert report.groups > 0 and (rounded == 0) == (report.rounded_minimums == 0)
    else:
        assert rounded == 0
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_rope_settings_come_from_transformers_5s_rope_parameters():
    from quantmill.serving.gguf_meta import rope_factors, rope_theta

    assert rope_theta({"rope_parameters": {"rope_theta": 100000.0}}) == 100000.0  # SmolLM2
    assert rope_theta({"rope_theta": 500000.0}) == 500000.0
    assert rope_factors({"rope_parameters": {"rope_type": "default"}}) is None
    llama3 = {"num_attention_heads": 32, "hidden_size": 2048, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    factors = rope_factors(llama3)
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == 32.0
    with pytest.raises(ExportError, match="yarn"):
        rope_factors({"rope_parameters": {"rope_type": "yarn"}})


def test_the_permuted_rows_are_llama_cpps_rotary_order():
    # head of 4 rows [r0 r1 | r2 r3] (rotate-half) → interleaved [r0 r2 r1 r3]
    rows = np.arange(8).reshape(8, 1)
    config = {"num_attention_heads": 2, "num_key_value_heads": 2}
    out = ARCHS["llama"].permute("blk.0.attn_q.weight", rows, config)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert ARCHS["llama"].permute("blk.0.attn_v.weight", rows, config) is rows


def test_grids_gguf_cannot_express_are_refused_or_requantized_on_request(tmp_path, tiny_model):
    _, folder = checkpoint(tmp_path, tiny_model, dict(bits=4, group_size=16, symmetric=True))
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match=r"group_size: 32, symmetric: true.*--requantize"):
        export_gguf(folder, out)
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))
    report = export_gguf(folder, out, requantize="q4_0")
    assert report.requantized == 14 and report.exact == 0 and out.is_file()


def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path, tiny_model):
    with pytest.raises(ExportError, match="not a checkpoint folder"):
        export_gguf(tmp_path / "nowhere", tmp_path / "a.gguf")
    _, folder = checkpoint(tmp_path, tiny_model, dict(bits=4, group_size=32, symmetric=True))
    for shard in folder.glob("*.safetensors"):
        shard.rename(shard.with_suffix(".moved"))
    with pytest.raises(ExportError, match="incomplete"):
        export_gguf(folder, tmp_path / "a.gguf")
    for shard in folder.glob("*.moved"):
        shard.rename(shard.with_suffix(".safetensors"))
    (tmp_path / "a.gguf").write_text("keep me")
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_gguf(folder, tmp_path / "a.gguf")
    assert (tmp_path / "a.gguf").read_text() == "keep me"
    export_gguf(folder, tmp_path / "a.gguf", overwrite=True)
    assert (tmp_path / "a.gguf").stat().st_size > 1000


def test_quantize_with_format_gguf_writes_the_file_beside_the_checkpoint(
    tmp_path, tiny_checkpoint, text_files, capsys
):
    from quantmill.cli import main
    from quantmill.recipe import save_recipe
    from tests.conftest import tiny_recipe

    src = tiny_checkpoint("llama")
    for group, code in ((16, 2), (32, 0)):
        recipe = tmp_path / f"g{group}.yaml"
        save_recipe(tiny_recipe("rtn", *text_files, group_size=group), recipe)
        out = tmp_path / f"out{group}"
        argv = ["quantize", "--model", str(src), "--recipe", str(recipe), "--out", str(out)]
        assert main([*argv, "--format", "gguf", "--json", "-q"]) == code
    assert "GGUF holds exactly only" in capsys.readouterr().err  # refused before any work
    assert not (tmp_path / "out16").exists()
    reader = GGUFReader(str(tmp_path / "out32.gguf"))
    kinds = {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")}
    assert kinds == {"Q4_0", "F32"}  # the quantized layers and the norms
    assert (tmp_path / "out32" / "config.json").is_file()  # the packed checkpoint as well
