"""Publishing on the real model: the real ``huggingface_hub`` client against the
stand-in Hub server (``tests/support/hub_server.py``: the Hub's HTTP API for
repos, commits, listings and downloads, since the Hub itself cannot be reached
here), and the MLflow Model Registry (a local store, or a real ``mlflow server``)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from flows.params import PublishJob, QuantizeJob
from flows.publish import publish_flow
from flows.quantize import quantize_flow
from quantmill import api as qapi
from quantmill.card import card_metadata
from quantmill.recipe import load_recipe, save_recipe, with_overrides
from quantmill.recipes import SHIPPED_DIR
from tests.conftest import WIKI_TEST
from tests.pipeline.conftest import small_data
from tests.support.hub_server import running_hub
from tests.support.leaks import mlflow_records, prefect_records
from tests.support.servers import mlflow_server, start_mlflow, stop

pytestmark = pytest.mark.slow

TOKEN = f"hf_quantmill_write_{uuid.uuid4().hex}"
READ_TOKEN = f"hf_quantmill_read_{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub")
    with running_hub(
        folder, tokens={TOKEN: "alice:quantmill-org"}, read_tokens={READ_TOKEN: "bob"}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def checkpoint(smollm2_path, tmp_path_factory) -> Path:
    """An RTN w4 g64 checkpoint of the real model, evaluated on one window."""
    recipe = with_overrides(
        load_recipe(SHIPPED_DIR / "rtn-w4g64.yaml"), eval_data=str(WIKI_TEST), eval_windows=1
    )
    out = tmp_path_factory.mktemp("checkpoint") / "smollm2-rtn-w4g64"
    qapi.quantize(str(smollm2_path), recipe, out, progress=False)
    return out


@pytest.fixture
def hub_env(pipeline_env, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    hub.clear_requests()
    return hub


def repo_name(stem: str) -> str:
    return f"alice/{stem}-{uuid.uuid4().hex[:6]}"


def publish(checkpoint, **settings):
    job = PublishJob(checkpoint=str(checkpoint), publish=settings)
    return publish_flow(job, return_state=True)


def uploads(hub) -> list[dict]:
    """Requests that would change a repo: creation, preupload, commit."""
    return [
        r
        for r in hub.requests()
        if r["method"] == "POST"
        and (
            "/commit/" in r["path"]
            or "/preupload/" in r["path"]
            or r["path"] == "/api/repos/create"
        )
    ]


def test_publish_uploads_one_commit_verifies_it_and_registers(
    hub_env, checkpoint, mlflow_client, tmp_path
):
    repo = repo_name("smollm2-rtn-w4g64")
    state = publish(checkpoint, hub_repo=repo)
    assert state.is_completed(), state.message
    result = state.result()
    hub = result["hub"]
    api = hub_env.api(TOKEN)

    commits = api.list_repo_commits(repo)
    assert [c.commit_id for c in commits][0] == hub["commit"]
    assert len(commits) == 2  # the repo's initial commit, then the whole folder in one
    assert hub["new_revision"] is True
    assert api.repo_info(repo).private is True
    files = set(api.list_repo_files(repo))
    assert {"README.md", "config.json", "model.safetensors", "quantmill_recipe.yaml"} <= files
    assert {"tokenizer.json", "quantmill_eval.json"} <= files
    assert hub["verified"]["match"] is True and hub["verified"]["max_abs_logit_diff"] <= 1e-4

    # the model card: metadata the Hub indexes, the evaluation, the recipe, how to load
    card = Path(api.hf_hub_download(repo, "README.md", cache_dir=tmp_path / "hf"))
    meta = card_metadata(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"rtn", "4-bit", "quantized"} <= set(meta["tags"])
    text = card.read_text()
    summary = json.loads((checkpoint / qapi.SUMMARY_FILE).read_text())
    assert f"| this model | {summary['quantized']['perplexity']:.2f} |" in text
    assert "method: rtn" in text and "min_recovery: 0.7" in text
    assert f'from_pretrained("{repo}")' in text

    # MLflow: the run knows where the model went; the registry holds a candidate
    run = mlflow_client.get_run(mlflow_run_id(result))
    assert run.data.tags["hub.commit"] == hub["commit"]
    assert run.data.tags["hub.url"].endswith(repo)
    registered = result["registry"]
    assert registered["name"] == "SmolLM2-135M-Instruct"
    version = mlflow_client.get_model_version(registered["name"], registered["version"])
    tags = version.tags
    assert (tags["method"], tags["bits"], tags["hub_commit"]) == ("rtn", "4", hub["commit"])
    assert float(tags["perplexity"]) == pytest.approx(summary["quantized"]["perplexity"], abs=0.01)
    assert tags["base_commit"] == summary["model"]["revision"]
    assert tags["quality_gate"] == "passed"
    by_alias = mlflow_client.get_model_version_by_alias(registered["name"], "candidate")
    assert by_alias.version == version.version

    # a Prefect artifact links the Hub revision
    assert hub["commit"] in prefect_artifact(f"hub-{repo.replace('/', '-')}")

    # the same content again: no new revision, the same registry version
    again = publish(checkpoint, hub_repo=repo)
    assert again.is_completed(), again.message
    assert again.result()["hub"]["commit"] == hub["commit"]
    assert again.result()["hub"]["new_revision"] is False
    assert len(api.list_repo_commits(repo)) == 2
    assert again.result()["registry"]["version"] == registered["version"]


def mlflow_run_id(result: dict) -> str:
    return (
        result["mlflow"].split()[2] if " " in result["mlflow"] else result["mlflow"].split("/")[-1]
    )


def prefect_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no Prefect artifact {key!r}"
    return str(found[0].data)


def test_the_token_is_nowhere_but_in_its_secret(
    hub_env, checkpoint, mlflow_client, monkeypatch, capfd, caplog, tmp_path
):
    """Token from a Prefect Secret block; then every record of the run is searched for it."""
    from prefect.blocks.system import Secret

    monkeypatch.delenv("HF_TOKEN")
    block = f"hf-token-{uuid.uuid4().hex[:6]}"
    Secret(value=TOKEN).save(block)
    repo = repo_name("leak-check")
    state = publish(checkpoint, hub_repo=repo, token_secret=block)
    assert state.is_completed(), state.message
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)

    haystack: list[tuple[str, bytes]] = []
    out, err = capfd.readouterr()
    haystack += [("stdout", out.encode()), ("stderr", err.encode()), ("logs", caplog.text.encode())]
    haystack += prefect_records(flow_run_id)
    haystack += mlflow_records(mlflow_client, mlflow_run_id(result), result["registry"], tmp_path)
    snapshot = Path(hub_env.api(TOKEN).snapshot_download(repo, cache_dir=tmp_path / "hf"))
    haystack += [(f"hub:{p.name}", p.read_bytes()) for p in snapshot.rglob("*") if p.is_file()]
    haystack += [
        (f"checkpoint:{p.name}", p.read_bytes()) for p in checkpoint.rglob("*") if p.is_file()
    ]

    names = {name.split(":")[0] for name, _ in haystack}
    assert {"prefect-logs", "prefect-flow-run", "prefect-task-run", "mlflow-artifact"} <= names
    leaks = [name for name, data in haystack if TOKEN.encode() in data]
    assert leaks == []


@pytest.mark.parametrize(
    "token, secret, expected",
    [
        (None, "no-such-block", "no Hugging Face token: HF_TOKEN is not set"),
        ("hf_not_a_real_token", "hf-token", "token was rejected"),
        (READ_TOKEN, "hf-token", "read-only"),
    ],
    ids=["missing", "bad", "read-only"],
)
def test_a_missing_or_bad_token_fails_before_any_upload(
    hub_env, checkpoint, monkeypatch, token, secret, expected
):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    card = checkpoint / "README.md"
    before = card.stat().st_mtime_ns if card.exists() else None
    state = publish(checkpoint, hub_repo=repo_name("refused"), token_secret=secret)
    assert state.is_failed()
    assert expected in state.message
    assert uploads(hub_env) == []
    assert (card.stat().st_mtime_ns if card.exists() else None) == before  # card untouched


def test_a_bad_token_fails_the_quantize_flow_before_any_work(hub_env, smollm2_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    job = QuantizeJob(
        model=str(smollm2_path),
        recipe="rtn-w4g64",
        out_dir="out",
        data=small_data(),
        publish={"hub_repo": repo_name("early")},
    )
    state = quantize_flow(job, return_state=True)
    assert state.is_failed() and "token was rejected" in state.message
    assert not Path("out").exists()
    assert uploads(hub_env) == []


def test_an_upload_that_fails_part_way_is_retried_and_leaves_no_partial_revision(
    hub_env, checkpoint
):
    repo = repo_name("flaky")
    hub_env.fail_next_commits(1, "drop")  # the connection drops halfway through the upload
    state = publish(checkpoint, hub_repo=repo, verify=False, registry=False)
    assert state.is_completed(), state.message
    attempts = hub_env.requests(f"/api/models/{repo}/commit/", "POST")
    assert [a["status"] for a in attempts] == [0, 200]
    api = hub_env.api(TOKEN)
    assert len(api.list_repo_commits(repo)) == 2  # initial + the one complete upload
    assert api.list_repo_commits(repo)[0].commit_id == state.result()["hub"]["commit"]
    local = {p.name for p in checkpoint.iterdir() if p.is_file()}
    assert local <= set(api.list_repo_files(repo))


def test_a_registry_outage_fails_after_the_hub_step_and_a_rerun_completes(
    hub_env, checkpoint, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    import flows.publish

    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    repo = repo_name("outage")
    real_register = flows.publish.register_model

    server, url = start_mlflow(backend, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)

    def register_during_outage(*args, **kwargs):
        stop(server)  # the registry goes down between the Hub step and this one
        return real_register(*args, **kwargs)

    monkeypatch.setattr(flows.publish, "register_model", register_during_outage)
    try:
        state = publish(checkpoint, hub_repo=repo, verify=False)
    finally:
        stop(server)
    assert server.returncode is not None and state.is_failed()
    assert "model registry" in state.message and "quantmill publish" in state.message
    api = hub_env.api(TOKEN)
    first_commit = api.list_repo_commits(repo)[0].commit_id
    assert len(api.list_repo_commits(repo)) == 2  # the Hub step was done and is kept

    monkeypatch.setattr(flows.publish, "register_model", real_register)
    with mlflow_server(backend, tmp_path, port=port) as url:
        rerun = publish(checkpoint, hub_repo=repo, verify=False)
        assert rerun.is_completed(), rerun.message
        assert rerun.result()["hub"]["new_revision"] is False
        assert api.list_repo_commits(repo)[0].commit_id == first_commit
        registered = rerun.result()["registry"]
        versions = MlflowClient(url).search_model_versions(f"name = '{registered['name']}'")
        assert [v.version for v in versions] == [registered["version"]]
        # and once more: still one version
        third = publish(checkpoint, hub_repo=repo, verify=False)
        assert third.is_completed() and third.result()["registry"]["reused"] is True
        assert len(MlflowClient(url).search_model_versions(f"name = '{registered['name']}'")) == 1


def test_a_version_below_the_gate_is_registered_without_the_alias(
    pipeline_env, checkpoint, mlflow_client, tmp_path
):
    strict = tmp_path / "strict"
    shutil.copytree(checkpoint, strict)
    recipe = load_recipe(strict / qapi.RECIPE_FILE)
    strict_gate = recipe.gate.model_copy(update={"min_recovery": 0.99})
    save_recipe(recipe.model_copy(update={"gate": strict_gate}), strict / qapi.RECIPE_FILE)
    state = publish(strict)
    assert state.is_completed(), state.message
    registered = state.result()["registry"]
    assert registered["alias"] is None
    version = mlflow_client.get_model_version(registered["name"], registered["version"])
    assert version.tags["quality_gate"] == "failed"
    assert "below the recipe's gate.min_recovery 0.990" in version.tags["quality_gate_reason"]
    assert version.aliases == []
    card = (strict / "README.md").read_text()
    assert "Quality gate: failed" in card
    assert yaml.safe_load(card.split("---")[1])["license"] == "apache-2.0"


def test_quantize_flow_ends_with_the_publication(hub_env, smollm2_path, mlflow_client):
    repo = repo_name("flow")
    job = QuantizeJob(
        model=str(smollm2_path),
        recipe="rtn-w4g64",
        out_dir="out",
        data=small_data(),
        publish={"hub_repo": repo},
    )
    state = quantize_flow(job, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    published = result["published"]
    assert published["hub"]["verified"]["match"] is True
    assert hub_env.api(TOKEN).list_repo_commits(repo)[0].commit_id == published["hub"]["commit"]
    version = mlflow_client.get_model_version_by_alias(published["registry"]["name"], "candidate")
    assert version.run_id == result["mlflow_run_id"]
    # the checkpoint's summary holds both evaluations, so the card and the gate can use them
    summary = json.loads((Path("out") / qapi.SUMMARY_FILE).read_text())
    assert summary["original"]["perplexity"] == pytest.approx(result["perplexity_original"])


def test_cli_publish_against_an_mlflow_server(hub_env, checkpoint, mlflow_server_url, tmp_path):
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from quantmill.serving.verify import wna16_missing_reason
    from tests.pipeline.test_servers import last_json

    # vLLM serves this 4-bit checkpoint only where its CPU build has a 4-bit kernel
    engines = "transformers" if wna16_missing_reason() else "transformers,vllm"
    repo = repo_name("cli")
    registry_url = mlflow_server_url
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry_url}
    cmd = [sys.executable, "-m", "app", "publish", str(checkpoint)]
    cmd += ["--hub-repo", repo, "--json", "--verify", engines]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = last_json(done.stdout)
    assert TOKEN not in done.stdout + done.stderr
    assert result["hub"]["verified"]["match"] is True
    assert hub_env.api(TOKEN).list_repo_commits(repo)[0].commit_id == result["hub"]["commit"]
    client = MlflowClient(registry_url)
    name = result["registry"]["name"]
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.version == result["registry"]["version"]
    if "vllm" in engines:
        # vLLM (its own venv) served the checkpoint before it was published: the card says so
        assert result["serving"]["vllm"]["ok"] is True, result["serving"]["vllm"]["reason"]
        assert version.tags["serving.vllm"] == "ok"
        assert "Verified in vllm" in (checkpoint / "README.md").read_text()
    assert version.tags["hub_commit"] == result["hub"]["commit"]
    files = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert "model/MLmodel" in files  # logged through the server's artifact proxy
