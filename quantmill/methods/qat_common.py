"""What the quantization-aware methods share: their config fields, the layers they
train, the language-model loss, and the parametrization plumbing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils import parametrize

from quantmill.arch import arch_for, block_linears, decoder_blocks
from quantmill.config import MethodConfig, TrainSpec
from quantmill.errors import CalibrationDataError, ConfigError
from quantmill.qat.ste import stored_ste


class LearnedScale(nn.Module):
    """Base of the parametrizations that train scales, as ``s0 · exp(g)`` with ``g``
    starting at 0: the same scales, kept positive, with a learning rate that means a
    relative change."""

    def learn_scale(self, s0: Tensor) -> None:
        self.register_buffer("s0", s0.float().clone())
        self.log_gain = nn.Parameter(torch.zeros_like(self.s0))

    def raw_scale(self) -> Tensor:
        return self.s0 * self.log_gain.exp()

    def scale(self) -> Tensor:
        """The scale as the checkpoint stores it (float16 values)."""
        return stored_ste(self.raw_scale())


class TrainingConfig(MethodConfig):
    training: TrainSpec = Field(default_factory=TrainSpec)


def model_linears(model: nn.Module, config: MethodConfig) -> dict[str, nn.Linear]:
    """Every decoder-block linear the step selects, by full module name."""
    spec = arch_for(model)
    found = {}
    for index, block in enumerate(decoder_blocks(model, spec)):
        prefix = f"{spec.blocks}.{index}."
        for name, module in block_linears(block, spec).items():
            if config.selects(prefix + name):
                found[prefix + name] = module
    return found


def check_linear(model: nn.Module, spec, method: str) -> None:
    if spec.conv1d:
        raise ConfigError(
            f"method: {method} trains nn.Linear layers; {model.config.model_type} uses "
            "Conv1D. Use a post-training method for this model"
        )


def text_rows(calib_ids: Tensor | None, method: str) -> Tensor:
    if calib_ids is None or calib_ids.numel() == 0:
        raise CalibrationDataError(
            f"{method} trains on text and none was given "
            "(calibration.num_samples samples of calibration.seq_len tokens)"
        )
    return calib_ids


def lm_loss(model: nn.Module):
    """Next-token cross entropy of ``model`` on a batch of token ids."""

    def loss(batch: Tensor) -> Tensor:
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    return loss


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` frozen inside (restored after)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextmanager
def parametrized(
    modules: dict[str, nn.Linear], make, leave: bool = True
) -> Iterator[dict[str, nn.Module]]:
    """Register ``make(name, module)`` as each module's weight parametrization; on exit
    the plain weight becomes the parametrized value (``leave``) or the latent one."""
    added = {}
    try:
        for name, module in modules.items():
            added[name] = make(name, module)
            parametrize.register_parametrization(module, "weight", added[name], unsafe=True)
        yield added
    finally:
        for name in added:
            module = modules[name]
            if parametrize.is_parametrized(module, "weight"):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, "weight", leave_parametrized=leave)
