"""Zero-shot accuracy through lm-evaluation-harness, one task at a time.

The model is the one a run already holds (a checkpoint loaded the way
``transformers`` loads it, or the original model), wrapped in the harness's
``HFLM``: the harness builds the requests, scores them and aggregates the
metrics; nothing here scores anything. Tasks run one by one so that each has
its own time and a progress line (in the terminal and the Prefect logs), and so
that the original model's results are cached per task.

Standard errors are the harness's: closed form for accuracies, a bootstrap for
perplexity (``BOOTSTRAP_ITERS`` resamples, run in this process: the harness's
default is 100000 resamples over a process pool).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from quantmill.accuracy.tasks import TaskRef
from quantmill.cache import cache_key, cached_json
from quantmill.errors import ConfigError

log = logging.getLogger(__name__)

BOOTSTRAP_ITERS = 1000
HARNESS_FILE = "lm_eval_results.json"  # the harness's own results, as an artifact
# The harness's notices about being handed a model object rather than a name.
_NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")


@dataclass
class TaskResult:
    task: str
    source: str  # local, hub or file (``TaskRef.source``)
    documents: int
    metrics: dict[str, float]  # acc, acc_norm, perplexity, ... as the harness reports them
    stderr: dict[str, float | None]
    primary: str  # the metric means, recoveries and the gate use: acc where reported
    seconds: float
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        return cls(**data)

    @property
    def score(self) -> float:
        return self.metrics[self.primary]


@dataclass
class TaskRun:
    results: list[TaskResult]
    harness: dict[str, Any] = field(default_factory=dict)  # the harness's merged output

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {r.task: r.to_dict() for r in self.results}


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def evaluate_tasks(
    load: Callable[[], tuple[Any, Any]],
    refs: list[TaskRef],
    limit: int | None,
    batch_size: int,
    progress: bool = True,
    cache: dict[str, Any] | None = None,
) -> TaskRun:
    """Each task of ``refs`` on the model ``load()`` returns ``(model, tokenizer)``.

    ``cache``: the parts of a cache key that identify the model and how it runs (an
    original model's revision, device, dtype): a task measured before with them,
    the same definition, data, limit and batch size is not run again, and ``load``
    is called only if some task is not cached.
    """
    held: list[Any] = []

    def lm():
        if not held:
            model, tokenizer = load()
            held.append(_wrap(model, tokenizer, batch_size))
        return held[0]

    results, harness = [], {}
    for index, ref in enumerate(refs, start=1):
        # task lines go to the terminal and the Prefect logs (the harness draws its own bar)
        log.info("accuracy: task %d/%d %s (%s)", index, len(refs), ref.name, ref.source)
        if cache is None:
            result, raw = _run(lm(), ref, limit, progress)
        else:
            key = cache_key(
                **cache, task=ref.fingerprint, limit=limit, batch_size=batch_size,
                harness=harness_version(),
            )  # fmt: skip
            value, hit = cached_json(
                "accuracy", key, lambda ref=ref: _as_json(*_run(lm(), ref, limit, progress))
            )
            result, raw = TaskResult.from_dict(value["result"]), value["harness"]
            result.cached = hit
        results.append(result)
        _merge(harness, raw)
        log.info(
            "accuracy: %s %s %.4f over %d documents (%.0f s%s)", ref.name, result.primary,
            result.score, result.documents, result.seconds, ", cached" if result.cached else "",
        )  # fmt: skip
    return TaskRun(results, harness)


def _as_json(result: TaskResult, raw: dict[str, Any]) -> dict[str, Any]:
    return {"result": result.to_dict(), "harness": raw}


def _wrap(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    with _quiet_harness():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _run(lm, ref: TaskRef, limit: int | None, progress: bool) -> tuple[TaskResult, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    start = time.perf_counter()
    with (
        _quiet_harness(),
        _environment(DISABLE_MULTIPROC="1", TQDM_DISABLE=None if progress else "1"),
    ):
        manager = TaskManager(include_defaults=ref.needs_registry)
        try:  # the task and its data, loaded apart so that only their failures are named so
            loaded = list(get_task_dict([ref.spec], manager).values())
        except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as exc:
            raise ConfigError(_load_failure(ref, exc)) from exc
        out = simple_evaluate(
            model=lm, tasks=loaded, task_manager=manager, limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    return _result(ref, out, seconds), _raw(out, ref.name, seconds)


def _load_failure(ref: TaskRef, exc: Exception) -> str:
    where = {
        "hub": "its Hub dataset (offline? set evaluation.task_data, --task-data or "
        "$QUANTMILL_TASK_DATA to a folder of local copies)",
        "local": f"its local data ({ref.fingerprint.get('definition', {}).get('dataset_kwargs')})",
        "file": f"the task file {ref.spec}",
    }[ref.source]
    return f"task {ref.name}: lm-evaluation-harness could not load {where}: {exc}"


def _result(ref: TaskRef, out: dict[str, Any], seconds: float) -> TaskResult:
    name = ref.name
    reported = out["results"][name]
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in reported.items():
        metric, comma, filt = key.partition(",")
        if not comma:
            continue  # alias, name, sample_len
        label = metric if filt == "none" else f"{metric}_{filt}"
        if label.endswith("_stderr") or "_stderr_" in label:
            base = label.replace("_stderr", "", 1)
            stderr[base] = float(value) if isinstance(value, int | float) else None
        elif isinstance(value, int | float):
            metrics[label] = float(value)
    higher = out.get("higher_is_better", {}).get(name, {})
    better = [m for m in metrics if higher.get(m, False)]
    primary = "acc" if "acc" in metrics else (better or list(metrics))[0]
    documents = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
    return TaskResult(name, ref.source, documents, metrics, stderr, primary, seconds)


def _raw(out: dict[str, Any], name: str, seconds: float) -> dict[str, Any]:
    """The harness's output for one task, JSON-safe (its model object dropped)."""
    keep = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    raw = {k: _json_safe(out[k]) for k in keep if k in out}
    raw["seconds"] = {name: seconds}
    raw["lm_eval_version"] = harness_version()
    return raw


def _merge(into: dict[str, Any], raw: dict[str, Any]) -> None:
    for key, value in raw.items():
        if isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        else:
            into[key] = value


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


@contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness's logs at WARNING and above, without its notices about model objects."""
    logger = logging.getLogger("lm_eval")
    level, noise = logger.level, _DropNoise()
    logger.setLevel(max(level, logging.WARNING))
    handlers = [logger, *logger.handlers, *logging.getLogger().handlers]
    for h in handlers:
        h.addFilter(noise)
    try:
        yield
    finally:
        logger.setLevel(level)
        for h in handlers:
            h.removeFilter(noise)


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
