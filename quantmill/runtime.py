"""Running quantized activations: hooks while calibrating, integer modules at evaluation.

The methods leave weights on their grid (``LayerQuant``); what happens to a
layer's *input* at run time is recorded per layer in ``quantmill_runtime.json``
beside the checkpoint:

- ``{"activations": {"bits": 8, "symmetric": true}}`` with 8-bit per-channel
  symmetric weights: ``Int8Linear``, a real ``int8 × int8 → int32`` matmul;
- ``{"outlier_threshold": 6.0}``: ``MixedInt8Linear`` (LLM.int8());
- any other activation setting (W4A8, asymmetric): ``ActQuantLinear``,
  per-token fake quantization of the input before the float matmul.

While calibrating, ``activation_hooks`` simulates the same on the float
model, so later blocks see what the quantized model will produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from quantmill.config import ActScheme
from quantmill.folder import RUNTIME_FILE, weight_files
from quantmill.hooks import hooks_removed
from quantmill.quant.act import fake_quantize_tokens
from quantmill.quant.int8 import fake_mixed_int8, int8_linear, mixed_int8_linear

if TYPE_CHECKING:
    from quantmill.layers import LayerQuant


def layer_runtime(quant: LayerQuant) -> dict[str, Any] | None:
    """The sidecar entry for one layer, or ``None`` for a weight-only layer."""
    if quant.outlier_threshold is not None:
        return {"outlier_threshold": quant.outlier_threshold}
    if quant.activations is not None:
        return {"activations": quant.activations.model_dump()}
    return None


def runtime_spec(layers: dict[str, LayerQuant]) -> dict[str, dict[str, Any]]:
    spec = {name: layer_runtime(quant) for name, quant in layers.items()}
    return {name: entry for name, entry in spec.items() if entry is not None}


def input_transform(entry: dict[str, Any]):
    """The function a layer's input goes through, simulated in floating point."""
    if entry.get("outlier_threshold") is not None:
        threshold = float(entry["outlier_threshold"])
        return lambda x: fake_mixed_int8(x, threshold)
    scheme = ActScheme.model_validate(entry["activations"])
    return lambda x: fake_quantize_tokens(x, scheme)


@contextmanager
def activation_hooks(
    root: nn.Module, spec: dict[str, dict[str, Any]], prefix: str = ""
) -> Iterator[None]:
    """Quantize the inputs of ``root``'s layers named in ``spec`` (full names) while inside."""
    handles = []
    for name, module in root.named_modules():
        entry = spec.get(prefix + name)
        if entry is not None:
            transform = input_transform(entry)
            handles.append(module.register_forward_pre_hook(_pre_hook(transform)))
    with hooks_removed(handles):
        yield


def _pre_hook(transform):
    def hook(module: nn.Module, args: tuple):
        return (transform(args[0]), *args[1:])

    return hook


