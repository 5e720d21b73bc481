"""S3 storage against moto's standalone S3-compatible server on loopback: the
calibration cache mirrored to a bucket, and MLflow artifacts kept in it."""

from __future__ import annotations

import uuid

import pytest

from flows.params import QuantizeJob
from flows.quantize import quantize_flow
from quantmill import cache, stages
from quantmill.errors import StorageError
from tests.pipeline.conftest import small_data
from tests.pipeline.test_flows import counting
from tests.support.servers import free_port, s3_server


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as url:
        yield url


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """S3 settings as a user sets them; a fresh bucket per test. Returns a boto3 client."""
    import boto3

    bucket = f"quantmill-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("QUANTMILL_S3_BUCKET", bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.bucket = bucket
    return client


def keys(client) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=client.bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_the_bucket_mirrors_the_cache_for_another_machine(s3_env, tmp_path, monkeypatch):
    made = []

    def produce(path):
        made.append(path)
        path.write_bytes(b"prepared calibration data")

    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "machine-a"))
    path, hit = cache.cached_file("calibration", "k1", "ids.safetensors", produce)
    assert (hit, len(made)) == (False, 1)
    assert "cache/calibration/k1/ids.safetensors" in keys(s3_env)  # the bucket was created

    # another machine: empty local cache, same bucket: no work, same bytes
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path / "machine-b"))
    other, hit = cache.cached_file("calibration", "k1", "ids.safetensors", produce)
    assert (hit, len(made)) == (True, 1)
    assert other != path and other.read_bytes() == b"prepared calibration data"
    assert not list(other.parent.glob("*.partial"))


def test_an_unreachable_s3_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("QUANTMILL_S3_BUCKET", "nowhere")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path))
    with pytest.raises(StorageError, match="MLFLOW_S3_ENDPOINT_URL") as caught:
        cache.cached_file("calibration", "k1", "ids.safetensors", lambda p: p.write_bytes(b"x"))
    assert "bucket 'nowhere'" in str(caught.value)
    assert not list(tmp_path.rglob("ids.safetensors"))  # nothing half-made


@pytest.mark.slow
def test_flow_keeps_artifacts_and_cache_in_the_bucket(
    s3_env, pipeline_env, short_smollm2, mlflow_client, monkeypatch
):
    collect = counting(monkeypatch, stages, "collect_statistics")
    job = dict(model=str(short_smollm2), recipe="gptq-w4g64-shared", data=small_data())
    first = quantize_flow(QuantizeJob(**job, out_dir="first"))
    run = mlflow_client.get_run(first["mlflow_run_id"])
    assert run.info.artifact_uri.startswith(f"s3://{s3_env.bucket}/mlflow/")
    stored = keys(s3_env)
    prefix = run.info.artifact_uri.split(f"s3://{s3_env.bucket}/", 1)[1]
    for name in ("quantmill_eval.json", "plots/layer_loss.png", "model/MLmodel"):
        assert f"{prefix}/{name}" in stored, name
    assert any(k.startswith("cache/calibration/") for k in stored)
    assert any(k.startswith("cache/statistics/") for k in stored)
    # the registered version points into the bucket too
    version = mlflow_client.get_model_version(
        first["published"]["registry"]["name"], first["published"]["registry"]["version"]
    )
    assert version.source.startswith(f"s3://{s3_env.bucket}/")

    # a second machine (empty local cache) takes calibration and statistics from S3
    monkeypatch.setenv("QUANTMILL_CACHE", str(pipeline_env / "machine-b"))
    second = quantize_flow(QuantizeJob(**job, out_dir="second"))
    assert len(collect) == 1
    assert second["perplexity"] == pytest.approx(first["perplexity"])
