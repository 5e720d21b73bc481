"""The stack's S3 server: moto's, locked.

``python -m stack.s3_server --host H --port P --bucket B`` with the workers' key
in ``QUANTMILL_S3_KEY`` / ``QUANTMILL_S3_SECRET`` (the environment, not the
command line). Before it serves, every request must be signed (moto's IAM
authentication, from the first request on), the bucket exists, and the only
identity is an IAM user whose policy allows S3 actions on that bucket and
nothing else. moto's own control API (``/moto-api/``: reset, reset-auth,
a dashboard of every object) is refused; ``/health`` answers for readiness.
"""

from __future__ import annotations

import argparse
import json
import os

USER = "quantmill-worker"
HEALTH = "/health"


def bucket_policy(bucket: str) -> str:
    """S3 actions on ``bucket`` and its objects, nothing else."""
    arns = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    statement = {"Effect": "Allow", "Action": "s3:*", "Resource": arns}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def prepare(bucket: str, key: str, secret: str) -> None:
    """The bucket and the one user, made in moto's backends (no request involved)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.s3.models import s3_backends

    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].create_bucket(bucket, "us-east-1")
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user("us-east-1", USER)
    iam.put_user_policy(USER, "bucket-only", bucket_policy(bucket))
    made = iam.create_access_key(USER)
    del iam.access_keys[made.physical_resource_id]
    made.access_key_id, made.secret_access_key = key, secret
    iam.access_keys[made.physical_resource_id] = made


PRESIGNED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>'
    b"this server takes requests signed in their headers, not presigned URLs; MLflow "
    b"clients: set MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false and "
    b"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=false (quantmill stack env sets both)"
    b"</Message></Error>"
)


def locked(app):
    """``app`` with moto's control API refused, presigned URLs refused at once (moto
    cannot check them while it authenticates: it fails on each, and a client retries
    for minutes), and a health probe."""

    def wsgi(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == HEALTH:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        if path.startswith("/moto-api"):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"forbidden"]
        if "Signature=" in environ.get("QUERY_STRING", ""):  # SigV4 and SigV2 presigned
            start_response("403 Forbidden", [("Content-Type", "application/xml")])
            return [PRESIGNED]
        return app(environ, start_response)

    return wsgi


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args(argv)
    key, secret = os.environ.pop("QUANTMILL_S3_KEY"), os.environ.pop("QUANTMILL_S3_SECRET")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read when moto's settings load
    os.environ.setdefault("MOTO_PORT", str(args.port))

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    prepare(args.bucket, key, secret)
    app = locked(DomainDispatcherApplication(create_backend_app))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