class Int8Linear(nn.Module):
    """W8A8: int8 weights ``[in, out]`` (per output channel scale), int8 tokens, int32 sums."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight_t", qweight.t().contiguous())
        self.register_buffer("w_scale", scale.float().reshape(1, -1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight_t, self.w_scale, self.bias)


class MixedInt8Linear(Int8Linear):
    """LLM.int8(): outlier input columns in floating point, the rest in int8.

    ``outlier_columns`` / ``columns_seen`` count what the decomposition did.
    """

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None, threshold: float):
        super().__init__(qweight, scale, bias)
        self.threshold = threshold
        self.outlier_columns = 0
        self.columns_seen = 0

    def forward(self, x: Tensor) -> Tensor:
        y, count = mixed_int8_linear(x, self.qweight_t, self.w_scale, self.bias, self.threshold)
        self.outlier_columns += count
        self.columns_seen += self.in_features
        return y


class ActQuantLinear(nn.Module):
    """Per-token fake-quantized input, then the float layer (W4A8 and other settings)."""

    def __init__(self, linear: nn.Linear, scheme: ActScheme) -> None:
        super().__init__()
        self.linear = linear
        self.scheme = scheme

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(fake_quantize_tokens(x, self.scheme))


def read_runtime(folder: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(folder) / RUNTIME_FILE
    return json.loads(path.read_text())["layers"] if path.is_file() else {}


def write_runtime(folder: str | Path, layers: dict[str, LayerQuant]) -> None:
    spec = runtime_spec(layers)
    if spec:
        text = json.dumps({"layers": spec}, indent=2, sort_keys=True)
        (Path(folder) / RUNTIME_FILE).write_text(text + "\n")


@torch.no_grad()
def apply_runtime(model: nn.Module, folder: str | Path, described: bool = True) -> dict[str, str]:
    """Swap the layers named in the checkpoint's runtime file for quantized-input modules.

    Integer modules take their int8 weights and scales from the checkpoint's own
    files. ``described=False`` swaps only what compressed-tensors cannot describe
    (LLM.int8()): the other layers keep the input quantization transformers applies
    from the checkpoint's config, so a figure measured so is what transformers (and
    its users) get, bit for bit. Returns ``{layer: module class}`` for what was swapped.
    """
    spec = read_runtime(folder)
    if not described:  # leave to transformers what the checkpoint's config describes
        spec = {n: e for n, e in spec.items() if e.get("outlier_threshold") is not None}
    swapped: dict[str, str] = {}
    if not spec:
        return swapped
    tensors = _int8_weights(Path(folder), set(spec))
    for name, entry in spec.items():
        linear = model.get_submodule(name)
        module = _runtime_module(linear, entry, tensors.get(name))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
        swapped[name] = type(module).__name__
    return swapped


def runtime_summary(model: nn.Module) -> dict[str, Any]:
    """How many layers ran each way, and LLM.int8()'s share of float columns."""
    counts: dict[str, int] = {}
    outliers = seen = 0
    for module in model.modules():
        kind = None
        if isinstance(module, Int8Linear | ActQuantLinear | _Simulated):
            kind = type(module).__name__
        elif getattr(getattr(module, "quantization_scheme", None), "input_activations", None):
            kind = "CompressedTensorsLinear"  # transformers quantizes its input itself
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
        if isinstance(module, MixedInt8Linear):
            outliers += module.outlier_columns
            seen += module.columns_seen
    if not counts:
        return {}
    summary: dict[str, Any] = {"runtime_layers": counts}
    if seen:
        summary["outlier_column_fraction"] = outliers / seen
    return summary


def _runtime_module(
    linear: nn.Linear, entry: dict[str, Any], stored: tuple[Tensor, Tensor] | None
) -> nn.Module:
    threshold = entry.get("outlier_threshold")
    scheme = ActScheme.model_validate(entry["activations"]) if "activations" in entry else None
    integer = stored is not None and (threshold is not None or scheme == ActScheme(bits=8))
    if integer:
        qweight, scale = stored
        if threshold is not None:
            return MixedInt8Linear(qweight, scale, linear.bias, float(threshold))
        return Int8Linear(qweight, scale, linear.bias)
    plain = _plain_linear(linear)
    if scheme is None:  # outlier threshold on weights we cannot run in int8: simulate
        return _Simulated(plain, input_transform(entry))
    return ActQuantLinear(plain, scheme)


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    """The same weights in a fresh ``nn.Linear``: no input quantization of its own
    (compressed-tensors wraps the forward of layers it loaded with activation args)."""
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    plain.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    if linear.bias is not None:
        plain.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return plain


class _Simulated(nn.Module):
    def __init__(self, linear: nn.Linear, transform) -> None:
        super().__init__()
        self.linear = linear
        self.transform = transform

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.transform(x))


def _int8_weights(folder: Path, names: set[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Stored int8 per-channel weights (``weight`` int8, ``weight_scale`` ``[out, 1]``)."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            keys = set(fh.keys())
            for name in names:
                w, s = f"{name}.weight", f"{name}.weight_scale"
                symmetric = f"{name}.weight_zero_point" not in keys
                if w in keys and s in keys and symmetric and fh.get_slice(w).get_dtype() == "I8":
                    scale = fh.get_tensor(s)
                    if scale.dim() == 2 and scale.shape[1] == 1:  # one scale per output channel
                        found[name] = (fh.get_tensor(w), scale.float().reshape(-1))
    return found
