"""Mixture-of-experts blocks as quantizable layers: module rewiring only.

In transformers 5 the experts of Mixtral, Qwen2-MoE and Qwen3-MoE are one
module holding fused 3-D parameters (``gate_up_proj`` ``[experts, 2 × inter,
hidden]``, ``down_proj`` ``[experts, hidden, inter]``), not ``nn.Linear``
modules. :func:`unfuse_experts` replaces each such module by :class:`Experts`,
a list of per-expert MLPs of three ``nn.Linear`` layers named as the
checkpoints on the Hub name them (``mlp.experts.3.gate_proj``): what the rest
of quantmill quantizes, what compressed-tensors MoE checkpoints store and vLLM
loads, and what transformers merges back into fused parameters when it loads a
float checkpoint. The computation is the model's own: each token goes to its
router's top-k experts, weighted as the router says.

During calibration (:func:`calibrating_all_experts`) every expert also runs on
the tokens the router did not send it, so that every expert's statistics cover
the whole calibration set (llm-compressor's ``moe_calibrate_all_experts``);
only the routed tokens' results form the block's output, so later blocks see
what the model computes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from quantmill.arch import ArchSpec

log = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its three layers named as the
    architecture's checkpoints name them (``names``: gate, up, down)."""

    def __init__(
        self, hidden: int, inter: int, act_fn: nn.Module, names: tuple[str, str, str],
        device, dtype,
    ) -> None:  # fmt: skip
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.names = names
        shapes = ((hidden, inter), (hidden, inter), (inter, hidden))
        for name, (n_in, n_out) in zip(names, shapes, strict=True):
            setattr(self, name, nn.Linear(n_in, n_out, **kw))
        self.act_fn = act_fn

    def layers(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        gate, up, down = (getattr(self, name) for name in self.names)
        return gate, up, down

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = self.layers()
        return down(self.act_fn(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """Per-expert MLPs called as the fused experts module is: ``(hidden_states
    [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k])``.

    ``routed`` counts the tokens the router sent each expert since the last
    :meth:`reset_counts`; ``all_tokens`` makes every expert see every token."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.all_tokens = False
        self.routed = [0] * len(experts)

    @property
    def num_experts(self) -> int:
        return len(self)

    def reset_counts(self) -> None:
        self.routed = [0] * len(self)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            self.routed[e] += int(token.numel())
            if self.all_tokens:
                y = expert(hidden_states)[token]
            elif token.numel():
                y = expert(hidden_states[token])
            else:
                continue
            weight = top_k_weights[token, slot, None]
            out.index_add_(0, token, (y * weight).to(out.dtype))
        return out


def _fused(module: nn.Module) -> bool:
    weight = getattr(module, "gate_up_proj", None)
    return isinstance(weight, Tensor) and weight.dim() == 3


def unfuse(module: nn.Module, names: tuple[str, str, str]) -> Experts:
    """An :class:`Experts` computing what the fused ``module`` computes (on the meta
    device when its parameters are; values copied otherwise)."""
    gate_up, fused_down = module.gate_up_proj, module.down_proj
    count, double, hidden = gate_up.shape
    inter = double // 2
    experts = []
    for e in range(count):
        mlp = ExpertMLP(hidden, inter, module.act_fn, names, gate_up.device, gate_up.dtype)
        if gate_up.device.type != "meta":
            gate, up, down = mlp.layers()
            with torch.no_grad():
                gate.weight.copy_(gate_up[e, :inter])
                up.weight.copy_(gate_up[e, inter:])
                down.weight.copy_(fused_down[e])
        experts.append(mlp)
    return Experts(experts)


def unfuse_experts(model: nn.Module, spec: ArchSpec) -> int:
    """Replace every fused experts module of ``model``'s blocks; returns how many."""
    if spec.experts is None:
        return 0
    blocks = model.get_submodule(spec.blocks)
    owner_name, _, leaf = spec.experts.rpartition(".")
    done = 0
    for block in blocks:
        owner = block.get_submodule(owner_name) if owner_name else block
        module = getattr(owner, leaf, None)
        if module is not None and _fused(module):
            setattr(owner, leaf, unfuse(module, spec.expert_linears))
            done += 1
    return done


def block_experts(block: nn.Module) -> list[Experts]:
    return [m for m in block.modules() if isinstance(m, Experts)]


@contextmanager
def calibrating_all_experts(block: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: every expert of ``block`` runs on every token (outputs still routed)."""
    experts = block_experts(block)
    for module in experts:
        module.all_tokens = enabled
    try:
        yield
    finally:
        for module in experts:
            module.all_tokens = False


def expert_tokens(
    block: nn.Module, spec: ArchSpec, prefix: str, inputs, all_experts: bool
) -> dict[str, dict[str, float | str]]:
    """Per expert layer of ``block`` (full names): the tokens its router sent it in the
    last calibration pass and the tokens it was calibrated on; a warning (logged and
    kept) where routed-only calibration gave an expert fewer tokens than its inputs."""
    found = block_experts(block)
    if not found or spec.experts is None:
        return {}
    total = sum(int(h.shape[0] * h.shape[1]) for h in inputs.hidden)
    figures: dict[str, dict[str, float | str]] = {}
    for experts in found:
        for e, routed in enumerate(experts.routed):
            calibrated = total if all_experts else routed
            warned = None
            for linear in spec.expert_linears:
                name = f"{prefix}{spec.experts}.{e}.{linear}"
                entry: dict[str, float | str] = {
                    "routed_tokens": routed, "calibrated_tokens": calibrated,
                }  # fmt: skip
                width = getattr(experts[e], linear).in_features
                if calibrated < width:
                    entry["warning"] = warned = (
                        f"calibrated on {calibrated} tokens, fewer than its {width} inputs"
                        + ("" if calibrated else ": falls back to round-to-nearest")
                    )
                figures[name] = entry
            if warned:
                log.warning("%s%s.%d: %s", prefix, spec.experts, e, warned)
    return figures


def token_table(reports: list[dict]) -> dict[str, list]:
    """One row per expert layer of a run's layer reports (as ``asdict`` gives them):
    the tokens routed to it and calibrated on, and the fallback it took, if any."""
    columns: dict[str, list] = {
        "layer": [], "routed_tokens": [], "calibrated_tokens": [], "fallback": [],
    }  # fmt: skip
    for report in reports:
        extra = report.get("extra") or {}
        if "routed_tokens" not in extra:
            continue
        columns["layer"].append(report["name"])
        columns["routed_tokens"].append(int(extra["routed_tokens"]))
        columns["calibrated_tokens"].append(int(extra["calibrated_tokens"]))
        columns["fallback"].append(str(extra.get("fallback", "")))
    return columns


def token_summary(reports: list[dict]) -> str | None:
    """A line for the quantize report: how many expert layers, the routed tokens'
    spread, how many were calibrated on fewer tokens than inputs or fell back."""
    rows = token_table(reports)
    if not rows["layer"]:
        return None
    routed = sorted(rows["routed_tokens"])
    low = sum(1 for r in reports if "warning" in (r.get("extra") or {}))
    fell = [f for f in rows["fallback"] if f]
    how = f" ({', '.join(sorted(set(fell)))})" if fell else ""
    return (
        f"experts: {len(routed)} expert layers; routed tokens min {routed[0]}, median "
        f"{routed[len(routed) // 2]}, max {routed[-1]}; calibrated on "
        f"{min(rows['calibrated_tokens'])}-{max(rows['calibrated_tokens'])} tokens; "
        f"{low} under-calibrated, {len(fell)} fell back{how}"
    )
