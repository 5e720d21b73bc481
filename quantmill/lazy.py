"""A model whose structure is built without weights and whose weights arrive block by block.

``LazyModel.open`` builds the architecture on the meta device (buffers such
as rotary frequencies are real), reads the checkpoint's safetensors headers
and checks them against the structure: every parameter present, every shape
as the config says. Nothing else is read. Then:

- ``load(module, prefix)`` reads that module's parameters onto the compute
  device in the compute dtype, and ``release`` puts the empty ones back;
- ``embedded()`` makes the model runnable up to its first block: the input
  embedding reads only the rows of the token ids it is given (a 128k-token
  vocabulary costs the rows seen, not the table), small non-block weights are
  loaded, nothing else;
- ``output()`` loads the head (for perplexity);
- ``load_all()`` materializes the whole model (quantization-aware training,
  which needs every weight at once).

The compute dtype is the caller's; the checkpoint's own dtypes are kept in
``source_dtype`` so that what is written back keeps them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from quantmill.arch import ArchSpec, arch_for, check_supported, decoder_blocks, stored_name
from quantmill.errors import CheckpointError, ModelSourceError
from quantmill.moe import unfuse_experts
from quantmill.quant.grid import all_finite
from quantmill.weights import WeightFiles

log = logging.getLogger(__name__)
# transformers builds models under process-wide patches (empty-weight init, default
# dtype), so two threads building at once corrupt each other's model (meta tensors).
# Building and loading are serialized; everything after runs concurrently.
LOAD_LOCK = threading.Lock()


@dataclass
class LazyModel:
    model: nn.Module  # parameters on the meta device until loaded
    files: WeightFiles
    device: torch.device
    dtype: torch.dtype
    names: dict[str, str]  # parameter name in the model → tensor name in the files
    _empty: dict[str, nn.Parameter] = field(default_factory=dict)  # what ``release`` restores

    @classmethod
    def open(
        cls,
        folder: Path,
        device: torch.device,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> LazyModel:
        """The structure of the checkpoint in ``folder`` and its checked weight files.

        ``dtype`` ``None`` computes in the checkpoint's main dtype.
        """
        files = WeightFiles(folder)
        dtype = dtype or files.main_dtype()
        model = empty_model(folder, dtype, trust_remote_code)
        arch_for(model)  # an unsupported architecture fails before anything else
        lazy = cls(model, files, device, dtype, check_tensors(model, files, folder))
        for name, buffer in list(model.named_buffers()):
            _put(model, name, buffer.to(device), buffer=True)
        return lazy

    @property
    def spec(self) -> ArchSpec:
        return arch_for(self.model)

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_blocks(self.model, self.spec)

    def block_prefix(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}."

    def source_dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(self.names[name])

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype ``name`` is written back in: the source's, or a buffer's own."""
        if name in self.names:
            return self.source_dtype(name)
        return self.model.get_buffer(name).dtype

    def read(self, name: str) -> Tensor:
        """Parameter ``name`` from the files, on the device, floating ones in the compute dtype."""
        tensor = self.files.read(self.names[name], self.device, self.dtype)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(
                f"tensor {self.names[name]} in {self.files.folder} holds NaN or inf values; "
                "the checkpoint is corrupted and cannot be quantized"
            )
        return tensor

    def load(self, module: nn.Module, prefix: str) -> None:
        """Read ``module``'s parameters (full names start with ``prefix``)."""
        for name, _ in list(module.named_parameters()):
            self._load_param(prefix + name)

    def release(self, module: nn.Module, prefix: str) -> None:
        """Drop ``module``'s weights: its parameters are empty again."""
        for name, _ in list(module.named_parameters()):
            self._release_param(prefix + name)

    def load_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        self.load(block, self.block_prefix(index))
        return block

    def release_block(self, index: int) -> None:
        self.release(self.blocks[index], self.block_prefix(index))

    @contextmanager
    def embedded(self) -> Iterator[nn.Module]:
        """The model, runnable up to its first block (see the module docstring)."""
        embedding = self.model.get_input_embeddings()
        skip = {id(p) for p in self.blocks.parameters()}
        skip |= {id(p) for p in embedding.parameters()}
        output = self.model.get_output_embeddings()
        if output is not None:
            skip |= {id(p) for p in output.parameters()}
        small = [(n, p) for n, p in self.model.named_parameters() if id(p) not in skip]
        for name, _ in small:
            self._load_param(name)
        prefix = _prefix_of(self.model, embedding)
        handles = _gather_rows(embedding, lambda rows: self._rows(prefix + "weight", rows))
        try:
            yield self.model
        finally:
            for handle in handles:
                handle.remove()
            for name, _ in small:
                self._release_param(name)

    def load_all(self) -> nn.Module:
        """Every weight on the device: the whole model in memory, ties restored."""
        self.load(self.model, "")
        self.model.tie_weights()
        return self.model

    @contextmanager
    def output(self) -> Iterator[nn.Module]:
        """The output embedding (the head), loaded while inside (tied or not)."""
        head = self.model.get_output_embeddings()
        canonical = {id(p): n for n, p in self.model.named_parameters()}
        saved = dict(head._parameters)
        for leaf, param in saved.items():
            if param is not None and param.device.type == "meta":
                tensor = self.read(canonical[id(param)])
                head._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        try:
            yield head
        finally:
            head._parameters.update(saved)

    def _load_param(self, name: str) -> None:
        param = self.model.get_parameter(name)
        if param.device.type == "meta":
            self._empty[name] = param
            _put(self.model, name, nn.Parameter(self.read(name), requires_grad=False))

    def _release_param(self, name: str) -> None:
        empty = self._empty.pop(name, None)
        if empty is not None:
            _put(self.model, name, empty)

    def _rows(self, name: str, rows: Tensor) -> Tensor:
        """Rows ``rows`` (sorted, unique) of the 2-D tensor ``name``, read run by run."""
        runs, start = [], 0
        values = rows.tolist()
        for i in range(1, len(values) + 1):
            if i == len(values) or values[i] != values[i - 1] + 1:
                first, last = values[start], values[i - 1] + 1
                runs.append(self.files.read(self.names[name], rows=slice(first, last)))
                start = i
        return torch.cat(runs).to(self.device, self.dtype)


