"""One-off (compose service mlflow-init): the worker's MLflow user.

As the admin (MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD), create the
non-admin user MLFLOW_WORKER_USERNAME with the password MLFLOW_WORKER_PASSWORD
through MLflow's REST API; when it exists already, set its password to that one
(a new secret file takes effect on the next `docker compose up`). Then log in
once as the worker. Fails when the user is an admin: the worker must not be one.
The passwords come from secret files through infra/with-secrets.sh. Standard
library only; nothing it prints holds a password.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

USERS = "/api/2.0/mlflow/users"


def call(method: str, path: str, login: tuple[str, str], body: dict | None = None):
    """``(HTTP status, decoded JSON or text)`` of one request with basic auth."""
    url = os.environ["MLFLOW_TRACKING_URI"].rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    token = base64.b64encode(":".join(login).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:300]


def main() -> int:
    admin = (os.environ["MLFLOW_AUTH_ADMIN_USERNAME"], os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
    user, password = os.environ["MLFLOW_WORKER_USERNAME"], os.environ["MLFLOW_WORKER_PASSWORD"]
    status, body = call("POST", f"{USERS}/create", admin, {"username": user, "password": password})
    if status == 200:
        print(f"created MLflow user {user}")
    else:
        found_status, found = call("GET", f"{USERS}/get?username={urllib.parse.quote(user)}", admin)
        if found_status != 200:
            print(f"cannot create MLflow user {user}: HTTP {status}: {body}", file=sys.stderr)
            return 1
        if found["user"].get("is_admin"):
            print(f"MLflow user {user} is an admin; make it a plain user", file=sys.stderr)
            return 1
        change = {"username": user, "password": password}
        status, body = call("PATCH", f"{USERS}/update-password", admin, change)
        if status != 200:
            print(f"cannot set the password of {user}: HTTP {status}: {body}", file=sys.stderr)
            return 1
        print(f"MLflow user {user} exists; its password is the one in the secret file")
    status, body = call("GET", f"{USERS}/current", (user, password))
    if status != 200:
        print(f"{user} cannot log in: HTTP {status}: {body}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
