"""Typed flow parameters: pydantic models, so the Prefect UI renders a form with
defaults, descriptions and choices, and bad values fail before any work.

A job validated from plain data (a deployment run's parameters, from the UI or the
API) keeps its paths in their places (``flows.places``): outputs under
$QUANTMILL_OUTPUT_ROOT, inputs under $QUANTMILL_DATA_ROOTS or the output root. The
command line builds its jobs with the context ``places.FREE``: its user's paths are free.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flows import places
from quantmill import defaults
from quantmill.config import CalibrationSpec, EngineSpec, EvalSpec
from quantmill.recipes import find_recipe, shipped_recipes

if TYPE_CHECKING:  # the recipe module imports every method (and torch): only when parsing
    from quantmill.recipe import Recipe

# The shipped recipes (package data of quantmill), offered as choices in the UI.
RecipeName = Enum("RecipeName", {n: n for n in shipped_recipes()}, type=str)  # type: ignore[misc]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)


class DataSettings(Params):
    """Replace the recipe's data settings (empty: keep the recipe's)."""

    calib_data: str | None = Field(
        None, description="calibration text file, or a datasets name such as 'wikitext'"
    )
    calib_samples: int | None = Field(None, ge=1, description="calibration samples")
    eval_data: str | None = Field(None, description="evaluation text file, or a datasets name")
    eval_windows: int | None = Field(None, ge=0, description="evaluation windows; 0: all")
    eval_seq_len: int | None = Field(None, ge=8, description="evaluation window length in tokens")
    kv_cache: str | None = Field(
        None,
        description="quantize keys and values while evaluating: 8, 4, 8:head, 4:token; none: off",
    )
    tasks: str | None = Field(
        None,
        description="zero-shot tasks through lm-evaluation-harness, comma-separated "
        "(arc_easy, arc_challenge, piqa, lambada_openai, or task YAML files); none: off",
    )
    limit: int | None = Field(None, ge=1, description="documents per task (default: every one)")
    task_data: str | None = Field(
        None, description="folder of the tasks' local copies (default: $QUANTMILL_TASK_DATA)"
    )

    def placed(self) -> DataSettings:
        """A copy with each file or folder named by a path in its place (``flows.places``)."""
        update = {}
        for name in ("calib_data", "eval_data"):  # a path, or a datasets name
            value = getattr(self, name)
            if value and places.is_path(value):
                update[name] = places.input_path(f"data.{name}", value)
        if self.task_data:
            update["task_data"] = places.input_path("data.task_data", self.task_data)
        if self.tasks:
            update["tasks"] = places.task_files("data.tasks", self.tasks)
        return self.model_copy(update=update)


class ModelSettings(Params):
    model: str = Field(
        defaults.MODEL, description="preset (smollm2-135m), local folder, .gguf file or Hub id"
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin")
    data: DataSettings = Field(default_factory=DataSettings)
    experiment: str = Field(defaults.EXPERIMENT, description="MLflow experiment")
    engine: EngineSpec = Field(
        default_factory=EngineSpec,
        description="device, dtype, activation offloading, shard size, resuming",
    )

    def _place_inputs(self) -> None:
        """The model (when a local path) and the data files in their places."""
        if places.is_model_path(self.model):
            self.model = places.input_path("model", self.model)
        self.data = self.data.placed()


HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PublishSettings(Params):
    """Where a checkpoint goes once made. The Hub token is never a parameter: it comes
    from HF_TOKEN or the Prefect Secret block named in ``token_secret``."""

    hub_repo: str | None = Field(
        None, description="Hub repo 'owner/name' to publish to; empty: skip the Hub"
    )
    private: bool = Field(True, description="create the Hub repo as private")
    token_secret: str = Field(
        defaults.TOKEN_SECRET,
        description="Prefect Secret block with the Hub token (used if HF_TOKEN unset)",
    )
    verify: list[Literal["transformers", "vllm"]] = Field(
        default_factory=lambda: ["transformers"],
        description="verifiers: transformers (the Hub upload, downloaded again, gives the same "
        "logits), vllm (vLLM loads the checkpoint and generates what transformers does; a "
        "checkpoint it cannot serve gets no 'candidate' alias)",
    )
    registry: bool = Field(True, description="register the checkpoint in the MLflow registry")
    registered_model: str | None = Field(
        None, description="registered model name; default: the base model's name"
    )

    @field_validator("verify", mode="before")
    @classmethod
    def _verify(cls, value: Any) -> Any:
        if isinstance(value, bool):  # the former switch: true is the Hub check alone
            return ["transformers"] if value else []
        if isinstance(value, str):  # "transformers,vllm" from a command line or a form
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("hub_repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not HUB_REPO.match(value):
            raise ValueError(
                f"{value!r} is not a Hub repo id; write it as 'owner/name' "
                "(letters, digits, '.', '_', '-')"
            )
        return value

    def enabled(self) -> bool:
        return bool(self.hub_repo) or self.registry


class QuantizeJob(ModelSettings):
    recipe: RecipeName = Field(defaults.RECIPE, description="a shipped recipe")  # type: ignore[valid-type]
    recipe_file: str | None = Field(None, description="a YAML/JSON recipe; replaces `recipe`")
    out_dir: str | None = Field(
        None,
        description="default: outputs/MODEL-RECIPE; under $QUANTMILL_OUTPUT_ROOT for runs "
        "from the UI/API",
    )
    overwrite: bool = Field(False, description="replace an existing output folder")
    export_format: Literal["packed", "fake", "gguf"] = Field(
        "packed",
        description="packed: compressed-tensors integers; fake: float weights; gguf: packed "
        "and a GGUF file for llama.cpp beside it (grids of 32: Q4_0/Q4_1/Q8_0, exact)",
    )
    publish: PublishSettings = Field(default_factory=PublishSettings)
    outlier_report: bool = Field(
        False, description="also write the original model's outlier report (needs calibration)"
    )

    _recipe: Recipe = PrivateAttr()

    @model_validator(mode="after")
    def _parse(self, info: ValidationInfo) -> QuantizeJob:
        """The paths in their places, then the recipe, parsed once here: a bad one fails
        before any flow starts. (Prefect validates a flow's parameters again: an instance
        already parsed is kept.)"""
        if not _parsed(self, "_recipe"):
            if _confined(info):
                self._place_inputs()
                self.recipe_file = _recipe_file("recipe_file", self.recipe_file)
                self.out_dir = _output("out_dir", self.out_dir)
            self._recipe = load_job_recipe(self.recipe_file or str(self.recipe), self.data)
        return self

    def load(self) -> Recipe:
        return self._recipe

    def output_dir(self, recipe: Recipe) -> str:
        name = f"{slug(self.model)}-{slug(recipe.name)}"
        return self.out_dir or str(places.output_root() / name)

    def outputs(self) -> list[str]:
        """The folders the run writes."""
        return [self.output_dir(self._recipe)]


class SweepJob(ModelSettings):
    recipes: list[RecipeName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(defaults.SWEEP_RECIPES), description="shipped recipes"
    )
    recipe_files: list[str] = Field(default_factory=list, description="more recipe files")
    out_root: str = Field(
        defaults.SWEEP_ROOT,
        description="one folder per recipe under this; under $QUANTMILL_OUTPUT_ROOT for runs "
        "from the UI/API",
    )
    max_concurrency: int = Field(
        defaults.MAX_CONCURRENCY, ge=1, le=16, description="recipes quantized at once"
    )
    fan_out: bool = Field(
        False,
        description="run each recipe as a run of the quantize deployment, shared among "
        "the workers of its work pool (needs the deployments)",
    )
    dask: str | None = Field(
        None,
        description="run the recipes on Dask: a scheduler address (tcp://host:8786), or "
        "'local' for a local cluster of max_concurrency processes; empty: threads here",
    )
    overwrite: bool = Field(False, description="replace existing output folders")
    _recipes: list[Recipe] = PrivateAttr()

    @model_validator(mode="after")
    def _parse(self, info: ValidationInfo) -> SweepJob:
        """The paths in their places, then every recipe, parsed once here: a bad one fails
        before any flow starts."""
        if _parsed(self, "_recipes"):
            return self
        if _confined(info):
            self._place_inputs()
            self.recipe_files = [
                _recipe_file(f"recipe_files[{i}]", f) for i, f in enumerate(self.recipe_files)
            ]
            if self.out_root != defaults.SWEEP_ROOT:  # the default: see folder()
                self.out_root = places.output_path("out_root", self.out_root)
        recipes = [load_job_recipe(n, self.data) for n in self.sources()]
        seen: set[str] = set()
        for recipe in recipes:
            if recipe.name in seen:
                raise ValueError(f"two recipes are named {recipe.name!r}; names must differ")
            seen.add(recipe.name)
        if not recipes:
            raise ValueError("recipes: give at least one recipe name or recipe_files entry")
        self._recipes = recipes
        return self

    def sources(self) -> list[str]:
        """The shipped recipes' names and the recipe files, in order."""
        return [str(n) for n in self.recipes] + list(self.recipe_files)

    def load(self) -> list[Recipe]:
        return self._recipes

    def folder(self) -> Path:
        """Where the recipes' folders go: ``out_root``; by default, under the output root."""
        if self.out_root == defaults.SWEEP_ROOT:
            return places.output_root() / Path(defaults.SWEEP_ROOT).relative_to(
                defaults.OUTPUT_ROOT
            )
        return Path(self.out_root)

    def outputs(self) -> list[str]:
        """The folders the sweep writes, one per recipe."""
        return [str(self.folder() / slug(r.name)) for r in self._recipes]


