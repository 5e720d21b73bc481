"""The outlier report: planted outliers are found, kurtosis is right and streamed
exactly, the files round-trip, and the CLI and the task run on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from quantmill.outliers import Moments, collect_outliers, save_report, weight_kurtosis

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ids(samples: int = 8, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (samples, seq_len), generator=generator)


def direct_kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    centred = x - x.mean()
    return ((centred**4).mean() / (centred**2).mean() ** 2).item()


def by_name(report) -> dict:
    return {layer.name: layer for layer in report.layers}


def test_a_planted_outlier_channel_is_found(tiny_model):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 100
    layers = by_name(collect_outliers(model, ids(), batch_size=4, progress=False))
    for proj in ("q_proj", "k_proj", "v_proj"):
        planted = layers[f"model.layers.0.self_attn.{proj}"]
        clean = layers[f"model.layers.1.self_attn.{proj}"]
        assert planted.act_outlier_channels == [5]
        assert planted.act_outlier_fraction == pytest.approx(1 / 64)
        assert clean.act_outlier_channels == []
        assert planted.act_max_median_ratio > 20 * clean.act_max_median_ratio
        assert planted.act_kurtosis > 10 * clean.act_kurtosis


def test_hooks_are_removed_and_the_model_is_unchanged(tiny_model):
    model = tiny_model("llama")
    batch = ids(4)
    before = model(batch).logits
    collect_outliers(model, batch, batch_size=2, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(batch).logits, before)


def test_b_gaussian_weights_have_kurtosis_three_and_uniform_ones_do_not(tiny_model):
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    torch.manual_seed(3)
    with torch.no_grad():
        mlp.down_proj.weight.copy_(torch.randn_like(mlp.down_proj.weight))  # 64 x 128
        mlp.up_proj.weight.uniform_(-1, 1)  # kurtosis 1.8
    layers = by_name(collect_outliers(model, ids(2), batch_size=2, progress=False))
    assert layers["model.layers.0.mlp.down_proj"].weight_kurtosis == pytest.approx(3.0, abs=0.2)
    assert layers["model.layers.0.mlp.up_proj"].weight_kurtosis == pytest.approx(1.8, abs=0.1)
    # a Gaussian column's absmax is never 5x the median column's
    assert layers["model.layers.0.mlp.down_proj"].weight_outlier_columns == []


def test_weight_outlier_columns_follow_the_layout(tiny_model):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 7] *= 50  # input column 7
    layers = by_name(collect_outliers(model, ids(2), batch_size=2, progress=False))
    o_proj = layers["model.layers.1.self_attn.o_proj"]
    assert o_proj.weight_outlier_columns == [7]
    assert o_proj.weight_max_median_ratio > 50


def test_c_moments_streamed_over_chunks_equal_the_direct_kurtosis():
    torch.manual_seed(0)
    x = torch.randn(1000, 16) ** 3 + 0.5  # heavy tails, non-zero mean
    moments = Moments()
    for chunk in x.split(137):
        moments.add(chunk)
    assert moments.count == x.numel()
    assert moments.kurtosis() == pytest.approx(direct_kurtosis(x), rel=1e-9)
    assert weight_kurtosis(x) == pytest.approx(direct_kurtosis(x), rel=1e-9)


def test_c_streamed_layer_statistics_equal_one_pass_over_all_tokens(tiny_model):
    model = tiny_model("llama")
    batch = ids(8)
    seen = []
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(batch, use_cache=False)
    handle.remove()
    x = torch.cat(seen).reshape(-1, layer.in_features)
    for batch_size in (3, 8):
        got = by_name(collect_outliers(model, batch, batch_size, progress=False))
        down = got["model.layers.1.mlp.down_proj"]
        assert down.act_kurtosis == pytest.approx(direct_kurtosis(x), rel=1e-4)
        channel_max = x.abs().amax(dim=0)
        assert down.act_max == pytest.approx(channel_max.max().item(), rel=1e-5)
        assert down.act_median == pytest.approx(channel_max.median().item(), rel=1e-5)


def test_d_save_report_writes_json_csv_png(tiny_model, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 100
    report = collect_outliers(model, ids(4), batch_size=2, progress=False)
    paths = save_report(report, tmp_path / "report")
    assert set(paths) == {"json", "csv", "png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    names = [layer["name"] for layer in data["layers"]]
    assert names == [f"model.layers.{b}.{n}" for b in (0, 1) for n in _full(LINEARS)]
    summary = data["summary"]
    assert summary["threshold"] == 6.0
    assert summary["layers"] == 14
    assert summary["worst_layers"][0]["name"].startswith("model.layers.0.self_attn.")
    assert summary["act_outlier_channels"] >= 3  # channel 5 of q, k and v
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    assert int(rows[0]["act_outlier_count"]) == 1


def _full(kinds: tuple[str, ...]) -> list[str]:
    return [("self_attn." if k in LINEARS[:4] else "mlp.") + k for k in kinds]


def test_e_cli_writes_the_report_and_prints_the_top_layers(
    tiny_checkpoint, text_files, tmp_path, capsys
):
    from quantmill.cli import main

    folder = tiny_checkpoint("llama")
    calib, _ = text_files
    out = tmp_path / "outliers"
    argv = ["outliers", str(folder), "--out", str(out), "--calib-data", str(calib)]
    assert main([*argv, "--calib-samples", "4", "--seq-len", "32", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | act max/median" in printed
    assert printed.count("| model.layers.") == 10
    assert {p.name for p in out.iterdir()} == {"outliers.json", "outliers.csv", "outliers.png"}
    assert len(json.loads((out / "outliers.json").read_text())["layers"]) == 14

    assert main([*argv, "--seq-len", "2", "-q"]) == 2
    assert "seq_len" in capsys.readouterr().err


def test_task_returns_small_figures_and_makes_a_markdown_artifact(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from safetensors.torch import save_file

    import tasks.analyze as analyze
    from quantmill.sources import resolve_model

    made = []
    monkeypatch.setattr(analyze, "create_markdown_artifact", lambda **kw: made.append(kw))
    model = resolve_model(str(tiny_checkpoint("llama", name="Tiny_Model.v2"))).to_dict()
    save_file({"ids": ids(4)}, str(tmp_path / "ids.safetensors"))
    result = analyze.outlier_report.fn(model, str(tmp_path / "ids.safetensors"), str(tmp_path))
    assert result["layers"] == 14
    assert all(isinstance(v, (str, int, float, type(None))) for v in result.values())
    assert (tmp_path / "outliers.png").is_file()
    (artifact,) = made
    assert artifact["key"] == "outliers-tiny-model-v2"
    assert artifact["markdown"].count("| model.layers.") == 10