def open_model(
    folder: Path, device: torch.device, dtype: str = "auto", trust_remote_code: bool = False
) -> LazyModel:
    """``LazyModel.open`` with the dtype given as ``--dtype`` takes it (``auto``...)."""
    from quantmill.devices import resolve_dtype

    source = WeightFiles(folder).main_dtype()
    return LazyModel.open(folder, device, resolve_dtype(dtype, device, source), trust_remote_code)


def empty_model(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture of ``folder``'s config with empty (meta) parameters, real buffers."""
    config = read_config(folder, trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise CheckpointError(
            f"model {folder} is already quantized (quantization_config in config.json); "
            "quantize the original model instead"
        )
    return empty_model_from_config(config, dtype, trust_remote_code)


def read_config(folder: Path, trust_remote_code: bool = False):
    """``folder``'s config; a broken ``config.json`` is named, with the fix."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        what = "its config.json cannot be read (fix it, or download the model again)"
        raise loading_error(str(folder), exc, what) from exc


def loading_error(source: str, exc: ValueError, what: str) -> Exception:
    """What a ``ValueError`` from transformers' loading means for the user."""
    if "trust_remote_code" in str(exc):
        return ModelSourceError(
            f"model {source!r} needs its own code to load; quantmill does not run remote "
            "code unless you pass --trust-remote-code"
        )
    return CheckpointError(f"model {source!r}: {what}: {exc}")


def empty_model_from_config(
    config, dtype: torch.dtype, trust_remote_code: bool = False
) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_supported(getattr(config, "model_type", None))  # not transformers' 230 class names
    with LOAD_LOCK, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.tie_weights()
    unfuse_experts(model, arch_for(model))  # per-expert layers, named as the files name them
    return model.eval()


def check_tensors(model: nn.Module, files: WeightFiles, folder: Path) -> dict[str, str]:
    """Every parameter's tensor in the files with the shape the config implies.

    Returns the name map (checkpoints saved from the bare base model lack its prefix).
    """
    base = getattr(model, "base_model_prefix", "") or ""
    spec = arch_for(model)
    names: dict[str, str] = {}
    for name, param in model.named_parameters():
        stored = stored_name(spec, name)
        stored = stored if stored in files else stored.removeprefix(base + ".")
        if stored not in files:
            raise CheckpointError(
                f"the weights in {folder} have no tensor {name}, which the config's "
                f"{type(model).__name__} needs; the checkpoint is incomplete or does not "
                "belong to this config"
            )
        if files.shape(stored) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {stored} in {files.tensors[stored].file.name} has shape "
                f"{list(files.shape(stored))} but the config implies {list(param.shape)}; "
                "the weights do not belong to this config.json"
            )
        names[name] = stored
    return names


def _put(root: nn.Module, name: str, value: Tensor, buffer: bool = False) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    (module._buffers if buffer else module._parameters)[leaf] = value


def _prefix_of(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError("module is not part of the model")


def _gather_rows(embedding: nn.Module, rows_of) -> list:
    """Hooks that let ``embedding`` run on just the rows its input ids name.

    Before the forward the ids are replaced by their positions among the unique
    ids and the weight by those rows; after it the empty weight is put back. The
    module's own forward (scaling, padding rules) runs unchanged on that table.
    """
    saved: dict[str, object] = {}

    def before(module: nn.Module, args: tuple):
        ids = args[0]
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        saved["weight"], saved["padding_idx"] = module.weight, getattr(module, "padding_idx", None)
        module._parameters["weight"] = nn.Parameter(rows_of(unique.cpu()), requires_grad=False)
        if saved["padding_idx"] is not None:
            module.padding_idx = None  # an index into the full table; only gradients use it
        return (inverse.to(ids.device), *args[1:])

    def after(module: nn.Module, args: tuple, output: Tensor):
        module._parameters["weight"] = saved.pop("weight")
        if saved.get("padding_idx") is not None:
            module.padding_idx = saved["padding_idx"]
        saved.clear()
        return output

    return [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]
