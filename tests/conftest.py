"""Shared fixtures: tiny random models of each supported architecture, the real
SmolLM2 preset, and the WikiText-2 files from the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The suite's own homes (set before anything reads them): what it caches and records
# stays out of the user's ~/.cache/quantmill, ~/.prefect and Hub cache, and what the
# user has there cannot change what the tests see. A clean clone starts empty.
TEST_HOME = Path(os.environ.get("QUANTMILL_TEST_HOME", REPO / ".test-home"))
for _variable, _folder in {"QUANTMILL_CACHE": "cache", "PREFECT_HOME": "prefect",
                           "HF_HOME": "hf"}.items():  # fmt: skip
    os.environ[_variable] = str(TEST_HOME / _folder)
DATA_DIR = Path(os.environ.get("QUANTMILL_DATA_DIR", REPO.parent / "shared" / "data"))
WIKI_VALID = DATA_DIR / "wikitext-2" / "wiki.valid.tokens"
WIKI_TEST = DATA_DIR / "wikitext-2" / "wiki.test.raw"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the marks
def pytest_collection_modifyitems(items) -> None:
    """With pytest-xdist (``make test`` runs two workers), each module's tests run on one
    worker, so module fixtures are built once; the service stack's tests share one
    worker and one stack, in file order (the killed-worker test last). (pytest-xdist 3.8
    groups by rewriting node ids, which pytest 9 no longer reads: pyproject holds pytest
    below 9.)"""
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        group = "stack" if module.startswith("tests/stack/") else module
        item.add_marker(pytest.mark.xdist_group(group))


def tiny_config(model_type: str, vocab_size: int = 320):
    """A two-block config of ``model_type`` small enough for unit tests."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, num_attention_heads=4)
    decoder = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2
    )
    experts = dict(num_experts=4, num_experts_per_tok=2)
    two_kinds = ["sliding_attention", "full_attention"]
    sizes = {
        "llama": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2
        ),
        "mistral": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2
        ),
        "qwen2": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2
        ),
        "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64),
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
        "qwen3": dict(**decoder, head_dim=16),
        "phi3": dict(**decoder, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        # a window shorter than the tests' sequences, so the two kinds of block differ
        "gemma2": dict(**decoder, head_dim=16, sliding_window=8),
        "gemma3_text": dict(**decoder, head_dim=16, sliding_window=8, layer_types=two_kinds),
        # mixtures of experts: 4 experts, 2 a token
        "qwen3_moe": dict(**decoder, **experts, head_dim=16, moe_intermediate_size=32),
        "mixtral": dict(**decoder, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": dict(
            **decoder, **experts, moe_intermediate_size=32, shared_expert_intermediate_size=64
        ),
    }[model_type]
    if model_type == "gpt2":
        common.pop("num_attention_heads")
    return AutoConfig.for_model(model_type, **common, **sizes)


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model("opt")`` → a seeded random causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    def make(model_type: str = "llama", seed: int = 0):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
        return model.eval()

    return make


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct preset, converted once to safetensors."""
    from quantmill.sources import resolve_model

    return resolve_model("smollm2-135m").path


# Blocks kept by ``short_smollm2``: the real weights, a fraction of the work.
SHORT_BLOCKS = 4


@pytest.fixture(scope="session")
def short_smollm2(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2-135M's real weights cut to its first ``SHORT_BLOCKS`` decoder blocks (with
    its embeddings, norm, head and tokenizer): for tests of the pipeline around the
    quantizer, where the other 26 blocks add nothing but time."""
    import json

    from quantmill.export.shards import ShardWriter
    from quantmill.weights import WeightFiles

    folder = tmp_path_factory.mktemp("smollm2") / f"smollm2-{SHORT_BLOCKS}-blocks"
    folder.mkdir()
    files = WeightFiles(smollm2_path)
    writer = ShardWriter(folder, 5 * 10**9)
    for name, located in files.tensors.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= SHORT_BLOCKS:
            continue
        writer.add_raw(name, located.entry, located.file, located.data_start)
    writer.finish()
    config = json.loads((smollm2_path / "config.json").read_text())
    config["num_hidden_layers"] = SHORT_BLOCKS
    (folder / "config.json").write_text(json.dumps(config))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (smollm2_path / extra).is_file():
            (folder / extra).write_bytes((smollm2_path / extra).read_bytes())
    return folder


@pytest.fixture(scope="session")
def wiki_files() -> tuple[Path, Path]:
    if not WIKI_VALID.is_file() or not WIKI_TEST.is_file():
        pytest.fail(f"WikiText-2 files not found under {DATA_DIR}; set QUANTMILL_DATA_DIR")
    return WIKI_VALID, WIKI_TEST


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
    "a single step. To be or not to be, that is the question. All that glitters is not gold. "
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory: no download, no preset needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model):
    """Factory: a tiny model + tokenizer saved as an ordinary local checkpoint folder."""

    def make(model_type: str = "llama", name: str = "tiny") -> Path:
        folder = tmp_path / name
        model = tiny_model(model_type)
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def text_files(tmp_path) -> tuple[Path, Path]:
    """(calibration, evaluation) text files of a few thousand tokens."""
    calib = tmp_path / "calib.txt"
    evaluation = tmp_path / "eval.txt"
    calib.write_text("\n".join([SAMPLE_TEXT] * 60))
    evaluation.write_text("\n".join([SAMPLE_TEXT[::-1], SAMPLE_TEXT] * 30))
    return calib, evaluation


def tiny_recipe(method: str, calib: Path, evaluation: Path, **weights):
    from quantmill.recipe import parse_recipe

    return parse_recipe(
        {
            "steps": [{"method": method, "weights": {"bits": 4, "group_size": 16, **weights}}],
            "calibration": {
                "dataset": str(calib),
                "num_samples": 8,
                "seq_len": 32,
                "batch_size": 4,
            },
            "evaluation": {"dataset": str(evaluation), "seq_len": 64, "max_windows": 4},
        }
    )
