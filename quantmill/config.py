"""Validated configs: quantization schemes, method steps, calibration, evaluation.

Every config is a pydantic model with ``extra="forbid"`` so a misspelt field is
an error, and each round-trips through ``model_dump()`` / ``model_validate()``.
That dict is what the CLI reads, what the pipeline passes as a parameter and
what is saved beside a checkpoint.
"""

from __future__ import annotations

import fnmatch
import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantScheme(StrictModel):
    """How weights are mapped to integers: ``w ≈ (q - zero) * scale``."""

    bits: int = Field(4, ge=2, le=8, description="integer width of each weight")
    # None (or -1 in a file) means one scale per output channel (per-channel).
    group_size: int | None = Field(
        64, description="input columns sharing one scale; null or -1 for per-channel"
    )
    symmetric: bool = Field(True, description="zero point fixed at 0 when true")
    # "mse" searches a shrink factor per group that minimises the rounding error;
    # it matters most at 3 bits and below, where min-max wastes grid points on outliers.
    # "imatrix" weights that error by each input column's activation energy (mean x²
    # over the calibration tokens, llama.cpp's importance matrix): RTN and GPTQ only,
    # which collect it.
    observer: Literal["minmax", "mse", "imatrix"] = "minmax"

    @field_validator("group_size", mode="before")
    @classmethod
    def _group_size(cls, value: object) -> object:
        if value == -1:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value < 8:
            raise ValueError("must be null or -1 (per-channel) or an integer >= 8")
        return value

    @property
    def q_min(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def q_max(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def label(self) -> str:
        group = "pc" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{group}{'s' if self.symmetric else 'a'}"


class MixedPrecision(StrictModel):
    """Per-layer schemes chosen under a size budget (``quantmill.quant.budget``): each
    layer's Hessian-weighted rounding error at every allowed scheme is measured on the
    original model's calibration statistics, then the layers that gain most per bit
    get the larger schemes until the budget is spent."""

    # average bits per weight over the step's layers, each group's float16 scale (and
    # zero point, when asymmetric) included: w4 g64 symmetric costs 4.25
    target_bits_per_weight: float = Field(gt=1, le=16)
    schemes: list[QuantScheme] = Field(min_length=2, description="what a layer may get")
    # sensitivity: by measured error (the method); random: the same sizes drawn at
    # random (a baseline that shows what the measurement buys)
    choose: Literal["sensitivity", "random"] = "sensitivity"
    seed: int = 0
    # the chosen scheme (index into ``schemes``) of each layer, by full name: filled in
    # the recipe saved beside a checkpoint, so that it reproduces the same map
    chosen: dict[str, int] | None = None

    @model_validator(mode="after")
    def _schemes(self) -> MixedPrecision:
        bits = min(s.bits for s in self.schemes)
        if self.target_bits_per_weight < bits:
            raise ValueError(
                f"target_bits_per_weight = {self.target_bits_per_weight} is below the smallest "
                f"allowed scheme ({bits} bits before its scales); raise it or allow fewer bits"
            )
        if any(s.observer == "imatrix" for s in self.schemes):
            raise ValueError("schemes: the imatrix observer is not offered with mixed precision")
        if self.chosen is not None and any(
            not 0 <= i < len(self.schemes) for i in self.chosen.values()
        ):
            raise ValueError(f"chosen: indices must lie in 0..{len(self.schemes) - 1}")
        return self


class ActScheme(StrictModel):
    """Dynamic activation quantization of a layer's input: one scale per token,
    computed at run time from that token's largest magnitude (no calibration)."""

    bits: int = Field(8, ge=4, le=8, description="integer width of each activation")
    symmetric: bool = True

    def label(self) -> str:
        return f"a{self.bits}"


class MethodConfig(StrictModel):
    """Fields every method step shares: what it quantizes and how."""

    # the methods that measure each input column's activation energy for the
    # ``imatrix`` observer set this
    takes_importance: ClassVar[bool] = False
    # False for steps that only rewrite weights (a rotation): no grid of theirs is written
    quantizes: ClassVar[bool] = True

    method: str
    weights: QuantScheme = Field(default_factory=QuantScheme)
    # Quantize each selected layer's input per token at run time (W8A8, W4A8);
    # null keeps activations in floating point (weight-only).
    activations: ActScheme | None = None
    # Patterns over module names: "re:<regex>" or a shell-style glob ("*.q_proj").
    targets: list[str] = Field(default_factory=lambda: ["*"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _importance(self) -> MethodConfig:
        if self.weights.observer == "imatrix" and not self.takes_importance:
            raise ValueError(
                f"weights.observer: imatrix needs each input column's activation energy, "
                f"which {self.method} does not collect; use it with rtn or gptq, or use mse"
            )
        return self

    def weight_schemes(self) -> list[QuantScheme]:
        """The schemes this step may give a layer (several with mixed precision)."""
        mixed = getattr(self, "mixed", None)
        return list(mixed.schemes) if mixed is not None else [self.weights]

    def selects(self, name: str) -> bool:
        """True when module ``name`` is targeted and not ignored."""
        return _matches_any(name, self.targets) and not _matches_any(name, self.ignore)


def _matches_any(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or name.split(".")[-1] == pattern:
            return True
    return False


class CalibrationSpec(StrictModel):
    """Which text calibrates the model, and how much of it."""

    # A datasets name on the Hub ("wikitext") or a path to a local text file.
    dataset: str = "wikitext"
    dataset_config: str | None = "wikitext-2-raw-v1"
    split: str = "train"
    num_samples: int = Field(128, ge=1, le=100_000)
    seq_len: int = Field(512, ge=8, le=32_768)
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="samples per forward pass")
    # Mixture-of-experts models: every expert is calibrated on every token (its router
    # still decides the block's output); false: each on the tokens routed to it.
    all_experts: bool = True


class QualityGate(StrictModel):
    """The least recovery that makes a release candidate: perplexity (original /
    quantized) and, when set, mean zero-shot accuracy (quantized / original over the
    run's ``evaluation.tasks``)."""

    min_recovery: float = Field(0.8, gt=0, le=1)
    min_accuracy_recovery: float | None = Field(None, gt=0, le=1)


class KVCacheSpec(StrictModel):
    """Quantize attention keys and values (what a KV cache holds) during evaluation."""

    bits: Literal[4, 8] = 8
    # "token": one scale per token over all heads; "head": one per token and head.
    granularity: Literal["token", "head"] = "token"
    symmetric: bool = False

    def label(self) -> str:
        return f"kv{self.bits}{self.granularity[0]}"


class EvalSpec(StrictModel):
    """Perplexity protocol of the GPTQ paper: non-overlapping windows of the test text."""

    dataset: str = "wikitext"
    dataset_config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    seq_len: int = Field(2048, ge=8, le=32_768)
    # None evaluates every window; a cap keeps evaluation inside a CPU budget.
    max_windows: int | None = Field(8, ge=1)
    # Quantize keys and values while evaluating, to measure what a quantized KV cache costs.
    kv_cache: KVCacheSpec | None = None
    # Zero-shot tasks through lm-evaluation-harness: shipped names (arc_easy, arc_challenge,
    # piqa, lambada_openai) or paths of task YAML files of one's own. Empty: perplexity only.
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1, description="documents per task; null: every one")
    # Folder of the shipped tasks' local copies (<task>.jsonl, SHA256SUMS checked);
    # null: $QUANTMILL_TASK_DATA, and without it the harness's Hub datasets.
    task_data: str | None = None
    task_batch_size: int = Field(16, ge=1, description="requests per forward of the harness")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        from quantmill.accuracy.tasks import check_task_names

        return check_task_names(value)


class ExportSpec(StrictModel):
    """What the written checkpoint must be."""

    # true: refuse, before any work, a grid that no serving engine loads (a group size
    # that does not divide a layer's inputs); false: write it anyway (as float weights
    # on the grid where the packed format cannot hold it) and say so in the card.
    servable: bool = True


class TrainSpec(StrictModel):
    """The training loop of a quantization-aware method (LLM-QAT, PEQA, L4Q)."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (Adam)")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1, description="sequences per step")
    seq_len: int = Field(256, ge=8, le=32_768, description="tokens per training sequence")
    seed: int = 0
    # Saved every N steps (and at the end); an interrupted run resumes from the latest.
    checkpoint_every: int = Field(50, ge=1)
    # Sequences held out of training, scored before and after (0: no such evaluation).
    eval_samples: int = Field(4, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="null: no gradient clipping")


class EngineSpec(StrictModel):
    """Where and how the engine runs: device, compute dtype, memory and output layout.

    Not part of a recipe: the same recipe runs on a laptop CPU or a GPU.
    """

    # auto: the first CUDA device when there is one, else the CPU.
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    # auto: the checkpoint's own dtype on a GPU, float32 on a CPU.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the forward passes (statistics accumulate in float32)"
    )
    # auto: calibration activations stay on the device when they fit in half its free memory.
    offload: Literal["auto", "none", "cpu"] = Field(
        "auto", description="where calibration activations wait between blocks"
    )
    max_shard_size: str = Field("5GB", description="largest safetensors shard of the output")
    # False: ignore the journal of an interrupted run into the same output and start afresh.
    resume: bool = True
    # None: torch's default (every core). A sweep running recipes side by side shares the
    # cores among them, so that their threads do not contend.
    threads: int | None = Field(None, ge=1, description="CPU threads of torch's operators")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N (N a device number)")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        parse_size(value)
        return value

    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size: write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
