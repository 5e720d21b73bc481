"""A recipe: an ordered list of method steps plus calibration and evaluation specs.

Methods compose (SmoothQuant then GPTQ, AWQ then RTN), so a recipe is a list.
Each step is validated by the config class its method registered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from quantmill.config import (
    CalibrationSpec,
    EvalSpec,
    ExportSpec,
    MethodConfig,
    QualityGate,
    StrictModel,
)
from quantmill.errors import ConfigError
from quantmill.methods import get_method, method_names
from quantmill.recipes import find_recipe, shipped_recipes
from quantmill.registry import Needs


class Recipe(StrictModel):
    name: str = "recipe"
    # SerializeAsAny: dump each step with its own method config fields, not the base ones
    steps: list[SerializeAsAny[MethodConfig]] = Field(min_length=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)
    # Checked before the model registry marks a version as a release candidate.
    gate: QualityGate = Field(default_factory=QualityGate)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        steps, problems = [], []
        for index, item in enumerate(value):
            if isinstance(item, MethodConfig):
                steps.append(item)
                continue
            name = item.get("method") if isinstance(item, dict) else None
            if name not in method_names():
                problems.append(
                    f"steps.{index}.method = {name!r}: unknown method; "
                    f"allowed: {', '.join(method_names())}"
                )
                continue
            try:
                steps.append(get_method(name).config.model_validate(item))
            except ValidationError as exc:
                problems += _problem_lines(exc, prefix=f"steps.{index}.")
        if problems:
            raise StepErrors(problems)
        return steps

    @model_validator(mode="after")
    def _step_order(self) -> Recipe:
        """Training steps come last; a step that needs an earlier one (PEQA trains the
        scales RTN or GPTQ chose) has it, on the same layers."""
        for index, step in enumerate(self.steps):
            needs = needs_of(step)
            earlier = self.steps[:index]
            if getattr(step, "mixed", None) is not None and any(
                getattr(s, "mixed", None) is not None for s in earlier
            ):
                raise ValueError(
                    f"steps.{index}.mixed: one step of a recipe may choose schemes under a "
                    "budget; the budget spans that step's layers"
                )
            if needs.rotates and index > 0:
                raise ValueError(
                    f"steps.{index}.method: {step.method} rewrites the whole model and comes "
                    "first in a recipe (once), before the steps that quantize it"
                )
            if needs.rotates and len(self.steps) == 1:
                raise ValueError(
                    f"steps.0.method: {step.method} quantizes nothing by itself; add the "
                    "step that quantizes the rotated weights after it (rtn, gptq, ...)"
                )
            shared = needs.calibration and needs.shared_statistics
            if shared and any(needs_of(s).rotates for s in earlier):
                raise ValueError(
                    f"steps.{index}.sequential: false reads the original model's statistics, "
                    "which a rotation before it changes; set sequential: true"
                )
            if not needs.trains and any(needs_of(s).trains for s in earlier):
                raise ValueError(
                    f"steps.{index}.method: {step.method} is a post-training step after a "
                    "training step; training steps come last in a recipe"
                )
            before = [s for s in earlier if s.method in needs.after]
            if needs.after and not any(_covers(s, step) for s in before):
                raise ValueError(
                    f"steps.{index}.method: {step.method} trains the grids of an earlier "
                    f"{' or '.join(needs.after)} step with the same targets and ignore "
                    f"(targets {step.targets}, ignore {step.ignore}); put one before it"
                )
        return self

    @model_validator(mode="after")
    def _training_steps(self) -> Recipe:
        """Training text long enough for each training step; a step's KV-cache setting is
        what the evaluation measures."""
        for index, step in enumerate(self.steps):
            training = getattr(step, "training", None)
            if training is not None and needs_of(step).calibration:
                calib = self.calibration
                if training.seq_len > calib.seq_len:
                    raise ValueError(
                        f"steps.{index}.training.seq_len = {training.seq_len} is longer than "
                        f"calibration.seq_len = {calib.seq_len} (the training text); "
                        "lower it or raise calibration.seq_len"
                    )
                if training.eval_samples >= calib.num_samples:
                    raise ValueError(
                        f"steps.{index}.training.eval_samples = {training.eval_samples} leaves "
                        f"no training text of calibration.num_samples = {calib.num_samples}; "
                        "lower it or raise calibration.num_samples"
                    )
            kv = getattr(step, "kv_cache", None)
            if kv is not None and self.evaluation.kv_cache is None:
                self.evaluation = self.evaluation.model_copy(update={"kv_cache": kv})
            elif kv is not None and self.evaluation.kv_cache != kv:
                raise ValueError(
                    f"steps.{index}.kv_cache ({kv.label()}) differs from evaluation.kv_cache "
                    f"({self.evaluation.kv_cache.label()}); the model is evaluated the way "
                    "it was trained: remove evaluation.kv_cache or make them equal"
                )
        return self

    def rotation(self) -> MethodConfig | None:
        """The step that rotates the model first, if any."""
        return next((s for s in self.steps if needs_of(s).rotates), None)

    def quantizing_steps(self) -> list[MethodConfig]:
        """The steps run block by block (all but a rotation)."""
        return [s for s in self.steps if not needs_of(s).rotates]

    def needs_calibration(self) -> bool:
        return any(needs_of(step).calibration for step in self.steps)

    def uses_shared_statistics(self) -> bool:
        """True when a step reads the original model's statistics (``sequential: false``),
        which depend only on the model and the calibration data and can be shared."""
        return any(needs_of(s).calibration and needs_of(s).shared_statistics for s in self.steps)

    def trains(self) -> bool:
        """True when a step trains the whole model (quantization-aware training)."""
        return any(needs_of(step).trains for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def needs_of(step: MethodConfig) -> Needs:
    """What ``step`` needs from the pipeline, from its method's registry entry."""
    return get_method(step.method).needs(step)


