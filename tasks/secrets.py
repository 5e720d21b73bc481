"""The Hugging Face token: from ``HF_TOKEN``, else the file named by ``HF_TOKEN_FILE``
(a Docker/Compose secret, e.g. ``/run/secrets/hf_token``), else a Prefect Secret block.

The token is read where it is used and handed to nothing that records values:
it is never a flow or task parameter, a return value, a log line or an MLflow
param, tag or artifact (``tests/pipeline/test_publish.py`` searches them all).
"""

from __future__ import annotations

import os
from pathlib import Path

from quantmill import defaults
from quantmill.errors import PublishError

TOKEN_ENV = "HF_TOKEN"
TOKEN_FILE_ENV = "HF_TOKEN_FILE"
DEFAULT_SECRET_BLOCK = defaults.TOKEN_SECRET


def hub_token(secret_block: str | None = DEFAULT_SECRET_BLOCK) -> str:
    """The token, or a ``PublishError`` that says both ways to provide one."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise PublishError(
                f"{TOKEN_FILE_ENV}={path}: cannot read the token file ({exc.strerror}); "
                "create it with the token alone in it, or unset the variable"
            ) from None
        if token:
            return token
    if secret_block:
        value = _secret_block_value(secret_block)
        if value:
            return value
    block = secret_block or DEFAULT_SECRET_BLOCK
    raise PublishError(
        f"no Hugging Face token: {TOKEN_ENV} is not set and no Prefect Secret block named "
        f"{block!r} was found. Set {TOKEN_ENV} to a token with write access, or store one "
        f'with `python -c "from prefect.blocks.system import Secret; '
        f"Secret(value='hf_...').save('{block}')\"` (or in the Prefect UI: Blocks → Secret)."
    )


def _secret_block_value(name: str) -> str | None:
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(name)
    except ValueError:  # no such block
        return None
    value = secret.get()
    return str(value).strip() if value else None
