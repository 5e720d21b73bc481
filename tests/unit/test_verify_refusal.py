"""verify_vllm on a vLLM without a 4-bit kernel: weight-only checkpoints are refused with
the reason before vLLM runs; the others still go to vLLM (no vLLM needed here)."""

import json
from pathlib import Path

from quantmill.serving import verify

WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
W8A8 = {"weights": {**WEIGHTS, "num_bits": 8}, "input_activations": {"num_bits": 8}}


def folder(root: Path, name: str, group: dict) -> Path:
    path = root / name
    path.mkdir()
    config = {"quantization_config": {"config_groups": {"group_0": {"targets": ["x"], **group}}}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def fake_probe(seen: list):
    def probe(folders, prompt, tokens):
        seen.extend(str(f) for f in folders)
        return [{"folder": str(f), "loaded": False, "reason": "probed"} for f in folders]

    return probe


def test_weight_only_checkpoints_are_refused_with_the_reason_and_the_rest_still_probed(
    tmp_path, monkeypatch
):
    w4 = folder(tmp_path, "w4", {"weights": WEIGHTS})
    w8a8 = folder(tmp_path, "w8a8", W8A8)
    seen: list[str] = []
    monkeypatch.setattr(verify, "wna16_missing_reason", lambda: "no WNA16 kernel here")
    monkeypatch.setattr(verify, "probe_vllm", fake_probe(seen))
    first, second = verify.verify_vllm([w4, w8a8])
    assert seen == [str(w8a8)]  # vLLM never saw the 4-bit folder
    assert not first["ok"] and first["reason"] == "no WNA16 kernel here"
    assert first["folder"] == str(w4.resolve())
    assert second["reason"] == "probed"


def test_with_the_kernel_every_checkpoint_goes_to_vllm(tmp_path, monkeypatch):
    w4 = folder(tmp_path, "w4", {"weights": WEIGHTS})
    w8a8 = folder(tmp_path, "w8a8", W8A8)
    seen: list[str] = []
    monkeypatch.setattr(verify, "wna16_missing_reason", lambda: None)
    monkeypatch.setattr(verify, "probe_vllm", fake_probe(seen))
    results = verify.verify_vllm([w4, w8a8])
    assert seen == [str(w4), str(w8a8)]
    assert [r["reason"] for r in results] == ["probed", "probed"]


def test_weight_only_reads_the_config_groups(tmp_path):
    assert verify.weight_only(folder(tmp_path, "a", {"weights": WEIGHTS}))
    assert not verify.weight_only(folder(tmp_path, "b", W8A8))
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text("{}")
    assert not verify.weight_only(dense)


def test_a_folder_without_a_config_goes_to_vllm_to_be_refused_there(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not verify.weight_only(empty)
    (empty / "config.json").write_text("{not json")
    assert not verify.weight_only(empty)
    seen: list[str] = []
    monkeypatch.setattr(verify, "wna16_missing_reason", lambda: "no WNA16 kernel here")
    monkeypatch.setattr(verify, "probe_vllm", fake_probe(seen))
    (result,) = verify.verify_vllm([empty])
    assert seen == [str(empty)] and result["reason"] == "probed"
