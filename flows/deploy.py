"""The deployments, defined in the repo: ``quantize``, ``sweep`` and ``evaluate``
on a process work pool, each with its parameter form (from the typed flow
parameters), an optional cron schedule and a concurrency limit so a burst of
runs queues instead of exhausting memory.

    quantmill deploy                                   # the defaults below
    quantmill deploy --schedule sweep="0 3 * * 1-5"    # weekday sweeps at 03:00
    quantmill deploy --schedule sweep=none             # no schedule

On Docker or Kubernetes work pools the same deployments run from the
project's image (README: "Scaling out").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DeploymentSpec:
    entrypoint: str
    description: str
    cron: str | None  # default schedule (UTC); None: runs only when triggered
    concurrency: int  # runs of this deployment at once; more wait in line
    tags: tuple[str, ...] = ("quantmill",)


DEPLOYMENTS: dict[str, DeploymentSpec] = {
    "quantize": DeploymentSpec(
        "flows/quantize.py:quantize_flow",
        "Quantize one model with one recipe, evaluate, track in MLflow, publish.",
        cron=None,
        concurrency=2,
    ),
    "sweep": DeploymentSpec(
        "flows/sweep.py:sweep_flow",
        "Several recipes side by side on one model; a comparison table and plot.",
        cron="0 2 * * *",  # nightly at 02:00 UTC
        concurrency=1,
    ),
    "evaluate": DeploymentSpec(
        "flows/evaluate.py:evaluate_flow",
        "Perplexity, size and bits per weight of a checkpoint or model.",
        cron=None,
        concurrency=2,
    ),
}


def parse_schedules(items: list[str]) -> dict[str, str | None]:
    """``["sweep=0 3 * * *", "quantize=none"]`` → ``{"sweep": "0 3 * * *", "quantize": None}``."""
    out: dict[str, str | None] = {}
    for item in items:
        name, sep, cron = item.partition("=")
        if not sep or name not in DEPLOYMENTS:
            raise ValueError(
                f"--schedule {item!r}: write NAME=CRON with NAME one of "
                f"{', '.join(DEPLOYMENTS)} (CRON 'none' removes the schedule)"
            )
        cron = cron.strip()
        if cron.lower() not in ("", "none"):
            _check_cron(name, cron)
        out[name] = None if cron.lower() in ("", "none") else cron
    return out


def _check_cron(name: str, cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise ValueError(
            f"--schedule {name}={cron!r}: not a cron expression; write five fields, "
            "e.g. '0 2 * * *' for 02:00 every day"
        ) from None


def deploy_all(
    pool: str = "quantmill",
    schedules: dict[str, str | None] | None = None,
    api_url: str | None = None,
    names: list[str] | None = None,
    image: str | None = None,
) -> dict[str, str]:
    """Create or update the deployments on ``pool``; returns ``{name: deployment id}``.

    ``image`` (Docker or Kubernetes pools): the project's image, in which the code
    sits at the same path as here, so run this from inside that image.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if api_url:
        with temporary_settings({PREFECT_API_URL: api_url}):
            return deploy_all(pool, schedules, None, names, image)
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.flows import Flow

    if image is None:
        ensure_pool(pool)
    chosen = schedules or {}
    ids = {}
    for name in names or list(DEPLOYMENTS):
        spec = DEPLOYMENTS[name]
        flow = Flow.from_source(str(REPO), spec.entrypoint)
        cron = chosen.get(name, spec.cron)
        ids[name] = str(
            flow.deploy(
                name=name,
                work_pool_name=pool,
                cron=cron,
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=spec.concurrency, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
                ),
                description=spec.description,
                tags=list(spec.tags),
                job_variables={"image": image} if image else None,
                build=False,
                push=False,
                print_next_steps=False,
            )
        )
    return ids


def ensure_pool(pool: str) -> None:
    """Create ``pool`` as a process work pool when it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