class AnalyzeJob(ModelSettings):
    """The outlier report of a model, on the calibration data of a recipe (default
    settings when none: 128 samples of 512 tokens of WikiText-2 train)."""

    recipe_file: str | None = Field(None, description="take calibration settings from it")
    seq_len: int | None = Field(None, ge=8, description="calibration sample length in tokens")
    out_dir: str | None = Field(
        None,
        description="default: outputs/MODEL-outliers; under $QUANTMILL_OUTPUT_ROOT for runs "
        "from the UI/API",
    )

    @model_validator(mode="after")
    def _places(self, info: ValidationInfo) -> AnalyzeJob:
        if _confined(info):
            self._place_inputs()
            self.recipe_file = _recipe_file("recipe_file", self.recipe_file)
            self.out_dir = _output("out_dir", self.out_dir)
        return self

    def calibration(self) -> CalibrationSpec:
        from quantmill.recipe import load_recipe, spec_with_overrides

        base = load_recipe(self.recipe_file).calibration if self.recipe_file else CalibrationSpec()
        spec = spec_with_overrides(base, **self.data.model_dump())
        if self.seq_len is None:
            return spec
        return spec_with_overrides(spec.model_copy(update={"seq_len": self.seq_len}))

    def output_dir(self) -> str:
        return self.out_dir or str(places.output_root() / f"{slug(self.model)}-outliers")


