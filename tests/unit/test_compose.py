"""docker-compose.yml and infra/Dockerfile, checked without a Docker engine:
the Compose Specification's JSON schema (``tests/data/compose-spec.json``),
then what the schema cannot see: start-up ordering on health, settings from
``.env.example``, the token as a secret, and Dockerfile sources that exist."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``; ``$$`` stays ``$``."""

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value:
            return value
        if op and op.endswith("-"):
            return arg
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return VAR.sub(one, text.replace("$$", "\0")).replace("\0", "$")


def referenced_variables(text: str) -> set[str]:
    return {m.group(1) for m in VAR.finditer(text.replace("$$", ""))}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))


def test_compose_file_follows_the_compose_specification(compose):
    import jsonschema

    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_check_catches_a_mistake(compose):
    import jsonschema

    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["depends_on"]["mlflow"]["condition"] = "service_ready"
    broken["services"]["postgres"]["helthcheck"] = {}
    assert len(list(jsonschema.Draft201909Validator(schema).iter_errors(broken))) >= 2


def test_the_stack_has_every_service_with_health_checks_and_ordering(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "mlflow", "minio", "minio-init"} <= set(
        services
    )
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is not a one-off"
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    mlflow_args = " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow_args and "s3://" in mlflow_args
    assert services["prefect-server"]["ports"] == ["4200:4200"]
    assert "mb" in services["minio-init"]["command"][0]  # creates the bucket
    worker = services["worker"]
    assert worker["image"] == services["mlflow"]["image"]  # the project's image
    assert services["mlflow"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert (REPO / services["mlflow"]["build"]["dockerfile"]).is_file()


def test_settings_come_from_env_example_and_the_token_is_a_secret(compose):
    text = COMPOSE.read_text()
    documented = set(env_example())
    assert referenced_variables(text) <= documented, referenced_variables(text) - documented
    worker = compose["services"]["worker"]
    assert worker["secrets"] == ["hf_token"]
    assert worker["environment"]["HF_TOKEN_FILE"] == "/run/secrets/hf_token"
    assert "file" in compose["secrets"]["hf_token"]
    for name, service in compose["services"].items():
        assert "HF_TOKEN" not in (service.get("environment") or {}), name
    assert "HF_TOKEN" not in env_example()
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/" in ignored
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(text, {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"})


def test_the_dockerfile_copies_what_exists_and_bakes_in_no_secret():
    text = DOCKERFILE.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    for package in ("quantmill", "tasks", "flows", "stack", "tracking", "app"):
        assert f"COPY {package} " in text, package
    assert not re.search(r"^(ARG|ENV)\s+.*(TOKEN|SECRET|PASSWORD)", text, re.M | re.I)
    assert "scripts/bootstrap.sh" in text