def _covers(earlier: MethodConfig, step: MethodConfig) -> bool:
    """True when ``earlier`` quantizes at least the layers ``step`` selects."""
    targets = earlier.targets == step.targets or earlier.targets == ["*"]
    return targets and set(earlier.ignore) <= set(step.ignore)


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe dict; raise ``ConfigError`` naming each bad field and value."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "recipe")) from None


def load_recipe(name_or_path: str | Path, **overrides: Any) -> Recipe:
    """Read a recipe (a shipped recipe's name, or a YAML or JSON file) and parse it once,
    with the data settings of ``with_overrides`` applied first."""
    path = find_recipe(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"recipe file {path} does not exist and no shipped recipe has that name; "
            f"shipped recipes: {', '.join(shipped_recipes())}"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping with a 'steps' list")
    data.setdefault("name", path.stem)
    return parse_recipe(apply_overrides(data, **overrides))


def with_overrides(recipe: Recipe, **overrides: Any) -> Recipe:
    """A copy of ``recipe`` with the given data settings replaced (and validated)."""
    return parse_recipe(apply_overrides(recipe.to_dict(), **overrides))


def apply_overrides(
    data: dict[str, Any],
    *,
    calib_data: str | None = None,
    calib_samples: int | None = None,
    eval_data: str | None = None,
    eval_windows: int | None = None,
    eval_seq_len: int | None = None,
    kv_cache: str | None = None,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    task_data: str | None = None,
) -> dict[str, Any]:
    """Recipe data with the given data settings replaced (``None``: keep the recipe's).

    ``eval_windows = 0`` means every window. ``kv_cache``: ``"8"``, ``"4"``,
    ``"8:head"``, ``"4:token"``… quantizes keys and values during evaluation;
    ``"none"`` turns it off. ``tasks``: zero-shot tasks, a list or comma-separated
    (``"none"``: no tasks); ``limit``: documents per task (at least 1);
    ``task_data``: the folder of the tasks' local copies.
    """
    calib = data.setdefault("calibration", {})
    evaluation = data.setdefault("evaluation", {})
    if calib_data:
        calib["dataset"] = calib_data
    if calib_samples is not None:
        calib["num_samples"] = calib_samples
    if eval_data:
        evaluation["dataset"] = eval_data
    if eval_windows is not None:
        evaluation["max_windows"] = eval_windows or None
    if eval_seq_len is not None:
        evaluation["seq_len"] = eval_seq_len
    if kv_cache:
        evaluation["kv_cache"] = parse_kv_cache(kv_cache)
    if tasks is not None:
        evaluation["tasks"] = parse_tasks(tasks)
    if limit is not None:
        evaluation["limit"] = limit
    if task_data:
        evaluation["task_data"] = task_data
    return data


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """``"arc_easy,piqa"`` (or a list) as ``evaluation.tasks``; ``"none"`` or ``""``: none."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    items = [t.strip() for t in items if t.strip()]
    return [] if items == ["none"] else items


def parse_kv_cache(text: str) -> dict[str, Any] | None:
    """``"BITS[:GRANULARITY]"`` (``8``, ``4:head``) or ``none``, as the CLI and flows take it."""
    if text.strip().lower() == "none":
        return None
    bits, _, granularity = text.strip().partition(":")
    if bits not in ("4", "8") or granularity not in ("", "token", "head"):
        raise ConfigError(
            f"kv_cache = {text!r}: expected BITS[:GRANULARITY] with BITS 8 or 4 and "
            "GRANULARITY token or head (e.g. 8, 4:head), or none"
        )
    return {"bits": int(bits), "granularity": granularity or "token"}


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    path = Path(path)
    data = recipe.to_dict()
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))


class StepErrors(ValueError):
    """Problems in method steps, already formatted with their full field paths."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def format_validation_error(exc: ValidationError, what: str) -> str:
    """One line per problem: the field path, the value given and what is allowed."""
    return "\n".join([f"invalid {what}:"] + [f"  {line}" for line in _problem_lines(exc)])


def _problem_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, StepErrors):
            lines += nested.lines
            continue
        loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function"))
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        message = err["msg"].removeprefix("Value error, ")
        # a recipe-wide check names its own fields in the message
        lines.append(f"{prefix}{loc}{shown}: {message}" if loc else f"{prefix}{message}")
    return lines


def spec_with_overrides(spec: EvalSpec | CalibrationSpec, **overrides: Any):
    """``spec`` (an evaluation or calibration spec) with the data settings of
    ``apply_overrides`` replaced, for the commands that need no recipe."""
    section = "evaluation" if isinstance(spec, EvalSpec) else "calibration"
    data = apply_overrides({section: spec.model_dump(mode="json")}, **overrides)[section]
    try:
        return type(spec).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{section} settings")) from None
