"""Prefect flows: they compose tasks and decide what runs in parallel; no math here.

- ``quantize``: download → calibrate → quantize → evaluate → record
- ``sweep``: one model, several recipes, shared calibration, a comparison
- ``evaluate``: an existing checkpoint
"""

import os

# quantmill's per-block and per-window progress lines go to the Prefect run logs.
# (Read when prefect is first imported, so it is set before any flow or task module.)
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "quantmill")
# ...and the library used outside a flow run keeps logging quietly to the terminal.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# With no API URL, Prefect starts a temporary server and gives it 20 s; on a busy
# two-core machine its start took longer, and the run failed before any work.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
