"""The pure parts of publishing: quality gate, digests, model card, settings."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from quantmill.card import CheckpointInfo, card_metadata, render_card
from quantmill.config import QualityGate
from quantmill.digest import file_digest, folder_digest, folder_digests
from quantmill.errors import CheckpointError, PublishError
from quantmill.gate import check_gate
from quantmill.recipe import parse_recipe, save_recipe


def test_the_gate_passes_at_the_threshold_and_fails_below_it():
    gate = QualityGate(min_recovery=0.8)
    assert check_gate(gate, 20.0, 25.0).passed  # recovery exactly 0.8
    failed = check_gate(gate, 20.0, 26.0)
    assert not failed.passed and failed.recovery == pytest.approx(20 / 26)
    assert "below the recipe's gate.min_recovery 0.800" in failed.reason
    unknown = check_gate(gate, None, 26.0)
    assert not unknown.passed and "no original perplexity" in unknown.reason
    assert not check_gate(gate, 20.0, float("nan")).passed


def test_the_gate_threshold_is_validated():
    with pytest.raises(ValueError, match="min_recovery"):
        QualityGate(min_recovery=1.5)


def test_digests_match_git_and_change_with_content(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / ".partial").write_text("ignored")
    git = subprocess.run(
        ["git", "hash-object", str(tmp_path / "a.json")],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    assert file_digest(tmp_path / "a.json", "a.json").git_sha1 == git
    assert set(folder_digests(tmp_path)) == {"a.json", "sub/b.bin"}
    before = folder_digest(tmp_path)
    (tmp_path / ".partial").write_text("still ignored")
    assert folder_digest(tmp_path) == before
    (tmp_path / "a.json").write_text('{"x": 2}\n')
    assert folder_digest(tmp_path) != before


def fake_checkpoint(folder, model=None, original=19.13, quantized=22.76):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    recipe = parse_recipe({"name": "gptq-w4g64", "steps": [{"method": "gptq"}]})
    save_recipe(recipe, folder / "quantmill_recipe.yaml")
    summary = {
        "model": model or {"kind": "preset", "source": "smollm2-135m", "revision": "sha256:abc"},
        "recipe": recipe.to_dict(),
        "size_bytes": 170_000_000,
        "original_size_bytes": 540_000_000,
        "bits_per_weight": 4.25,
        "original": {"perplexity": original},
        "quantized": {"perplexity": quantized, "windows": 8, "seq_len": 2048},
        "quantmill_version": "0.1.0",
    }
    (folder / "quantmill_eval.json").write_text(json.dumps(summary))
    return folder


def test_the_card_carries_lineage_evaluation_and_recipe(tmp_path):
    info = CheckpointInfo.load(fake_checkpoint(tmp_path / "ck"))
    text = render_card(info, "me/smol-gptq")
    assert text == render_card(info, "me/smol-gptq")  # deterministic: no timestamps
    (tmp_path / "README.md").write_text(text)
    meta = card_metadata(tmp_path / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"gptq", "4-bit", "quantmill"} <= set(meta["tags"])
    assert "| original | 19.13 |" in text and "| this model | 22.76 | 4.250 |" in text
    assert "Quality gate: passed: perplexity recovery 0.841" in text
    recipe_block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe_block)["steps"][0]["method"] == "gptq"
    assert 'from_pretrained("me/smol-gptq")' in text


def test_a_checkpoint_vllm_cannot_serve_fails_the_gate_and_the_card_says_why(tmp_path):
    from quantmill.folder import Checkpoint

    folder = fake_checkpoint(tmp_path / "ck")
    assert CheckpointInfo.load(folder).gate().passed  # recovery 0.84 >= 0.80
    Checkpoint(folder).write_serving({"vllm": {"ok": False, "reason": "no scheme found"}})
    info = CheckpointInfo.load(folder)
    gate = info.gate()
    assert not gate.passed and gate.recovery == pytest.approx(19.13 / 22.76)
    assert gate.reason.startswith("failed: vllm cannot serve it (no scheme found)")
    assert "**vllm cannot serve this checkpoint**: no scheme found" in render_card(info)
    served = {"ok": True, "kernels": ["CPUWNA16LinearKernel"], "agree": 8, "ranks": [0] * 8}
    Checkpoint(folder).write_serving({"vllm": served})
    info = CheckpointInfo.load(folder)
    assert info.gate().passed
    assert "Verified in vllm: it loads the checkpoint (CPUWNA16LinearKernel) and 8/8" in (
        render_card(info)
    )


def test_verify_takes_engines_and_the_former_switch():
    from flows.params import PublishSettings

    assert PublishSettings().verify == ["transformers"]
    assert PublishSettings(verify=False).verify == []
    assert PublishSettings(verify="transformers,vllm").verify == ["transformers", "vllm"]
    with pytest.raises(ValueError, match="verify"):
        PublishSettings(verify=["llama.cpp"])


def test_a_model_of_unknown_lineage_says_so(tmp_path):
    model = {"kind": "local", "source": "/x/my-model", "path": str(tmp_path), "revision": "r"}
    info = CheckpointInfo.load(fake_checkpoint(tmp_path / "ck", model=model))
    (tmp_path / "README.md").write_text(render_card(info))
    meta = card_metadata(tmp_path / "README.md")
    assert "base_model" not in meta and meta["license"] == "other"


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="quantmill_eval.json, quantmill_recipe.yaml"):
        CheckpointInfo.load(tmp_path)


def test_publish_settings_reject_a_malformed_repo_id():
    from pydantic import ValidationError

    from flows.params import PublishSettings

    with pytest.raises(ValidationError, match="write it as 'owner/name'"):
        PublishSettings(hub_repo="just-a-name")
    assert PublishSettings(hub_repo="").hub_repo is None


def test_the_token_comes_from_the_environment_first(monkeypatch):
    from tasks.secrets import hub_token

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_token(None) == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="HF_TOKEN is not set"):
        hub_token(None)


def test_the_token_can_come_from_a_secret_file(monkeypatch, tmp_path):
    from tasks.secrets import hub_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "hf_token").write_text("hf_from_file\n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "hf_token"))
    assert hub_token(None) == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(PublishError, match="HF_TOKEN_FILE=.*cannot read the token file"):
        hub_token(None)
