"""Object storage for what outlives one machine: an S3 bucket (MinIO, AWS or any
S3-compatible server) that mirrors the local file cache and holds MLflow's
artifacts when the MLflow store is local.

It is on when ``QUANTMILL_S3_BUCKET`` or ``MLFLOW_S3_ENDPOINT_URL`` is set:

- ``MLFLOW_S3_ENDPOINT_URL``: the server's URL (unset: AWS itself);
- ``QUANTMILL_S3_BUCKET``: the bucket (default ``quantmill``), created when missing;
- ``QUANTMILL_S3_PREFIX``: a key prefix inside it (default none);
- credentials and region the usual boto3 way (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from quantmill import defaults
from quantmill.errors import StorageError

DEFAULT_BUCKET = defaults.BUCKET


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    endpoint_url: str | None
    prefix: str

    @classmethod
    def from_env(cls) -> S3Settings | None:
        bucket = os.environ.get("QUANTMILL_S3_BUCKET", "").strip()
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "").strip()
        if not bucket and not endpoint:
            return None
        prefix = os.environ.get("QUANTMILL_S3_PREFIX", "").strip("/")
        return cls(bucket or DEFAULT_BUCKET, endpoint or None, prefix)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"

    def where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"


class S3Store:
    """Get and put whole files; a put is atomic (S3 shows an object only when complete)."""

    def __init__(self, settings: S3Settings) -> None:
        import boto3

        self.settings = settings
        self.client = boto3.client("s3", endpoint_url=settings.endpoint_url)
        self._bucket_ready = False
        self._lock = threading.Lock()

    def ensure_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        with self._lock:
            if self._bucket_ready:
                return
            bucket = self.settings.bucket
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise self._error("cannot open the bucket", exc) from exc
                try:
                    self.client.create_bucket(Bucket=bucket)
                except ClientError as create_exc:
                    what = "the bucket is missing and cannot be created"
                    raise self._error(what, create_exc) from create_exc
            except BotoCoreError as exc:
                raise self._error("cannot reach the server", exc) from exc
            self._bucket_ready = True

    def download(self, key: str, dest: Path) -> bool:
        """Copy object ``key`` to ``dest``; False when there is no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        self.ensure_bucket()
        try:
            self.client.download_file(self.settings.bucket, self.settings.key(key), str(dest))
        except ClientError as exc:
            if _code(exc) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise self._error(f"cannot read {key}", exc) from exc
        except BotoCoreError as exc:
            raise self._error(f"cannot read {key}", exc) from exc
        return True

    def upload(self, path: Path, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.ensure_bucket()
        try:
            self.client.upload_file(str(path), self.settings.bucket, self.settings.key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"cannot write {key}", exc) from exc

    def _error(self, what: str, exc: Exception) -> StorageError:
        return StorageError(
            f"S3 storage ({self.settings.where()}): {what}: {exc}. Check "
            "MLFLOW_S3_ENDPOINT_URL, QUANTMILL_S3_BUCKET and the AWS credentials, or unset "
            "them to keep everything in local folders."
        )


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


@functools.lru_cache(maxsize=4)
def _store_for(settings: S3Settings) -> S3Store:
    return S3Store(settings)


def remote_store() -> S3Store | None:
    """The configured S3 store, or None when storage is local."""
    settings = S3Settings.from_env()
    return _store_for(settings) if settings else None