class PublishJob(Params):
    checkpoint: str = Field(..., description="a checkpoint folder written by quantmill")
    publish: PublishSettings = Field(default_factory=PublishSettings)
    experiment: str = Field(defaults.EXPERIMENT, description="MLflow experiment")

    @model_validator(mode="after")
    def _places(self, info: ValidationInfo) -> PublishJob:
        if _confined(info):
            self.checkpoint = places.input_path("checkpoint", self.checkpoint)
        return self


class EvaluateJob(ModelSettings):
    model: str = Field(..., description="checkpoint folder, preset, .gguf file or Hub id")
    recipe_file: str | None = Field(None, description="take evaluation settings from it")

    @model_validator(mode="after")
    def _places(self, info: ValidationInfo) -> EvaluateJob:
        if _confined(info):
            self._place_inputs()
            self.recipe_file = _recipe_file("recipe_file", self.recipe_file)
        return self

    def evaluation(self) -> EvalSpec:
        from quantmill.recipe import load_recipe, spec_with_overrides

        base = load_recipe(self.recipe_file).evaluation if self.recipe_file else EvalSpec()
        return spec_with_overrides(base, **self.data.model_dump())


def _confined(info: ValidationInfo) -> bool:
    """True unless the job comes from the command line (``places.FREE``)."""
    return not (info.context or {}).get("free_paths")


def _recipe_file(field: str, value: str | None) -> str | None:
    """A recipe file in its place, before anything reads it (a shipped name stays)."""
    if not value or value in shipped_recipes():  # empty: none given
        return value
    return places.input_path(field, value)


def _output(field: str, value: str | None) -> str | None:
    return places.output_path(field, value) if value else value  # empty: the default


def _parsed(job: BaseModel, name: str) -> bool:
    """True when ``job`` holds its parsed recipes already (private attributes)."""
    return (job.__pydantic_private__ or {}).get(name) is not None


def load_job_recipe(name_or_path: str, data: DataSettings) -> Recipe:
    """A shipped recipe's name or a recipe file, with the job's data settings, parsed once."""
    from quantmill.recipe import load_recipe

    return load_recipe(find_recipe(name_or_path), **data.model_dump())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-") or "model"
