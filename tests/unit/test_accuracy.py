"""Zero-shot accuracy: task resolution and its errors, the harness on a tiny model, the
original's cache, recovery, the accuracy gate, and where results are shown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantmill.accuracy import harness
from quantmill.accuracy.recovery import accuracy_recovery
from quantmill.accuracy.tasks import SHIPPED, resolve_tasks
from quantmill.api import evaluate_checkpoint, quantize
from quantmill.config import EvalSpec, QualityGate
from quantmill.errors import ConfigError
from quantmill.gate import check_gate
from tests.conftest import DATA_DIR, tiny_recipe

ZERO_SHOT = DATA_DIR / "zero-shot"


def task_result(acc: float, acc_norm: float | None = None, documents: int = 100) -> dict:
    metrics = {"acc": acc} | ({"acc_norm": acc_norm} if acc_norm is not None else {})
    return {
        "task": "t", "source": "local", "documents": documents, "metrics": metrics,
        "stderr": {k: 0.01 for k in metrics}, "primary": "acc", "seconds": 1.0, "cached": False,
    }  # fmt: skip


@pytest.fixture
def small_copies(tmp_path) -> Path:
    """The shipped tasks' local copies cut to a few rows (no SHA256SUMS: not the sets)."""
    folder = tmp_path / "zero-shot"
    folder.mkdir()
    for name in SHIPPED:
        rows = (ZERO_SHOT / f"{name}.jsonl").read_text().splitlines()[:6]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_the_shipped_data_files_match_their_checksums():
    sums = (ZERO_SHOT / "SHA256SUMS").read_text()
    refs = resolve_tasks(list(SHIPPED), str(ZERO_SHOT))
    assert [r.source for r in refs] == ["local"] * len(SHIPPED)
    for ref in refs:  # the digest used in cache keys is the one SHA256SUMS lists
        digest = ref.fingerprint[f"{ref.name}.jsonl"]
        assert f"{digest}  {ref.name}.jsonl" in sums


