"""The streaming engine on tiny random models: lazy weights, shards, resume, devices,
bad inputs. (The real model's kill-and-resume run is in tests/integration.)"""

from __future__ import annotations

import errno
import json
import logging
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantmill.engine as engine
from quantmill.api import quantize
from quantmill.cli import main
from quantmill.config import EngineSpec
from quantmill.data import calibration_ids, ids_digest
from quantmill.driver import quantize_model
from quantmill.errors import CheckpointError, OutOfSpaceError
from quantmill.export.checkpoint import save_quantized
from quantmill.export.shards import ShardWriter
from quantmill.folder import INDEX_FILE, weight_files
from quantmill.lazy import LazyModel
from quantmill.models import load_tokenizer
from quantmill.sources import resolve_model
from quantmill.tensorfile import read_header
from quantmill.weights import WeightFiles
from tests.conftest import tiny_config, tiny_recipe, tiny_tokenizer

BLOCKS = 4


@pytest.fixture
def bf16_source(tmp_path):
    """A 4-block llama in bfloat16, sharded into several safetensors files."""
    config = tiny_config("llama")
    config.num_hidden_layers = BLOCKS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folder = tmp_path / "source"
    model.save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / INDEX_FILE).is_file()
    return folder


@pytest.fixture
def recipe(text_files):
    return tiny_recipe("gptq", *text_files)


def run(source, recipe, out, **kwargs):
    kwargs.setdefault("engine", EngineSpec(max_shard_size="60KB"))
    return quantize(str(source), recipe, out, progress=False, **kwargs)


def test_at_most_one_block_is_in_memory_at_any_time(bf16_source, recipe, monkeypatch):
    seen: list[int] = []
    names: list[str] = []
    opened: list[LazyModel] = []
    original_open = LazyModel.open.__func__

    def spy_open(cls, *args, **kwargs):
        lazy = original_open(cls, *args, **kwargs)
        opened.append(lazy)
        return lazy

    original_read = WeightFiles.read

    def spy_read(self, name, *args, **kwargs):
        for lazy in opened:
            loaded = [any(p.device.type != "meta" for p in b.parameters()) for b in lazy.blocks]
            seen.append(sum(loaded))
        names.append(name)
        return original_read(self, name, *args, **kwargs)

    monkeypatch.setattr(LazyModel, "open", classmethod(spy_open))
    monkeypatch.setattr(WeightFiles, "read", spy_read)
    run(bf16_source, recipe, bf16_source.parent / "out", evaluate=False)
    assert seen and max(seen) <= 1  # when a tensor is read, no other block is loaded
    block_tensors = [n for n in WeightFiles(bf16_source).tensors if ".layers." in n]
    # the run that quantized (the last one opened): every block tensor read exactly once
    reads = Counter(names[-opened[-1].files.reads :])
    assert {n: reads[n] for n in block_tensors} == dict.fromkeys(block_tensors, 1)
    # the embedding only as row ranges of the ids seen; the head (tied) never
    assert reads["model.embed_tokens.weight"] >= 1
    assert all(p.device.type == "meta" for p in opened[-1].model.parameters())


