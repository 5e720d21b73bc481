"""Quantization-aware training on tiny models: the straight-through estimator, the
shared loop (checkpoints, resume, divergence), PEQA, L4Q and LLM-QAT."""

from __future__ import annotations

import pytest
import torch

from quantmill.config import QuantScheme, TrainSpec
from quantmill.driver import quantize_model
from quantmill.errors import ConfigError, TrainingDivergedError
from quantmill.qat.loop import TrainContext, latest_step, train
from quantmill.qat.ste import fake_quantize_ste, round_ste
from quantmill.quant.grid import compute_qparams, fake_quantize, quantize
from quantmill.recipe import parse_recipe
from tests.conftest import tiny_tokenizer

W3G16 = {"bits": 3, "group_size": 16}


def steps(*items):
    return parse_recipe({"steps": list(items), "calibration": {"seq_len": 32}}).steps


def training(**fields):
    return {"steps": 12, "lr": 2e-2, "seq_len": 16, "checkpoint_every": 2, **fields}


@pytest.fixture
def ids():
    """Text a tiny model can learn in a few steps: one short cycle of tokens, repeated."""
    cycle = torch.tensor([5, 17, 42, 99, 7, 230])
    return torch.stack([cycle.roll(r).repeat(6)[:32] for r in range(10)])


def test_round_ste_passes_the_gradient_unchanged():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(y, torch.round(x.detach()))
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_fake_quantize_ste_matches_the_grid_and_reaches_weights_and_scales():
    scheme = QuantScheme(bits=3, group_size=8)
    W = torch.randn(4, 16)
    scale, zero = compute_qparams(W, scheme)
    w = W.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    out = fake_quantize_ste(w, s, zero, scheme)
    assert torch.allclose(out, fake_quantize(W, scale, zero, scheme))
    out.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0  # through the rounding
    assert s.grad is not None and s.grad.abs().sum() > 0  # LSQ's step-size gradient
    # outside the grid's range the clamp passes no gradient
    w2 = torch.tensor([[100.0] + [0.1] * 7]).requires_grad_(True)
    fake_quantize_ste(w2, torch.full((1, 1), 0.05), None, scheme).sum().backward()
    assert w2.grad[0, 0] == 0 and w2.grad[0, 1] == 1


def toy_loss(p):
    def loss(batch):
        return ((p - batch.float().mean()) ** 2).sum()

    return loss


