"""Before a flow starts: the servers the environment points at answer, or the command
fails in seconds naming the variable (instead of minutes of retries, then a traceback).

``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` (when they
are HTTP URLs) are checked with one short request each, then with one that needs the
credentials the environment gives (``PREFECT_API_AUTH_STRING``,
``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``): a server that refuses them is named too.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Mapping

from quantmill.errors import QuantmillError

TIMEOUT_S = 5


class ServiceUnreachableError(QuantmillError):
    """A server named by an environment variable does not answer."""


# variable -> (health path, what it is, what to do without it)
SERVICES = {
    "PREFECT_API_URL": (
        "/health",
        "Prefect API",
        "start the server (`quantmill stack up`) or unset PREFECT_API_URL to run with a "
        "temporary local one",
    ),
    "MLFLOW_TRACKING_URI": (
        "/health",
        "MLflow tracking server",
        "start it (`quantmill stack up`) or unset MLFLOW_TRACKING_URI to track in the "
        "local store (./mlruns)",
    ),
    "MLFLOW_REGISTRY_URI": (
        "/health",
        "MLflow registry server",
        "start it or unset MLFLOW_REGISTRY_URI to register in the tracking store",
    ),
}


# variable -> (a request that needs credentials, the variables that give them)
LOGINS = {
    "PREFECT_API_URL": ("/admin/version", ("PREFECT_API_AUTH_STRING",)),
    "MLFLOW_TRACKING_URI": (
        "/api/2.0/mlflow/experiments/search?max_results=1",
        ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
    ),
}
LOGINS["MLFLOW_REGISTRY_URI"] = LOGINS["MLFLOW_TRACKING_URI"]


def problem(
    url: str, path: str, timeout: float = TIMEOUT_S, login: str | None = None
) -> str | None:
    """Why ``url + path`` does not answer 2xx (a short phrase), or None when it does;
    ``login`` ("user:password") is sent as HTTP basic auth."""
    request = urllib.request.Request(url.rstrip("/") + path)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(reason).__name__


def check_services(environ: Mapping[str, str], timeout: float = TIMEOUT_S) -> None:
    """Raise ``ServiceUnreachableError`` for the first HTTP server in ``environ`` that
    does not answer, naming the variable, its value and the fix."""
    for variable, (path, what, fix) in SERVICES.items():
        url = environ.get(variable, "")
        if not url.startswith(("http://", "https://")):
            continue
        why = problem(url, path, timeout)
        if why is not None:
            raise ServiceUnreachableError(
                f"{variable}={url}: no {what} answers there ({why}); {fix}"
            )
        probe, names = LOGINS[variable]
        given = [environ.get(n, "") for n in names]
        login = ":".join(given) if all(given) else None
        why = problem(url, probe, timeout, login)
        if why in ("HTTP 401", "HTTP 403"):
            state = "refused the credentials in " if login else "wants credentials: set "
            raise ServiceUnreachableError(
                f"{variable}={url}: the {what} {state}{' and '.join(names)} ({why}); "
                '`eval "$(quantmill stack env)"` sets them for a stack of `quantmill stack up`'
            )