def test_sharded_bf16_source_gives_sharded_checkpoint_with_in_memory_logits(bf16_source, recipe):
    out = bf16_source.parent / "out"
    summary = run(bf16_source, recipe, out, evaluate=False)
    files = weight_files(out)
    assert len(files) > 1 and (out / INDEX_FILE).is_file()
    stored = WeightFiles(out)
    assert stored.dtype("model.layers.0.input_layernorm.weight") == torch.bfloat16
    assert stored.dtype("model.embed_tokens.weight") == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    memory = AutoModelForCausalLM.from_pretrained(bf16_source, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(resolve_model(str(bf16_source)))
    ids = calibration_ids(tokenizer, recipe.calibration)
    # the summary names the ids it was calibrated on (benchmarks check the peer got them)
    assert summary.engine["calibration_sha256"] == ids_digest(ids)
    assert ids_digest(ids[:, :-1]) != ids_digest(ids) != ids_digest(ids.flip(0))
    outcome = quantize_model(memory, recipe.steps, ids, recipe.calibration.batch_size, False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    probe = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(memory(probe).logits, reloaded(probe).logits)

    # the in-memory writer gives the very same bytes as the streaming one
    again = bf16_source.parent / "again"
    lazy = LazyModel.open(bf16_source, torch.device("cpu"), torch.float32)
    save_quantized(memory, None, outcome.layers, again, "packed", lazy.stored_dtype, 60_000)
    assert [f.read_bytes() for f in weight_files(again)] == [f.read_bytes() for f in files]


def test_resume_after_a_crash_is_byte_identical(bf16_source, recipe, monkeypatch, caplog):
    whole = bf16_source.parent / "whole"
    run(bf16_source, recipe, whole, evaluate=False)
    out = bf16_source.parent / "out"
    interrupted_run(bf16_source, recipe, out, monkeypatch, after_block=2)
    assert not out.exists() and (out.parent / ".out.journal" / "journal.json").is_file()
    with caplog.at_level(logging.INFO, logger="quantmill"):
        summary = run(bf16_source, recipe, out, evaluate=False)
    assert f"resuming at block 4/{BLOCKS}" in caplog.text
    assert summary.engine["resumed_at_block"] == 4
    for name in ("config.json", *[f.name for f in weight_files(whole)]):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_a_changed_recipe_starts_afresh_and_says_why(bf16_source, recipe, monkeypatch, caplog):
    out = bf16_source.parent / "out"
    interrupted_run(bf16_source, recipe, out, monkeypatch, after_block=0)
    data = recipe.to_dict()
    data["steps"][0]["weights"]["bits"] = 3
    changed = type(recipe).model_validate(data)
    with caplog.at_level(logging.INFO, logger="quantmill"):
        summary = run(bf16_source, changed, out, evaluate=False)
    assert "recipe.steps.0.weights.bits changed" in caplog.text
    assert "starting afresh" in caplog.text and "resuming at block" not in caplog.text
    assert summary.engine["resumed_at_block"] is None


def test_no_resume_forces_a_fresh_start(bf16_source, recipe, monkeypatch, caplog):
    out = bf16_source.parent / "out"
    interrupted_run(bf16_source, recipe, out, monkeypatch, after_block=0)
    with caplog.at_level(logging.INFO, logger="quantmill"):
        summary = run(
            bf16_source, recipe, out, evaluate=False,
            engine=EngineSpec(max_shard_size="60KB", resume=False),
        )  # fmt: skip
    assert "--no-resume" in caplog.text and summary.engine["resumed_at_block"] is None


def interrupted_run(source, recipe, out, monkeypatch, after_block: int) -> None:
    """A run into ``out`` that stops (as if killed) once block ``after_block`` is written;
    a resume point is taken after every block."""
    monkeypatch.setattr(engine, "RESUME_COST_FACTOR", 0.0)
    finish = engine.StreamingStore.finish

    def crash(self, index, *args):
        result = finish(self, index, *args)
        if index == after_block:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(engine.StreamingStore, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        run(source, recipe, out, evaluate=False)
    monkeypatch.setattr(engine.StreamingStore, "finish", finish)


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--model", "no/such-model", "--recipe", "rtn-w4g64",
                 "--out", str(out), "--device", "cuda"])  # fmt: skip
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert code == 2 and "no CUDA device" in err and "devices here: cpu" in err
    assert "Traceback" not in err and not out.exists()


def _assert_refused(source, recipe, out, match):
    with pytest.raises(CheckpointError, match=match):
        run(source, recipe, out)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_an_index_naming_a_missing_shard_is_refused(bf16_source, recipe):
    next(p for p in sorted(bf16_source.glob("model-*.safetensors"))).unlink()
    _assert_refused(bf16_source, recipe, bf16_source.parent / "out", "missing")


def test_a_truncated_shard_is_refused(bf16_source, recipe):
    shard = sorted(bf16_source.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _assert_refused(bf16_source, recipe, bf16_source.parent / "out", "truncated")


def test_a_shard_that_does_not_match_the_config_is_refused(bf16_source, recipe):
    config = json.loads((bf16_source / "config.json").read_text())
    config["intermediate_size"] = 96  # the shards hold 128-wide MLPs
    (bf16_source / "config.json").write_text(json.dumps(config))
    _assert_refused(bf16_source, recipe, bf16_source.parent / "out", r"shape \[128, 64\]")


class _FillingDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes have gone to the disk."""

    room = 150_000

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, data) -> int:
        _FillingDisk.room -= len(data)
        if _FillingDisk.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def test_a_full_disk_says_where_and_keeps_the_journal(bf16_source, recipe, monkeypatch):
    monkeypatch.setattr(engine, "RESUME_COST_FACTOR", 0.0)
    original = ShardWriter._open_data

    def open_on_a_filling_disk(self):
        original(self)
        self._data = _FillingDisk(self._data)

    out = bf16_source.parent / "out"
    monkeypatch.setattr(ShardWriter, "_open_data", open_on_a_filling_disk)
    with pytest.raises(OutOfSpaceError) as caught:
        run(bf16_source, recipe, out, evaluate=False)
    message = str(caught.value)
    assert str(out.parent / ".out.partial") in message and "MB more were needed" in message
    journal = out.parent / ".out.journal" / "journal.json"
    assert journal.is_file() and json.loads(journal.read_text())["state"]["blocks_done"] >= 1
    monkeypatch.setattr(ShardWriter, "_open_data", original)  # space was freed
    summary = run(bf16_source, recipe, out, evaluate=False)
    assert summary.engine["resumed_at_block"] is not None and (out / INDEX_FILE).is_file()


def test_a_disk_too_small_for_the_checkpoint_is_refused_before_work(
    bf16_source, recipe, monkeypatch
):
    import shutil as shutil_module

    usage = shutil_module.disk_usage(bf16_source)
    monkeypatch.setattr("quantmill.api.shutil.disk_usage", lambda _: usage._replace(free=10_000))
    out = bf16_source.parent / "out"
    with pytest.raises(OutOfSpaceError, match="GB free"):
        run(bf16_source, recipe, out)
    assert not out.exists() and not list(out.parent.glob(".out*"))


def test_the_output_folder_is_readable_by_others(bf16_source, recipe):
    out = bf16_source.parent / "out"
    run(bf16_source, recipe, out, evaluate=False)
    assert out.stat().st_mode & 0o055 == 0o055
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in out.iterdir())


def test_headers_cover_the_data_exactly(bf16_source, recipe):
    out = bf16_source.parent / "out"
    run(bf16_source, recipe, out, evaluate=False)
    for file in weight_files(out):
        entries, metadata, start = read_header(file)  # raises on a gap or a short file
        assert metadata == {"format": "pt"} and start % 8 == 0


def test_a_rerun_of_the_quantize_task_resumes(bf16_source, recipe, monkeypatch):
    """What a re-run of a Crashed flow run does: the same task parameters, the same
    output folder, so the journal is found and the run continues."""
    from tasks.quantize import quantize_model as quantize_task

    monkeypatch.setattr(engine, "RESUME_COST_FACTOR", 0.0)
    finish = engine.StreamingStore.finish

    def crash(self, index, *args):
        result = finish(self, index, *args)
        if index == 1:
            raise SystemExit("worker lost")
        return result

    model = resolve_model(str(bf16_source)).to_dict()
    out = str(bf16_source.parent / "out")
    settings = {"max_shard_size": "60KB"}
    monkeypatch.setattr(engine.StreamingStore, "finish", crash)
    with pytest.raises(SystemExit):
        quantize_task.fn(model, recipe, out, engine=settings)
    monkeypatch.setattr(engine.StreamingStore, "finish", finish)
    result = quantize_task.fn(model, recipe, out, engine=settings)
    assert result["engine"]["resumed_at_block"] == 3
    assert result["out_dir"] == str(bf16_source.parent.resolve() / "out")
