"""The ``rotate`` step: an orthogonal rotation of the residual stream (QuaRot-style
random Hadamard, or a random orthogonal matrix) and of each value head, folded into
the weights before the steps that quantize (``quantmill.rotation`` does the work,
on the whole checkpoint, before the blocks are quantized)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from quantmill.arch import ARCHITECTURES, ArchSpec
from quantmill.config import MethodConfig
from quantmill.errors import ConfigError
from quantmill.methods.base import Method
from quantmill.quant.hadamard import hadamard
from quantmill.registry import Needs, register_method
from quantmill.rotation import head_dim_of


class RotateConfig(MethodConfig):
    quantizes: ClassVar[bool] = False  # it rewrites weights; a later step quantizes them
    method: Literal["rotate"] = "rotate"
    # hadamard: random signs then a Hadamard matrix (QuaRot); orthogonal: Haar-random
    kind: Literal["hadamard", "orthogonal"] = "hadamard"
    seed: int = Field(0, ge=0, description="the random signs' (or matrix's) seed")
    # Also rotate each value head (v_proj's rows, o_proj's columns): SpinQuant's R2.
    heads: bool = True

    @model_validator(mode="after")
    def _whole_model(self) -> RotateConfig:
        if self.targets != ["*"] or self.activations is not None:
            raise ValueError(
                "targets/activations: a rotation applies to the whole model and quantizes "
                "nothing; leave targets and activations unset and set them on the next step"
            )
        return self


@register_method("rotate", config=RotateConfig, needs=Needs(rotates=True))
class Rotate(Method):
    config: RotateConfig
    label = "rotate"

    def check_model(self, model: nn.Module, spec: ArchSpec) -> None:
        model_type = model.config.model_type
        if spec.rotation is None:
            able = sorted(t for t, s in ARCHITECTURES.items() if s.rotation is not None)
            raise ConfigError(
                f"method: rotate needs the architecture's rotation table (its RMS norms and "
                f"the layers that read and write the residual stream); {model_type} has "
                f"none. Architectures that can be rotated: {', '.join(able)}"
            )
        if self.config.kind != "hadamard":
            return
        sizes = {"hidden_size": model.config.hidden_size}
        if self.config.heads and spec.rotation.values is not None:
            sizes["head_dim"] = head_dim_of(model.config)
        for field, size in sizes.items():
            if hadamard(size) is None:
                raise ConfigError(
                    f"kind: hadamard has no Hadamard matrix of the model's {field} = {size} "
                    "(built here: 2^k times 1 or a Paley order); use kind: orthogonal"
                    + (" or heads: false" if field == "head_dim" else "")
                )
