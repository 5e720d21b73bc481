"""Typed flow parameters: pydantic models, so the Prefect UI renders a form with
defaults, descriptions and choices, and bad values fail before any work."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantmill.config import EngineSpec
from quantmill.recipe import Recipe, load_recipe, parse_recipe, with_overrides

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


# The recipes shipped in recipes/, offered as choices in the UI.
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
    kv_cache: str | None = Field(
        None,
        description="quantize keys and values while evaluating: 8, 4, 8:head, 4:token; none: off",
    )


class ModelSettings(Params):
    model: str = Field(
        "smollm2-135m", description="preset (smollm2-135m), local folder, .gguf file or Hub id"
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin")
    data: DataSettings = Field(default_factory=DataSettings)
    experiment: str = Field("quantmill", description="MLflow experiment")
    engine: EngineSpec = Field(
        default_factory=EngineSpec,
        description="device, dtype, activation offloading, shard size, resuming",
    )


HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class PublishSettings(Params):
    """Where a checkpoint goes once made. The Hub token is never a parameter: it comes
    from HF_TOKEN or the Prefect Secret block named in ``token_secret``."""

    hub_repo: str | None = Field(
        None, description="Hub repo 'owner/name' to publish to; empty: skip the Hub"
    )
    private: bool = Field(True, description="create the Hub repo as private")
    token_secret: str = Field(
        "hf-token", description="Prefect Secret block with the Hub token (used if HF_TOKEN unset)"
    )
    verify: bool = Field(True, description="download the upload again, load it, compare logits")
    registry: bool = Field(True, description="register the checkpoint in the MLflow registry")
    registered_model: str | None = Field(
        None, description="registered model name; default: the base model's name"
    )

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
    recipe: RecipeName = Field("gptq-w4g64", description="a recipe shipped in recipes/")  # type: ignore[valid-type]
    recipe_file: str | None = Field(None, description="a YAML/JSON recipe; replaces `recipe`")
    out_dir: str | None = Field(None, description="default: outputs/MODEL-RECIPE")
    overwrite: bool = Field(False, description="replace an existing output folder")
    export_format: Literal["packed", "fake"] = Field(
        "packed", description="packed: compressed-tensors integers; fake: float weights"
    )
    publish: PublishSettings = Field(default_factory=PublishSettings)
    outlier_report: bool = Field(
        False, description="also write the original model's outlier report (needs calibration)"
    )

    def load(self) -> Recipe:
        return load_job_recipe(self.recipe_file or str(self.recipe), self.data)

    def output_dir(self, recipe: Recipe) -> str:
        return self.out_dir or str(Path("outputs") / f"{slug(self.model)}-{slug(recipe.name)}")


class SweepJob(ModelSettings):
    recipes: list[RecipeName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["rtn-w4g64", "gptq-w4g64"],
        description="recipes shipped in recipes/",
    )
    recipe_files: list[str] = Field(default_factory=list, description="more recipe files")
    out_root: str = Field("outputs/sweep", description="one folder per recipe under this")
    max_concurrency: int = Field(2, ge=1, le=16, description="recipes quantized at once")
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

    def load(self) -> list[Recipe]:
        names = [str(n) for n in self.recipes] + list(self.recipe_files)
        recipes = [load_job_recipe(n, self.data) for n in names]
        seen: set[str] = set()
        for recipe in recipes:
            if recipe.name in seen:
                raise ValueError(f"two recipes are named {recipe.name!r}; names must differ")
            seen.add(recipe.name)
        if not recipes:
            raise ValueError("recipes: give at least one recipe name or recipe_files entry")
        return recipes


class AnalyzeJob(ModelSettings):
    """The outlier report of a model, on the calibration data of a recipe (default
    settings when none: 128 samples of 512 tokens of WikiText-2 train)."""

    recipe_file: str | None = Field(None, description="take calibration settings from it")
    seq_len: int | None = Field(None, ge=8, description="calibration sample length in tokens")
    out_dir: str | None = Field(None, description="default: outputs/MODEL-outliers")

    def load(self) -> Recipe:
        if self.recipe_file:
            recipe = load_job_recipe(self.recipe_file, self.data)
        else:  # calibration settings only: the step is a placeholder that never runs
            base = parse_recipe({"name": "analyze", "steps": [{"method": "rtn"}]})
            recipe = with_overrides(base, **self.data.model_dump())
        if self.seq_len is None:
            return recipe
        data = recipe.to_dict()
        data["calibration"]["seq_len"] = self.seq_len
        return parse_recipe(data)

    def output_dir(self) -> str:
        return self.out_dir or str(Path("outputs") / f"{slug(self.model)}-outliers")


class PublishJob(Params):
    checkpoint: str = Field(..., description="a checkpoint folder written by quantmill")
    publish: PublishSettings = Field(default_factory=PublishSettings)
    experiment: str = Field("quantmill", description="MLflow experiment")


class EvaluateJob(ModelSettings):
    model: str = Field(..., description="checkpoint folder, preset, .gguf file or Hub id")
    recipe_file: str | None = Field(None, description="take evaluation settings from it")


def load_job_recipe(name_or_path: str, data: DataSettings) -> Recipe:
    path = Path(name_or_path)
    if not path.suffix and (RECIPES_DIR / f"{name_or_path}.yaml").is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    return with_overrides(load_recipe(path), **data.model_dump())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-") or "model"
