"""Prefect tasks: thin adapters over the ``quantmill`` library.

Each takes paths, small dicts and the specs the flow parsed once (a recipe, a
calibration or evaluation spec), calls the library and returns something small
(a path, a URI, a dict of figures), never a model or a tensor, so results can
be persisted, cached and shown in the Prefect UI. Recording goes through
``tracking`` (``tasks/record.py``).
"""

import os

# quantmill's progress lines go to the Prefect run logs (read when prefect is imported).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "quantmill")
# ...and the library used outside a flow run keeps logging quietly to the terminal.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# With no API URL, Prefect starts a temporary server and gives it 20 s; on a busy
# two-core machine its start took longer, and the run failed before any work.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
