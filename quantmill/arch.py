"""Architecture knowledge as data: where the decoder blocks and their linear layers are.

Each entry lists the block's linear layers in execution order, grouped by
the input they share (q/k/v read the same normed hidden states), so a
statistic such as a Hessian is collected once per group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from torch import nn

from quantmill.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Mapping:
    """A layer whose output feeds ``balance`` directly, so per-channel scales move
    exactly between them: ``smooth`` (a norm or linear) divides its output channels by
    ``s`` and every ``balance`` linear multiplies its input columns by ``s``."""

    smooth: str
    balance: tuple[str, ...]
    # A norm that scales by ``norm_offset + weight`` (Gemma's: 1 + weight); a linear
    # ``smooth`` ignores it.
    norm_offset: float = 0.0


@dataclass(frozen=True)
class RotationSpec:
    """Where a rotation of the residual stream (QuaRot) touches the model. Every
    linear that reads the residual stream reads it through one of ``norms`` (RMS norms,
    whose weights fold into their readers first); every block's ``writers`` add to it.
    ``values``: v_proj and o_proj, whose head dimension a second rotation mixes (the
    attention of a head is linear in its values); ``None`` where v is fused with q, k."""

    norms: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    values: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")
    final_norm: str = "model.norm"


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path from the model to the ModuleList of decoder blocks
    linear_groups: tuple[tuple[str, ...], ...]  # names inside a block, by shared input
    # GPT-2 stores weights as transformers' Conv1D ([in, out]) rather than nn.Linear.
    conv1d: bool = False
    # Where SmoothQuant and AWQ may move scales (norm → projections, linear → linear).
    mappings: tuple[Mapping, ...] = ()
    # Attention goes through transformers' attention interface with keys and values
    # as [batch, heads, tokens, head_dim]: what KV-cache quantization hooks into.
    kv_cache: bool = False
    # The block norms scale by ``norm_offset + weight`` (Gemma: 1): what a recipe's own
    # mappings get when they name a norm.
    norm_offset: float = 0.0
    # Mixture of experts: where a block's experts module is and the config field with
    # their number. ``arch_for`` adds each expert's gate/up and down layers to
    # ``linear_groups`` (quantmill.moe makes them nn.Linear layers of those names).
    experts: str | None = None
    expert_count: str = "num_experts"
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # How checkpoints name what transformers' modules name otherwise (substring
    # replacements, model → files): Mixtral's files say block_sparse_moe for mlp.
    stored_as: tuple[tuple[str, str], ...] = ()
    # Where a rotation applies (``quantmill.rotation``); None: rotations are refused.
    rotation: RotationSpec | None = None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)


_LLAMA = ArchSpec(
    blocks="model.layers",
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    mappings=(
        Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        # Exact only when v_proj's outputs are o_proj's inputs one to one (no grouped
        # query attention); methods skip it otherwise and say so in their report.
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
    kv_cache=True,
    rotation=RotationSpec(
        norms=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        writers=("self_attn.o_proj", "mlp.down_proj"),
    ),
)

# Phi-3 fuses q/k/v into one linear and gate/up into another. Scales cannot move
# along v → o or up → down: v and up are row slices of a fused layer.
_PHI3 = ArchSpec(
    blocks="model.layers",
    linear_groups=(
        ("self_attn.qkv_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
    ),
    mappings=(
        Mapping("input_layernorm", ("self_attn.qkv_proj",)),
        Mapping("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    kv_cache=True,
    rotation=RotationSpec(
        norms=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        values=None,
    ),
)

# Gemma 2 and 3: four norms a block (the ones after attention and after the MLP act
# on outputs, so no scale moves through them), norms that scale by 1 + weight,
# sliding and full attention by block (``config.layer_types``: quantmill.blocks).
_GEMMA = ArchSpec(
    blocks="model.layers",
    linear_groups=_LLAMA.linear_groups,
    mappings=(
        Mapping(
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            norm_offset=1.0,
        ),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), norm_offset=1.0),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
    kv_cache=True,
    norm_offset=1.0,
)

# Mixtral, Qwen2-MoE, Qwen3-MoE: attention as Llama's, then a router (``mlp.gate``,
# left in float) and experts; Qwen2-MoE adds an always-on shared expert. No scale
# moves from post_attention_layernorm: the router reads it too and is not a linear.
_MOE_ATTENTION = _LLAMA.linear_groups[:2]
_MOE = ArchSpec(
    blocks="model.layers",
    linear_groups=_MOE_ATTENTION,
    mappings=_LLAMA.mappings[:2],
    kv_cache=True,
    experts="mlp.experts",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mixtral": replace(
        _MOE,
        expert_count="num_local_experts",
        expert_linears=("w1", "w3", "w2"),
        stored_as=((".mlp.", ".block_sparse_moe."),),
    ),
    "qwen3_moe": _MOE,
    "qwen2_moe": replace(
        _MOE,
        linear_groups=_MOE_ATTENTION
        + (
            ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
            ("mlp.shared_expert.down_proj",),
        ),
    ),  # fmt: skip
    "phi3": _PHI3,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        linear_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        mappings=(
            Mapping(
                "self_attn_layer_norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ),
            Mapping("self_attn.v_proj", ("self_attn.out_proj",)),
            Mapping("final_layer_norm", ("fc1",)),
            Mapping("fc1", ("fc2",)),  # ReLU commutes with positive scales
        ),
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        conv1d=True,
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        linear_groups=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
    ),
}


def arch_for(model: nn.Module) -> ArchSpec:
    """The entry for ``model.config.model_type``; an error lists the supported ones.
    A mixture-of-experts entry comes with the model's experts among its layers."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    check_supported(model_type)
    spec = ARCHITECTURES[model_type]  # type: ignore[index]
    if spec.experts is None:
        return spec
    dense = getattr(config, "mlp_only_layers", None) or []
    if dense or getattr(config, "decoder_sparse_step", 1) != 1:
        raise UnsupportedArchitectureError(
            f"{model_type}: blocks without experts (mlp_only_layers = {dense}, "
            f"decoder_sparse_step = {getattr(config, 'decoder_sparse_step', 1)}) are not "
            "supported; every block must be a mixture-of-experts block"
        )
    return with_experts(spec, int(getattr(config, spec.expert_count)))


@lru_cache(maxsize=32)
def with_experts(spec: ArchSpec, count: int) -> ArchSpec:
    """``spec`` with each of ``count`` experts' layers: gate and up share an input."""
    gate, up, down = (f"{spec.experts}.{{}}.{name}" for name in spec.expert_linears)
    groups = tuple(
        group for e in range(count) for group in ((gate.format(e), up.format(e)), (down.format(e),))
    )
    return replace(spec, linear_groups=spec.linear_groups + groups)


def stored_name(spec: ArchSpec, name: str) -> str:
    """The name checkpoint files give the model's tensor or module ``name``."""
    for ours, theirs in spec.stored_as:
        name = name.replace(ours, theirs)
    return name


def check_supported(model_type: str | None) -> None:
    """An error listing the supported ``model_type`` values unless ``model_type`` is one."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an ArchSpec entry to "
            "quantmill/arch.py to support it."
        )


def decoder_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    blocks = model.get_submodule(spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{spec.blocks} is not a ModuleList of decoder blocks")
    return blocks


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The block's linear layers by their name inside the block, in execution order."""
    try:
        return {name: block.get_submodule(name) for name in spec.linears}
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"decoder block {type(block).__name__} does not have the layers the architecture "
            f"table lists ({exc}); the model does not match its model_type entry"
        ) from None
