"""Per-method figures from layer reports become stepped MLflow metrics."""

import math

from tracking.figures import method_metrics, training_metrics


def test_lkd_losses_alphas_and_outlier_fractions_become_stepped_metrics():
    layers = [
        {"name": "b.0", "method": "zeroquant-lkd", "loss": 0.1, "extra": {"initial_loss": 0.3}},
        {"name": "b.0.q", "method": "zeroquant", "loss": 5.0, "extra": {}},
        {"name": "b.1", "method": "zeroquant-lkd", "loss": 0.05, "extra": {"initial_loss": 0.2}},
        {"name": "b.0.ln", "method": "smoothquant", "loss": math.nan, "extra": {"alpha": 0.7}},
        {"name": "b.0.v", "method": "smoothquant", "loss": math.nan, "extra": {"skipped": "gqa"}},
        {"name": "b.0.q", "method": "llm_int8", "loss": 1.0, "extra": {"outlier_fraction": 0.25}},
        {"name": "b.0", "method": "autoround-block", "loss": 0.2, "extra": {"initial_loss": 0.4}},
    ]
    got = {(m.key, m.step): m.value for m in method_metrics(layers)}
    assert got == {
        ("lkd_loss", 0): 0.1,
        ("lkd_loss_before", 0): 0.3,
        ("lkd_loss", 1): 0.05,
        ("lkd_loss_before", 1): 0.2,
        ("smoothquant_alpha", 0): 0.7,
        ("outlier_column_fraction", 0): 0.25,
        ("autoround_loss", 0): 0.2,
        ("autoround_loss_rtn", 0): 0.4,
    }


def test_method_plots_are_drawn_only_for_their_methods(tmp_path):
    from quantmill import plots

    lkd = [
        {"name": f"b.{i}", "method": "zeroquant-lkd", "loss": 0.1, "extra": {"initial_loss": 0.2}}
        for i in range(3)
    ]
    int8 = [
        {
            "name": "b.0.q_proj",
            "method": "llm_int8",
            "loss": 1.0,
            "extra": {"outlier_fraction": 0.1},
        }
    ]
    assert plots.distillation(lkd, tmp_path / "d.png").stat().st_size > 1000
    autoround = [{**r, "method": "autoround-block"} for r in lkd]
    assert plots.distillation(autoround, tmp_path / "a.png").stat().st_size > 1000
    assert plots.outlier_columns(int8, tmp_path / "o.png").stat().st_size > 1000
    assert plots.distillation(int8, tmp_path / "x.png") is None
    assert plots.outlier_columns(lkd, tmp_path / "y.png") is None
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_training_loss_and_learning_rate_become_stepped_metrics(tmp_path):
    from quantmill import plots

    result = {
        "method": "peqa", "steps": 3, "resumed_from": 2, "tokens_seen": 768, "seconds": 9.5,
        "eval_loss_before": 3.2, "eval_loss_after": 3.0,
        "history": [
            {"step": 1, "loss": 3.1, "lr": 1e-4},
            {"step": 2, "loss": math.nan, "lr": 5e-5},
            {"step": 3, "loss": 2.9, "lr": 0.0},
        ],
    }  # fmt: skip
    got = {(m.key, m.step): m.value for m in training_metrics([result])}
    assert got[("train_loss", 1)] == 3.1 and got[("train_loss", 3)] == 2.9
    assert ("train_loss", 2) not in got  # MLflow refuses NaN
    assert [got[("train_lr", s)] for s in (1, 2, 3)] == [1e-4, 5e-5, 0.0]
    assert got[("train_tokens", 0)] == 768 and got[("train_eval_loss_after", 0)] == 3.0
    assert plots.training([result], tmp_path / "t.png").stat().st_size > 0
    assert plots.training([], tmp_path / "none.png") is None