def test_a_resumed_run_takes_the_same_steps_as_an_uninterrupted_one(tmp_path):
    data = torch.randint(0, 100, (12, 20), generator=torch.Generator().manual_seed(1))
    spec = TrainSpec(steps=9, lr=0.1, seq_len=8, checkpoint_every=3, eval_samples=2)
    full = torch.zeros(5)
    whole = train("toy", {"p": full}, toy_loss(full), data, spec, tmp_path / "a", progress=False)

    p = torch.zeros(5)
    calls = {"n": 0}

    def dying(batch):
        calls["n"] += 1
        # 2 held-out scores, then killed in step 8; step 6 was saved once step 7's loss
        # showed its parameters good
        if calls["n"] == 2 + 8:
            raise KeyboardInterrupt
        return toy_loss(p)(batch)

    with pytest.raises(KeyboardInterrupt):
        train("toy", {"p": p}, dying, data, spec, tmp_path / "b", progress=False)
    assert latest_step(tmp_path / "b") == 6
    q = torch.zeros(5)
    resumed = train("toy", {"p": q}, toy_loss(q), data, spec, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 6
    assert [h["step"] for h in resumed.history] == list(range(1, 10))
    assert torch.allclose(q, full)
    assert resumed.history[-1]["loss"] == pytest.approx(whole.history[-1]["loss"])


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    data = torch.randint(0, 100, (6, 20))
    spec = TrainSpec(steps=10, lr=0.5, seq_len=8, checkpoint_every=2, eval_samples=0)
    p = torch.ones(3)

    def loss(batch):
        # finite for four steps, then the loss overflows, as a too-high lr makes it do
        return (p.sum() * (1e39 if len(history) >= 4 else 1.0)) ** 2

    history = []

    def counting(batch):
        out = loss(batch)
        history.append(float(out.detach()))
        return out

    # step 4's parameters give the infinite loss of step 5: step 2 is the last good one
    with pytest.raises(TrainingDivergedError, match=r"step 5 .*lower training\.lr.*step 2"):
        train("toy", {"p": p}, counting, data, spec, tmp_path, progress=False)
    assert latest_step(tmp_path) == 2
    saved = torch.load(tmp_path / "step-000002.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in saved["params"].values())


@pytest.mark.parametrize("bad", [0, -3])
def test_zero_or_negative_steps_are_refused_naming_the_field(bad):
    with pytest.raises(ConfigError, match=r"steps\.1\.training\.steps"):
        steps({"method": "rtn"}, {"method": "peqa", "training": {"steps": bad}})


def test_peqa_changes_scales_and_keeps_the_integers_bit_identical(tiny_model, ids):
    model = tiny_model()
    rtn = quantize_model(model, steps({"method": "rtn", "weights": W3G16}), None, progress=False)
    before = {n: q.scale.clone() for n, q in rtn.layers.items()}
    ints = {
        n: quantize(model.get_submodule(n).weight.data, q.scale, q.zero, q.scheme)
        for n, q in rtn.layers.items()
    }
    model = tiny_model()
    out = quantize_model(
        model,
        steps({"method": "rtn", "weights": W3G16}, {"method": "peqa", "training": training()}),
        ids, progress=False,
    )  # fmt: skip
    changed = 0
    for name, quant in out.layers.items():
        W = model.get_submodule(name).weight.data
        assert torch.equal(quantize(W, quant.scale, quant.zero, quant.scheme), ints[name])
        changed += int(not torch.equal(quant.scale, before[name]))
    assert changed == len(out.layers)
    result = out.training[0]
    assert result.method == "peqa" and len(result.history) == 12
    assert result.eval_loss_after < result.eval_loss_before


def test_peqa_without_a_quantizing_step_before_it_is_refused(tiny_model, ids):
    with pytest.raises(ConfigError, match="rtn or gptq step"):
        recipe = steps({"method": "peqa", "training": training()})
        quantize_model(tiny_model(), recipe, ids, progress=False)


def test_a_post_training_step_after_a_training_step_is_refused(tiny_model, ids):
    with pytest.raises(ConfigError, match=r"steps\.1\.method.*training steps come last"):
        quantize_model(
            tiny_model(),
            steps({"method": "l4q", "training": training()}, {"method": "rtn"}),
            ids,
            progress=False,
        )


def test_l4q_merged_export_computes_what_the_trained_model_computed(
    tiny_model, ids, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from quantmill.export.checkpoint import save_quantized
    from quantmill.methods import l4q

    model = tiny_model()
    probe = ids[:2, :16]
    trained_logits = {}

    original_train = l4q.train

    def spying_train(label, params, loss_fn, data, spec, workdir, progress):
        result = original_train(label, params, loss_fn, data, spec, workdir, progress)
        with torch.no_grad():
            trained_logits["x"] = model(input_ids=probe).logits  # adapters still attached
        return result

    monkeypatch.setattr(l4q, "train", spying_train)
    out = quantize_model(
        model,
        steps({"method": "l4q", "weights": W3G16, "rank": 4, "training": training()}),
        ids, progress=False,
    )  # fmt: skip
    assert not any("parametrizations" in n for n, _ in model.named_modules())
    save_quantized(model, tiny_tokenizer(), out.layers, tmp_path / "ckpt", "packed")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        exported = loaded(input_ids=probe).logits
    assert torch.allclose(exported, trained_logits["x"], atol=1e-4)
    assert out.training[0].eval_loss_after < out.training[0].eval_loss_before


def test_llm_qat_trains_on_text_the_model_writes_and_rounds_to_its_grid(
    tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path))
    model = tiny_model()
    recipe = parse_recipe(
        {"steps": [{"method": "llm_qat", "weights": {"bits": 2, "group_size": None},
                    "generated_samples": 6, "training": training(lr=1e-3)}]}
    )  # fmt: skip
    assert recipe.evaluation.kv_cache is not None  # the step's KV setting is evaluated
    context = TrainContext(None, cache=True, model_key="tiny", progress=False)
    out = quantize_model(model, recipe.steps, None, progress=False, training=context)
    assert len(list((tmp_path / "generated").iterdir())) == 1  # the generated text is cached
    result = out.training[0]
    assert result.eval_loss_after < result.eval_loss_before
    for name, quant in out.layers.items():
        W = model.get_submodule(name).weight.data
        assert quant.activations is not None
        assert torch.equal(W, fake_quantize(W, quant.scale, quant.zero, quant.scheme))
