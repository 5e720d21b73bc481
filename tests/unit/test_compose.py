"""docker-compose.yml, infra/ and .env.example, checked without a Docker engine:
the Compose Specification's JSON schema (``tests/data/compose-spec.json``), then
what the schema cannot see: start-up ordering on health, settings from
``.env.example``, and a stack closed by default (ports on loopback, a login on
Prefect and MLflow, no credential in the file, least-privilege keys and roles).
The scripts under infra/ run here for real: the secrets wrapper, MinIO's set-up
(against a stand-in ``mc``), MLflow's user set-up (against a stand-in server) and
PostgreSQL's (against the PostgreSQL at 127.0.0.1:5432 when there is one)."""

from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
WRAPPER = REPO / "infra" / "with-secrets.sh"
WRAPPER_IN_CONTAINER = "/usr/local/bin/with-secrets.sh"
PG_INIT = REPO / "infra" / "postgres" / "init.sh"
MINIO_INIT = REPO / "infra" / "minio" / "init.sh"
BUCKET_POLICY = REPO / "infra" / "minio" / "bucket-policy.json"
MLFLOW_INI = REPO / "infra" / "mlflow" / "basic_auth.ini"
MLFLOW_INIT = REPO / "infra" / "mlflow" / "init_users.py"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN|KEY")
NON_SECRET_SETTINGS = {"S3_ACCESS_KEY"}  # an access key id: a user name, not a secret
NOT_CREDENTIALS = {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME"}  # a path, a name
WITH_SECRETS = ["/bin/sh", WRAPPER_IN_CONTAINER]
# *_FILE variables their own program reads (the others go through the wrapper)
READ_BY_THEIR_PROGRAM = {
    "HF_TOKEN_FILE",  # quantmill
    "POSTGRES_PASSWORD_FILE", "PG_PREFECT_PASSWORD_FILE", "PG_MLFLOW_PASSWORD_FILE",  # postgres
    "MINIO_ROOT_PASSWORD_FILE",  # minio
}  # fmt: skip


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


@pytest.fixture(scope="module")
def raw() -> dict:
    """The file as written: ``${VAR}`` references not filled in."""
    return yaml.safe_load(COMPOSE.read_text())


def strings_run(service: dict) -> list[str]:
    """Every string a service runs: entrypoint, command and health check."""
    out = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        out += [value] if isinstance(value, str) else list(value)
    test = (service.get("healthcheck") or {}).get("test") or []
    return out + ([test] if isinstance(test, str) else list(test))


def credential_leaks(document: dict) -> list[str]:
    """Credentials written into the compose file: a credential-like variable with a
    value that is not a secret file under /run/secrets (or a reference to a setting
    that is not secret), a password in a URL, a secret ``${VAR}`` or a
    ``NAME=value`` credential in what a service runs."""
    leaks = []
    for name, service in document["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            where = f"{name}: {key}={value}"
            if key.endswith("_FILE"):
                if CREDENTIAL_NAME.search(key) and not value.startswith("/run/secrets/"):
                    leaks.append(where)
            elif CREDENTIAL_NAME.search(key) and key not in NOT_CREDENTIALS:
                refs = VAR.fullmatch(value)
                if not (refs and refs.group(1) in NON_SECRET_SETTINGS):
                    leaks.append(where)
        for text in [str(v) for v in (service.get("environment") or {}).values()] + [
            str(s) for s in strings_run(service)
        ]:
            if re.search(r"://[^/@\s:]+:[^/@\s]+@", text):
                leaks.append(f"{name}: password in a URL: {text}")
            for ref in referenced_variables(text):
                if CREDENTIAL_NAME.search(ref) and ref not in NON_SECRET_SETTINGS:
                    leaks.append(f"{name}: ${{{ref}}} in {text}")
        for text in strings_run(service):
            if re.search(r"\w*(PASSWORD|SECRET|TOKEN|AUTH_STRING)\w*=[^\s$]", str(text), re.I):
                leaks.append(f"{name}: {text}")
    return leaks


def secret_files(service: dict) -> dict[str, str]:
    """``{VARIABLE_FILE: secret name}`` of a service's /run/secrets variables."""
    return {
        key: str(value).removeprefix("/run/secrets/")
        for key, value in (service.get("environment") or {}).items()
        if str(value).startswith("/run/secrets/")
    }


# --- the Compose Specification, ordering, settings --------------------------------------


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
    assert {
        "postgres", "prefect-server", "worker", "mlflow", "mlflow-init", "minio", "minio-init"
    } <= set(services)  # fmt: skip
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is not a one-off"
    assert services["worker"]["depends_on"]["mlflow-init"] == {
        "condition": "service_completed_successfully"
    }
    assert services["mlflow-init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == (
        "service_completed_successfully"
    )
    prefect_db = services["prefect-server"]["environment"]
    assert prefect_db["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    mlflow_args = " ".join(services["mlflow"]["command"])
    assert "postgresql+psycopg2://" in mlflow_args and "s3://" in mlflow_args
    assert "mb --ignore-existing" in MINIO_INIT.read_text()  # creates the bucket
    worker = services["worker"]
    assert worker["image"] == services["mlflow"]["image"]  # the project's image
    assert services["mlflow"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert (REPO / services["mlflow"]["build"]["dockerfile"]).is_file()


def test_settings_come_from_env_example_and_the_token_is_a_secret(compose):
    text = COMPOSE.read_text()
    documented = set(env_example())
    assert referenced_variables(text) <= documented, referenced_variables(text) - documented
    worker = compose["services"]["worker"]
    assert "hf_token" in worker["secrets"]
    assert worker["environment"]["HF_TOKEN_FILE"] == "/run/secrets/hf_token"
    assert "file" in compose["secrets"]["hf_token"]
    for name, service in compose["services"].items():
        assert "HF_TOKEN" not in (service.get("environment") or {}), name
    assert "HF_TOKEN" not in env_example()
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/" in ignored
    with pytest.raises(KeyError, match="MINIO_ROOT_USER"):
        interpolate(text, {k: v for k, v in env_example().items() if k != "MINIO_ROOT_USER"})


# --- closed by default ---------------------------------------------------------------------


def test_published_ports_listen_on_loopback_unless_bind_address_says_otherwise(raw):
    text = COMPOSE.read_text()
    published = {name: s["ports"] for name, s in raw["services"].items() if s.get("ports")}
    assert set(published) == {"prefect-server", "mlflow", "minio"}  # not postgres, not S3
    without = {k: v for k, v in env_example().items() if k != "BIND_ADDRESS"}
    for env, address in (
        (without, "127.0.0.1"),
        ({**without, "BIND_ADDRESS": "0.0.0.0"}, "0.0.0.0"),
    ):
        services = yaml.safe_load(interpolate(text, env))["services"]
        ports = [p for name in published for p in services[name]["ports"]]
        assert ports and all(p.startswith(f"{address}:") and p.count(":") == 2 for p in ports)
    assert yaml.safe_load(interpolate(text, without))["services"]["prefect-server"]["ports"] == [
        "127.0.0.1:4200:4200"
    ]
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"
    note = ENV_EXAMPLE.read_text()
    assert all(word in note for word in ("0.0.0.0", "Prefect UI", "MLflow UI", "MinIO console"))


def test_no_credential_is_written_in_the_compose_file_or_env_example(raw):
    assert credential_leaks(raw) == []
    for key in env_example():
        assert not CREDENTIAL_NAME.search(key) or key in NON_SECRET_SETTINGS, key


@pytest.mark.parametrize(
    "service, change",
    [
        ("worker", {"environment": {"PREFECT_API_AUTH_STRING": "admin:hunter2"}}),
        ("postgres", {"environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD}"}}),
        ("worker", {"environment": {"AWS_SECRET_ACCESS_KEY_FILE": "/tmp/key"}}),
        ("mlflow", {"command": ["--backend-store-uri=postgresql://mlflow:hunter2@postgres/m"]}),
        ("minio-init", {"command": ["sh", "-c", "MINIO_ROOT_PASSWORD=hunter2 mc ls"]}),
        ("minio-init", {"command": ["sh", "-c", "mc alias set x y ${MINIO_ROOT_PASSWORD}"]}),
    ],
)
def test_the_credential_scan_finds_a_planted_one(raw, service, change):
    planted = copy.deepcopy(raw)
    target = planted["services"][service]
    for key, value in change.items():
        if isinstance(value, dict):
            target.setdefault(key, {}).update(value)
        else:
            target[key] = value
    assert credential_leaks(planted)


def test_every_secret_is_a_file_in_secrets_and_each_service_mounts_what_it_reads(raw):
    declared = raw["secrets"]
    for name, spec in declared.items():
        assert spec == {"file": f"./secrets/{name}"}, name
    generator = next(line for line in ENV_EXAMPLE.read_text().splitlines() if "urandom" in line)
    for name in declared:
        assert name in ENV_EXAMPLE.read_text(), f"{name} is not listed in .env.example"
        made = re.search(rf"[ /]{name}\b", generator)
        assert (name == "hf_token") != bool(made), f"the command skips {name}"
    assert "printf 'admin:%s'" in generator and "> secrets/prefect_auth" in generator
    for name, service in raw["services"].items():
        mounted = service.get("secrets") or []
        assert set(mounted) <= set(declared), name
        assert set(secret_files(service).values()) == set(mounted), name


def test_programs_that_read_plain_variables_start_through_the_wrapper(raw):
    for name, service in raw["services"].items():
        wrapped = set(secret_files(service)) - READ_BY_THEIR_PROGRAM
        if not wrapped:
            continue
        assert service["entrypoint"][:2] == WITH_SECRETS, name
        mounts = [str(v) for v in service.get("volumes") or []]
        assert f"./infra/with-secrets.sh:{WRAPPER_IN_CONTAINER}:ro" in mounts, name


def test_the_wrapper_exports_name_from_name_file_and_execs(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "one").write_text("s3cret value\n\n")
    (secrets / "hf").write_text("hf_token_value\n")
    (tmp_path / "cert").write_text("not a secret\n")
    env = {
        "PATH": os.environ["PATH"],
        "SECRETS_DIR": str(secrets),
        "ONE_FILE": str(secrets / "one"),
        "HF_TOKEN_FILE": str(secrets / "hf"),
        "GONE_FILE": str(secrets / "gone"),
        "CERT_FILE": str(tmp_path / "cert"),  # outside the secrets folder
        "MULTI": "first\nFAKE_FILE=" + str(secrets / "one"),
    }
    done = subprocess.run(
        ["sh", str(WRAPPER), "env"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "ONE=s3cret value" in lines
    exported = {line.partition("=")[0] for line in lines}
    assert not exported & {"HF_TOKEN", "GONE", "CERT", "FAKE"}
    assert "GONE_FILE" in done.stderr
    process = subprocess.Popen(
        ["sh", str(WRAPPER), "sh", "-c", 'echo "$$ $ONE"; exit 7'],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 7
    assert out.split(" ", 1) == [str(process.pid), "s3cret value\n"]  # exec: the same process
    assert '"${SECRETS_DIR:-/run/secrets}"/*' in WRAPPER.read_text()


# --- Prefect -------------------------------------------------------------------------------


def test_prefect_server_asks_for_a_login_and_its_clients_have_it_from_a_secret(raw):
    services = raw["services"]
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING_FILE"] == "/run/secrets/prefect_auth"
    for client in ("deploy", "worker"):
        env = services[client]["environment"]
        assert env["PREFECT_API_AUTH_STRING_FILE"] == "/run/secrets/prefect_auth", client
        assert "prefect_auth" in services[client]["secrets"], client
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for name, service in services.items():
        env = service.get("environment") or {}
        assert not {"PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING"} & set(env), name
    assert services["worker"]["entrypoint"][2:] == ["prefect", "worker", "start"]


# --- MLflow --------------------------------------------------------------------------------


def test_mlflow_runs_the_basic_auth_app_with_the_ini_from_infra(raw):
    mlflow, init = raw["services"]["mlflow"], raw["services"]["mlflow-init"]
    assert mlflow["command"][:3] == ["mlflow", "server", "--app-name=basic-auth"]
    ini_path = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./infra/mlflow/basic_auth.ini:{ini_path}:ro" in mlflow["volumes"]
    ini = configparser.ConfigParser()
    ini.read(MLFLOW_INI)
    auth = ini["mlflow"]
    assert auth["default_permission"] == "NO_PERMISSIONS"
    assert auth["admin_username"] == init["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert "admin_password" not in auth
    assert auth["database_uri"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow_auth"
    assert (
        "--backend-store-uri=postgresql+psycopg2://mlflow@postgres:5432/mlflow"
        in (mlflow["command"])
    )
    env = mlflow["environment"]
    assert env["PGPASSWORD_FILE"] == "/run/secrets/pg_mlflow_password"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"] == "/run/secrets/mlflow_admin_password"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY_FILE"] == "/run/secrets/mlflow_flask_secret_key"
    assert mlflow["healthcheck"]["test"][-1] == "http://localhost:5000/health"


def test_the_worker_logs_in_to_mlflow_as_the_user_mlflow_init_makes(raw):
    services = raw["services"]
    init = services["mlflow-init"]
    assert init["restart"] == "no" and init["command"] == ["python", "/infra/mlflow/init_users.py"]
    assert "./infra/mlflow:/infra/mlflow:ro" in init["volumes"]
    made = init["environment"]["MLFLOW_WORKER_USERNAME"]
    assert made == "quantmill-worker" and made != init["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"]
    password = init["environment"]["MLFLOW_WORKER_PASSWORD_FILE"]
    for client in ("deploy", "worker"):
        env = services[client]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == made, client
        assert env["MLFLOW_TRACKING_PASSWORD_FILE"] == password, client
    assert "mlflow_admin_password" not in services["worker"]["secrets"]


def test_mlflow_health_needs_no_login():
    from mlflow.server.auth import is_unprotected_route
    from mlflow.server.security_utils import is_health_endpoint

    assert is_unprotected_route("/health") and is_health_endpoint("/health")
    assert not is_unprotected_route("/api/2.0/mlflow/experiments/search")


class StandInMlflow(BaseHTTPRequestHandler):
    """The four user routes init_users.py calls, with basic auth."""

    users: dict[str, list] = {}  # name: [password, is_admin]

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_one(self):
        import base64

        auth = self.headers.get("Authorization", "").removeprefix("Basic ")
        name, _, password = base64.b64decode(auth).decode().partition(":")
        if self.users.get(name, [None])[0] != password:
            return self.reply(401, {})
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.removeprefix("/api/2.0/mlflow/users/")
        if path == "current":
            return self.reply(200, {"user": {"username": name}})
        if not self.users[name][1]:
            return self.reply(403, {})
        if path == "create":
            if body["username"] in self.users:
                return self.reply(400, {"error_code": "RESOURCE_ALREADY_EXISTS"})
            self.users[body["username"]] = [body["password"], False]
            return self.reply(200, {"user": {"username": body["username"]}})
        if path.startswith("get?username="):
            found = self.users.get(path.partition("=")[2])
            if found is None:
                return self.reply(404, {})
            return self.reply(200, {"user": {"is_admin": found[1]}})
        if path == "update-password":
            self.users[body["username"]][0] = body["password"]
            return self.reply(200, {})
        return self.reply(404, {})

    do_GET = do_POST = do_PATCH = handle_one


def test_mlflow_init_makes_the_worker_user_and_runs_again_safely(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("init_users", MLFLOW_INIT)
    init_users = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init_users)
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandInMlflow.users = {"admin": ["admin-password-1", True]}
    env = {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{server.server_port}",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
        "MLFLOW_WORKER_USERNAME": "quantmill-worker",
        "MLFLOW_WORKER_PASSWORD": "worker-password-1",
    }
    try:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert init_users.main() == 0
        assert StandInMlflow.users["quantmill-worker"] == ["worker-password-1", False]
        monkeypatch.setenv("MLFLOW_WORKER_PASSWORD", "worker-password-2")  # a new secret file
        assert init_users.main() == 0
        assert StandInMlflow.users["quantmill-worker"] == ["worker-password-2", False]
        StandInMlflow.users["quantmill-worker"][1] = True
        assert init_users.main() == 1  # the worker must not be an admin
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "wrong-password")
        assert init_users.main() == 1
    finally:
        server.shutdown()
    printed = capsys.readouterr()
    assert "worker-password" not in printed.out + printed.err


# --- MinIO ---------------------------------------------------------------------------------


def test_root_minio_credentials_stay_in_minio_and_minio_init(raw):
    for name, service in raw["services"].items():
        text = json.dumps(service)
        holds_root = "MINIO_ROOT" in text or "minio_root_password" in text
        assert holds_root == (name in ("minio", "minio-init")), name


def test_the_worker_and_mlflow_use_the_bucket_limited_key(raw):
    services = raw["services"]
    init = services["minio-init"]["environment"]
    for name in ("worker", "mlflow"):
        env = services[name]["environment"]
        assert (
            env["AWS_ACCESS_KEY_ID"]
            == init["S3_ACCESS_KEY"]
            == "${S3_ACCESS_KEY:-quantmill-worker}"
        )
        assert env["AWS_SECRET_ACCESS_KEY_FILE"] == init["S3_SECRET_KEY_FILE"]
        assert env["AWS_SECRET_ACCESS_KEY_FILE"] == "/run/secrets/s3_secret_key"
        assert "AWS_SECRET_ACCESS_KEY" not in env
    assert services["minio-init"]["command"] == ["/bin/sh", "/infra/minio/init.sh"]
    assert "./infra/minio:/infra/minio:ro" in services["minio-init"]["volumes"]
    assert "s3_secret_key" not in services["deploy"].get("secrets", [])


def test_the_bucket_policy_allows_only_the_bucket():
    policy = json.loads(BUCKET_POLICY.read_text().replace("${S3_BUCKET}", "bkt"))
    (statement,) = policy["Statement"]
    assert statement == {
        "Effect": "Allow",
        "Action": ["s3:*"],
        "Resource": ["arn:aws:s3:::bkt", "arn:aws:s3:::bkt/*"],
    }


def run_minio_init(tmp_path, attach_error: str = ""):
    """infra/minio/init.sh against a stand-in ``mc`` that logs its calls (and the
    policy it is given) and fails ``policy attach`` with ``attach_error``."""
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(
        '#!/bin/sh\necho "mc $*" >> "$MC_LOG"\n'
        'case "$*" in *"policy create"*) cat "$6" >> "$MC_LOG" ;; esac\n'
        'case "$*" in *"policy attach"*) [ -z "$ATTACH_ERROR" ] || '
        '{ echo "$ATTACH_ERROR" >&2; exit 1; } ;; esac\n'
    )
    fake.chmod(0o755)
    log = tmp_path / "mc.log"
    log.unlink(missing_ok=True)
    env = {
        "PATH": f"{fake.parent}:{os.environ['PATH']}", "MC_LOG": str(log),
        "ATTACH_ERROR": attach_error, "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpw",
        "S3_BUCKET": "bkt", "S3_ACCESS_KEY": "quantmill-worker", "S3_SECRET_KEY": "s3-secret",
    }  # fmt: skip
    done = subprocess.run(
        ["sh", str(MINIO_INIT)], env=env, capture_output=True, text=True, timeout=60
    )
    return done, log.read_text()


def test_minio_init_makes_the_bucket_policy_and_user_and_runs_again_safely(tmp_path):
    done, log = run_minio_init(tmp_path)
    assert done.returncode == 0, done.stderr
    calls = [line for line in log.splitlines() if line.startswith("mc ")]
    assert calls == [
        "mc alias set local http://minio:9000 root rootpw",
        "mc mb --ignore-existing local/bkt",
        "mc admin policy create local quantmill-bucket /dev/stdin",
        "mc admin user add local quantmill-worker s3-secret",
        "mc admin policy attach local quantmill-bucket --user quantmill-worker",
    ]
    policy = json.loads(log[log.index("{") : log.rindex("}") + 1])
    assert policy["Statement"][0]["Resource"] == ["arn:aws:s3:::bkt", "arn:aws:s3:::bkt/*"]
    again, _ = run_minio_init(
        tmp_path, "mc: <ERROR> ... The specified policy change is already in effect."
    )
    assert again.returncode == 0, again.stderr
    broken, _ = run_minio_init(tmp_path, "mc: <ERROR> Unable to reach the server")
    assert broken.returncode != 0 and "Unable to reach" in broken.stderr


# --- PostgreSQL ----------------------------------------------------------------------------


def init_sh_plan() -> tuple[dict[str, str], dict[str, str]]:
    """``({role: password file variable}, {database: owner})`` as init.sh makes them."""
    text = PG_INIT.read_text()
    roles = dict(re.findall(r'^role (\w+) "\$\{(\w+):-', text, re.M))
    databases = dict(re.findall(r"^database (\w+) (\w+)$", text, re.M))
    return roles, databases


def test_postgres_init_gives_each_service_its_role_and_database(raw):
    roles, databases = init_sh_plan()
    assert roles == {"prefect": "PG_PREFECT_PASSWORD_FILE", "mlflow": "PG_MLFLOW_PASSWORD_FILE"}
    assert databases == {"prefect": "prefect", "mlflow": "mlflow", "mlflow_auth": "mlflow"}
    text = PG_INIT.read_text()
    assert 'REVOKE CONNECT, TEMPORARY ON DATABASE :"name" FROM PUBLIC' in text
    assert os.access(PG_INIT, os.X_OK)  # the image sources, not runs, a .sh without it
    services = raw["services"]
    assert (
        "./infra/postgres/init.sh:/docker-entrypoint-initdb.d/init.sh:ro"
        in (services["postgres"]["volumes"])
    )
    prefect = services["prefect-server"]["environment"]
    assert (
        prefect["PREFECT_SERVER_DATABASE_USER"]
        == databases[prefect["PREFECT_SERVER_DATABASE_NAME"]]
    )
    assert (
        prefect["PREFECT_SERVER_DATABASE_PASSWORD_FILE"]
        == services["postgres"]["environment"][roles["prefect"]]
    )
    assert (
        services["mlflow"]["environment"]["PGPASSWORD_FILE"]
        == services["postgres"]["environment"][roles["mlflow"]]
    )


def psql(*args: str, user: str = "postgres", db: str = "postgres") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-X", "-tA", "-h", "127.0.0.1", "-U", user, "-d", db, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_postgres_init_runs_on_a_real_server(tmp_path):
    if shutil.which("psql") is None or psql("-c", "select 1").returncode != 0:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432 with user postgres")
    prefix = f"qmtest_{uuid.uuid4().hex[:8]}_"
    (tmp_path / "p").write_text("prefect-password-1\n")
    (tmp_path / "m").write_text("mlflow-password-1\n")
    env = {
        **os.environ, "PGHOST": "127.0.0.1", "POSTGRES_USER": "postgres", "POSTGRES_DB": "postgres",
        "DB_PREFIX": prefix, "PG_PREFECT_PASSWORD_FILE": str(tmp_path / "p"),
        "PG_MLFLOW_PASSWORD_FILE": str(tmp_path / "m"),
    }  # fmt: skip
    try:
        for _ in range(2):  # idempotent
            done = subprocess.run(
                ["sh", str(PG_INIT)], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
        owners = psql("-c", f"select datname, pg_get_userbyid(datdba) from pg_database "
                            f"where datname like '{prefix}%' order by 1")  # fmt: skip
        assert owners.stdout.split() == [
            f"{prefix}mlflow|{prefix}mlflow", f"{prefix}mlflow_auth|{prefix}mlflow",
            f"{prefix}prefect|{prefix}prefect",
        ]  # fmt: skip
        roles = psql("-c", f"select rolname, rolcanlogin, rolsuper, rolpassword like 'SCRAM%' "
                           f"from pg_authid where rolname like '{prefix}%' order by 1")  # fmt: skip
        assert roles.stdout.split() == [f"{prefix}mlflow|t|f|t", f"{prefix}prefect|t|f|t"]
        can = psql("-c", f"select has_database_privilege('{prefix}prefect', '{prefix}mlflow', "
                         f"'CONNECT'), has_database_privilege('{prefix}mlflow', '{prefix}prefect', "
                         f"'CONNECT'), has_database_privilege('{prefix}mlflow', '{prefix}mlflow', "
                         "'CONNECT')")  # fmt: skip
        assert can.stdout.strip() == "f|f|t"
        missing = subprocess.run(
            ["sh", str(PG_INIT)], env={**env, "PG_PREFECT_PASSWORD_FILE": str(tmp_path / "none")},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert missing.returncode != 0 and "no password for role prefect" in missing.stderr
    finally:
        for db in ("prefect", "mlflow", "mlflow_auth"):
            psql("-c", f'DROP DATABASE IF EXISTS "{prefix}{db}"')
        for role in ("prefect", "mlflow"):
            psql("-c", f'DROP ROLE IF EXISTS "{prefix}{role}"')


# --- the image -----------------------------------------------------------------------------


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


def test_the_workers_runs_keep_to_mounted_places(compose):
    worker = compose["services"]["worker"]
    env, mounts = worker["environment"], worker["volumes"]
    targets = {m.split(":")[1] for m in mounts if isinstance(m, str) and m.startswith("./")}
    assert env["QUANTMILL_OUTPUT_ROOT"] in targets
    assert set(env["QUANTMILL_DATA_ROOTS"].split(":")) <= targets
    assert "./data:/app/data:ro" in mounts  # what runs read, they cannot change
