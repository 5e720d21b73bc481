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

from quantmill import defaults

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
    "analyze": DeploymentSpec(
        "flows/analyze.py:analyze_flow",
        "Outlier report: per-layer activation and weight statistics and a plot.",
        cron=None,
        concurrency=1,
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
    pool: str = defaults.POOL,
    schedules: dict[str, str | None] | None = None,
    api_url: str | None = None,
    names: list[str] | None = None,
    image: str | None = None,
    crash_after_s: int | None = None,
    auth: str | None = None,
) -> dict[str, str]:
    """Create or update the deployments on ``pool``; returns ``{name: deployment id}``.

    ``api_url`` and ``auth`` (the server's auth string): a server other than this
    process's own configuration.

    ``image`` (Docker or Kubernetes pools): the project's image, in which the code
    sits at the same path as here, so run this from inside that image.
    ``crash_after_s``: a run without a heartbeat for this long is marked Crashed;
    None keeps the crash detection already on the server (or makes it for
    ``defaults.CRASH_AFTER_S``).
    """
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    if api_url:
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth}):
            return deploy_all(pool, schedules, None, names, image, crash_after_s)
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.flows import Flow

    if image is None:
        ensure_pool(pool)
    ensure_crash_detection(crash_after_s)
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


CRASH_AUTOMATION = "quantmill: mark runs without heartbeats as crashed"


def ensure_crash_detection(crash_after_s: int | None = None) -> None:
    """An automation that marks a run Crashed once its heartbeats stop (its worker or
    machine died), instead of leaving it Running forever. Runs emit heartbeats when
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set, as the stack's workers do; a run
    silent for ``crash_after_s`` is the one marked. An automation of another
    window is replaced; with None, whatever is there is kept."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:  # not there yet
        existing = None
    silent_s = crash_after_s or defaults.CRASH_AFTER_S
    if existing is not None:
        if crash_after_s is None or existing.trigger.within == timedelta(seconds=silent_s):
            return
        existing.delete()
    ends = ("Completed", "Failed", "Cancelled", "Crashed")
    Automation(
        name=CRASH_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{e}" for e in ends)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silent_s} s: its worker or machine died",
            )
        ],
    ).create()
