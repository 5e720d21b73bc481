"""The Hugging Face token: from ``HF_TOKEN``, else from a Prefect Secret block.

The token is read where it is used and handed to nothing that records values:
it is never a flow or task parameter, a return value, a log line or an MLflow
param, tag or artifact (``tests/pipeline/test_publish.py`` searches them all).
"""

from __future__ import annotations

import os

from quantmill.errors import PublishError

TOKEN_ENV = "HF_TOKEN"
DEFAULT_SECRET_BLOCK = "hf-token"


def hub_token(secret_block: str | None = DEFAULT_SECRET_BLOCK) -> str:
    """The token, or a ``PublishError`` that says both ways to provide one."""
    token = os.environ.get(TOKEN_ENV, "").strip()
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