def test_a_damaged_copy_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "copies"
    shutil.copytree(ZERO_SHOT, folder)
    piqa = folder / "piqa.jsonl"
    piqa.chmod(0o644)
    data = bytearray(piqa.read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    piqa.write_bytes(bytes(data))
    resolve_tasks(["arc_easy"], str(folder))  # the intact ones still resolve
    with pytest.raises(ConfigError, match=r"piqa.jsonl does not match its checksum"):
        resolve_tasks(["piqa"], str(folder))


def test_without_local_copies_the_shipped_names_are_the_harness_hub_tasks(monkeypatch):
    monkeypatch.delenv("QUANTMILL_TASK_DATA", raising=False)
    (ref,) = resolve_tasks(["arc_easy"])
    assert (ref.source, ref.spec) == ("hub", "arc_easy")
    monkeypatch.setenv("QUANTMILL_TASK_DATA", str(ZERO_SHOT))
    (ref,) = resolve_tasks(["arc_easy"])
    assert ref.source == "local"
    assert ref.spec["dataset_kwargs"]["data_files"]["test"] == str(ZERO_SHOT / "arc_easy.jsonl")


def test_bad_task_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValidationError, match="available tasks are arc_challenge, arc_easy, "):
        EvalSpec(tasks=["hellaswag"])
    with pytest.raises(ValidationError, match="listed twice"):
        EvalSpec(tasks=["piqa", "piqa"])
    for limit in (0, -3):
        with pytest.raises(ValidationError, match="greater than or equal to 1"):
            EvalSpec(tasks=["piqa"], limit=limit)
    broken = tmp_path / "mine.yaml"
    broken.write_text("task: mine\ndoc_to_text: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse as YAML"):
        resolve_tasks([str(broken)])
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="has no 'task:' name"):
        resolve_tasks([str(nameless)])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_tasks([str(tmp_path / "absent.yaml")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"its data file .*lambada_openai.jsonl does not exist"):
        resolve_tasks(["lambada_openai"], str(empty))
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_tasks(["piqa"], str(tmp_path / "nowhere"))


def test_bad_tasks_fail_before_any_work(tiny_checkpoint, text_files, tmp_path, monkeypatch):
    import quantmill.api as api

    opened = []
    monkeypatch.setattr(api, "open_model", lambda *a, **k: opened.append(1) or 1 / 0)
    folder = tiny_checkpoint()
    recipe = tiny_recipe("rtn", *text_files)
    missing = recipe.model_copy(deep=True)
    missing.evaluation.tasks = ["piqa"]
    missing.evaluation.task_data = str(tmp_path)  # holds no piqa.jsonl
    with pytest.raises(ConfigError, match="piqa.jsonl does not exist"):
        quantize(str(folder), missing, tmp_path / "out", progress=False)
    assert not opened and not (tmp_path / "out").exists()


def test_the_harness_scores_a_users_task_file_on_a_tiny_model(
    tiny_checkpoint, text_files, tmp_path
):
    data = tmp_path / "mine.jsonl"
    rows = [{"q": f"Is {i} even?", "choices": ["yes", "no"], "gold": i % 2} for i in range(10)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = tmp_path / "mine.yaml"
    task.write_text(
        "task: even_or_odd\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}\\nAnswer:"\ndoc_to_target: "{{gold}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    spec = EvalSpec(dataset=str(text_files[1]), seq_len=32, max_windows=1, tasks=[str(task)])
    result = evaluate_checkpoint(str(tiny_checkpoint()), spec, progress=False)
    found = result["tasks"]["even_or_odd"]
    assert found["documents"] == 10 and found["source"] == "file"
    assert 0.0 <= found["metrics"]["acc"] <= 1.0 and found["stderr"]["acc"] > 0
    assert result["mean_accuracy"] == found["metrics"]["acc"]
    assert result["harness"]["results"]["even_or_odd"]["acc,none"] == found["metrics"]["acc"]


def test_the_originals_results_come_from_the_cache_the_second_time(
    tiny_checkpoint, text_files, small_copies, tmp_path, monkeypatch
):
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache"))
    runs = []
    real = harness._run
    monkeypatch.setattr(harness, "_run", lambda *a, **k: runs.append(a[1].name) or real(*a, **k))
    folder = str(tiny_checkpoint())
    spec = EvalSpec(
        dataset=str(text_files[1]), seq_len=32, max_windows=1,
        tasks=["piqa", "lambada_openai"], limit=4, task_data=str(small_copies),
    )  # fmt: skip
    first = evaluate_checkpoint(folder, spec, cache=True, progress=False)
    assert runs == ["piqa", "lambada_openai"]
    assert first["tasks"]["lambada_openai"]["documents"] == 4
    assert set(first["tasks"]["lambada_openai"]["metrics"]) == {"acc", "perplexity"}
    assert set(first["tasks"]["piqa"]["metrics"]) == {"acc", "acc_norm"}
    second = evaluate_checkpoint(folder, spec, cache=True, progress=False)
    assert runs == ["piqa", "lambada_openai"]  # no new harness run
    assert all(t["cached"] for t in second["tasks"].values())
    assert second["tasks"]["piqa"]["metrics"] == first["tasks"]["piqa"]["metrics"]
    changed = spec.model_copy(update={"limit": 3})  # another limit is new work
    evaluate_checkpoint(folder, changed, cache=True, progress=False)
    assert runs == ["piqa", "lambada_openai"] * 2


def test_quantize_records_both_models_tasks_and_the_recovery(
    tiny_checkpoint, text_files, small_copies, tmp_path, monkeypatch
):
    from quantmill.card import CheckpointInfo, render_card
    from quantmill.folder import ACCURACY_FILE, SUMMARY_FILE

    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe("rtn", *text_files)
    recipe.evaluation.tasks = ["arc_easy"]
    recipe.evaluation.limit = 5
    recipe.evaluation.task_data = str(small_copies)
    out = tmp_path / "out"
    summary = quantize(str(tiny_checkpoint()), recipe, out, progress=False).to_dict()
    for part in ("original", "quantized"):
        assert summary[part]["tasks"]["arc_easy"]["documents"] == 5
    row = summary["accuracy"]["tasks"]["arc_easy"]
    assert row["recovery"] == pytest.approx(row["quantized"] / row["original"])
    written = json.loads((out / SUMMARY_FILE).read_text())
    assert written["accuracy"] == summary["accuracy"] and "harness" not in written["quantized"]
    raw = json.loads((out / ACCURACY_FILE).read_text())
    assert set(raw) == {"original", "quantized"}
    assert raw["quantized"]["results"]["arc_easy"]["acc,none"] == row["quantized"]
    card = render_card(CheckpointInfo.load(out))
    assert "| arc_easy | acc |" in card and "limited to 5 documents per task" in card


def test_recovery_is_the_mean_of_each_tasks_ratio():
    original = {"a": task_result(0.50), "b": task_result(0.80, 0.70)}
    quantized = {"a": task_result(0.40), "b": task_result(0.80, 0.75)}
    found = accuracy_recovery(original, quantized)
    assert found["tasks"]["a"]["recovery"] == pytest.approx(0.8)
    assert found["tasks"]["b"]["recovery"] == pytest.approx(1.0)
    assert found["mean_recovery"] == pytest.approx(0.9)
    assert found["mean_original"] == pytest.approx(0.65)
    assert accuracy_recovery(original, {}) == {}


def test_the_gate_on_accuracy_passes_and_fails_naming_the_task():
    original = {"arc_easy": task_result(0.50), "piqa": task_result(0.60)}
    quantized = {"arc_easy": task_result(0.49), "piqa": task_result(0.45)}
    accuracy = accuracy_recovery(original, quantized)  # recoveries 0.98 and 0.75
    passed = check_gate(QualityGate(min_accuracy_recovery=0.85), 20.0, 22.0, accuracy)
    assert passed.passed and passed.accuracy_recovery == pytest.approx(0.865)
    failed = check_gate(QualityGate(min_accuracy_recovery=0.95), 20.0, 22.0, accuracy)
    assert not failed.passed
    assert "below the recipe's gate.min_accuracy_recovery 0.950" in failed.reason
    assert "piqa acc 0.450 vs 0.600" in failed.reason and "arc_easy acc" not in failed.reason
    # perplexity alone passes; accuracy asked for but not measured fails
    assert check_gate(QualityGate(), 20.0, 22.0).passed
    unknown = check_gate(QualityGate(min_accuracy_recovery=0.5), 20.0, 22.0, {})
    assert not unknown.passed and "evaluation.tasks" in unknown.reason
    # both rules: a perplexity failure fails even when accuracy passes
    both = check_gate(QualityGate(min_accuracy_recovery=0.5), 20.0, 40.0, accuracy)
    assert not both.passed and "gate.min_recovery" in both.reason


def test_the_registry_tags_carry_the_accuracy_gate(tmp_path, text_files):
    from quantmill.card import CheckpointInfo
    from tasks.registry import version_tags

    recipe = tiny_recipe("rtn", *text_files)
    recipe.gate.min_accuracy_recovery = 0.95
    original = {"arc_easy": task_result(0.50), "piqa": task_result(0.60)}
    quantized = {"arc_easy": task_result(0.49), "piqa": task_result(0.45)}
    summary = {
        "original": {"perplexity": 20.0, "tasks": original},
        "quantized": {"perplexity": 21.0, "tasks": quantized},
        "accuracy": accuracy_recovery(original, quantized),
        "model": {"source": "tiny", "kind": "local", "path": str(tmp_path)},
    }
    info = CheckpointInfo(tmp_path, recipe, summary)
    gate = info.gate()
    assert not gate.passed and "piqa" in gate.reason
    tags = version_tags(info, "digest", None)
    assert tags["accuracy_recovery"] == "0.8650" and tags["tasks"] == "arc_easy,piqa"


def test_tables_and_plot_show_accuracy(tmp_path):
    from PIL import Image

    from quantmill import plots, report
    from tracking.figures import task_metrics

    rows = [
        {"recipe": "a", "status": "ok", "perplexity": 22.0, "accuracy_mean": 0.45,
         "accuracy_recovery": 0.9, "size_bytes": 2**20 * 80, "bits_per_weight": 4.5,
         "quant_seconds": 3.0},
    ]  # fmt: skip
    original = {"perplexity": 20.0, "mean_accuracy": 0.5, "size_bytes": 2**20 * 270}
    markdown = report.comparison_markdown(rows, original)
    assert "| mean accuracy | accuracy recovery |" in markdown
    assert "| original | - | 20.00 | 0.5000 | - |" in markdown and "| 0.4500 | 0.900 |" in markdown
    assert "mean accuracy" not in report.comparison_markdown(
        [{**rows[0], "accuracy_mean": None}], {}
    )
    two = Image.open(plots.size_vs_perplexity(rows, tmp_path / "two.png", original))
    one = Image.open(
        plots.size_vs_perplexity([{**rows[0], "accuracy_mean": None}], tmp_path / "one.png")
    )
    assert two.size[0] > one.size[0] * 1.5  # a second panel: size vs mean accuracy
    figures = task_metrics(
        {"tasks": {"piqa": task_result(0.6, 0.62)}}, {"tasks": {"piqa": task_result(0.54, 0.6)}}
    )
    assert figures["tasks.piqa.acc"] == 0.54 and figures["tasks_original.piqa.acc"] == 0.6
    assert figures["tasks.piqa.acc_norm_stderr"] == 0.01
    assert figures["tasks.piqa.recovery"] == pytest.approx(0.9)
    assert figures["accuracy_recovery"] == pytest.approx(0.9)
    assert figures["accuracy_mean_original"] == 0.6
