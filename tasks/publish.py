"""Publish a checkpoint folder to the Hugging Face Hub and check what arrived.

The whole folder goes up in one commit, so a failed upload leaves no
half-published revision; a folder whose files the Hub already holds at the
head of ``main`` makes no commit at all. The endpoint is the client's
(``HF_ENDPOINT``, default huggingface.co); the token comes from
``tasks.secrets.hub_token`` and is checked before anything is uploaded.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from quantmill import card, compare, digest
from quantmill.errors import PublishError
from quantmill.folder import CARD_FILE, Checkpoint
from quantmill.sources import http_status, transient_status
from tasks.download import TRANSIENT_RETRIES
from tasks.secrets import DEFAULT_SECRET_BLOCK, hub_token


@task(name="write-model-card")
def write_model_card(checkpoint: str, repo_id: str | None = None) -> dict[str, Any]:
    """Write ``README.md`` (the model card) into the checkpoint folder."""
    info = card.CheckpointInfo.load(checkpoint)
    path = Path(checkpoint) / CARD_FILE
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(card.render_card(info, repo_id))
    tmp.replace(path)
    base = info.base()
    return {
        "card": str(path),
        "base_model": base.repo_id,
        "base_name": base.name,
        "license": base.license,
        "gate": info.gate().to_dict(),
    }


@task(name="verify-serving", timeout_seconds=1800)
def verify_serving(checkpoint: str, engines: list[str]) -> dict[str, Any]:
    """Load the checkpoint in each serving engine (vLLM, out of process) and record what
    it did in ``quantmill_serving.json``: the card and the quality gate read it."""
    from quantmill.serving.verify import verify_vllm

    found = {}
    if "vllm" in engines:
        (found["vllm"],) = verify_vllm([checkpoint])
    Checkpoint(Path(checkpoint)).write_serving(found)
    return found


@task(name="check-hub-access")
def check_hub_access(repo_id: str, token_secret: str | None = DEFAULT_SECRET_BLOCK) -> str:
    """The token's user name, once the token is known to be able to write ``repo_id``."""
    from huggingface_hub import HfApi

    return _check_access(HfApi(endpoint=hub_endpoint(), token=hub_token(token_secret)), repo_id)


@task(name="publish-hub", timeout_seconds=3600, **TRANSIENT_RETRIES)
def publish_to_hub(
    checkpoint: str,
    repo_id: str,
    private: bool = True,
    token_secret: str | None = DEFAULT_SECRET_BLOCK,
) -> dict[str, Any]:
    """Create ``repo_id`` if needed and commit the folder; returns the URL and commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    start = time.perf_counter()
    api = HfApi(endpoint=hub_endpoint(), token=hub_token(token_secret))
    _check_access(api, repo_id)
    folder = Path(checkpoint)
    local = digest.folder_digests(folder)
    with hub_errors(f"creating the Hub repo {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True)
    with hub_errors(f"reading the Hub repo {repo_id}"):
        head, remote = _remote_files(api, repo_id)
    result = {"repo_id": repo_id, "url": f"{api.endpoint.rstrip('/')}/{repo_id}"}
    if head and _same_files(local, remote):
        return {
            **result,
            "commit": head,
            "new_revision": False,
            "files": len(local),
            "seconds": time.perf_counter() - start,
        }
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local
    ]
    operations += [
        CommitOperationDelete(path_in_repo=name)
        for name in remote
        if name not in local and name != ".gitattributes"
    ]
    with hub_errors(f"uploading {folder} to {repo_id}"):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=f"quantmill: upload {folder.name}",
            parent_commit=head,
        )
    return {
        **result,
        "commit": info.oid,
        "new_revision": True,
        "files": len(local),
        "seconds": time.perf_counter() - start,
    }


@task(name="verify-hub")
def verify_hub_upload(
    checkpoint: str, repo_id: str, commit: str, token_secret: str | None = DEFAULT_SECRET_BLOCK
) -> dict[str, Any]:
    """Download the revision into an empty cache, load it and compare with the local folder."""
    from huggingface_hub import snapshot_download

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantmill-verify-") as cache:
        with hub_errors(f"downloading {repo_id}@{commit[:10]} to verify it"):
            path = snapshot_download(
                repo_id,
                revision=commit,
                cache_dir=cache,
                token=hub_token(token_secret),
                endpoint=hub_endpoint(),
            )
        result = compare.compare_checkpoints(checkpoint, path)
    if not result["match"]:
        raise PublishError(
            f"{repo_id}@{commit[:10]} does not reproduce the local checkpoint {checkpoint}: "
            f"largest logit difference {result['max_abs_logit_diff']:.3g}, generated "
            f"{result['generated']!r} against {result['local_generated']!r} locally. The Hub "
            "revision is kept for inspection; publish again once the cause is found."
        )
    return {**result, "seconds": time.perf_counter() - start}


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (the client reads it only once, when imported)."""
    return os.environ.get("HF_ENDPOINT") or None


def _check_access(api: Any, repo_id: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    where = api.endpoint
    try:
        who = api.whoami()
    except HfHubHTTPError as exc:
        status = http_status(exc)
        if status in (401, 403):
            raise PublishError(
                f"the Hugging Face token was rejected by {where} ({status}): it is wrong, "
                "expired or revoked. Create a token with write access (Hub → Settings → "
                "Access Tokens) and put it in HF_TOKEN or the Prefect Secret block. "
                "Nothing was uploaded."
            ) from None
        raise _as_publish_error(exc, f"checking the token with {where}") from None
    except Exception as exc:  # network: worth a retry
        raise _as_publish_error(exc, f"checking the token with {where}") from None
    name = str(who.get("name"))
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(
            f"the Hugging Face token of {name!r} is read-only; publishing needs a token with "
            "write access (Hub → Settings → Access Tokens). Nothing was uploaded."
        )
    owner = repo_id.split("/")[0]
    owners = {name} | {str(org.get("name")) for org in who.get("orgs") or []}
    if owner not in owners:
        raise PublishError(
            f"hub_repo {repo_id!r}: the token belongs to {name!r}, who cannot write under "
            f"{owner!r} (allowed: {', '.join(sorted(owners))}). Use '{name}/<name>' or a token "
            f"of a member of {owner!r}. Nothing was uploaded."
        )
    return name


def _remote_files(api: Any, repo_id: str) -> tuple[str | None, dict[str, tuple[Any, Any]]]:
    """The head commit of ``main`` and ``{path: (blob id, lfs sha256)}`` at that commit."""
    head = api.repo_info(repo_id).sha
    if not head:
        return None, {}
    files = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=head):
        if hasattr(entry, "blob_id"):
            lfs = getattr(entry, "lfs", None)
            files[entry.path] = (entry.blob_id, getattr(lfs, "sha256", None) if lfs else None)
    return head, files


def _same_files(local: dict[str, digest.FileDigest], remote: dict[str, tuple[Any, Any]]) -> bool:
    extra = set(remote) - set(local) - {".gitattributes"}
    if extra:
        return False
    return all(name in remote and d.matches(*remote[name]) for name, d in local.items())


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn the client's errors into ``PublishError`` (transient for network and 5xx)."""
    try:
        yield
    except PublishError:
        raise
    except Exception as exc:
        raise _as_publish_error(exc, what) from exc


def _as_publish_error(exc: Exception, what: str) -> PublishError:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        transient = transient_status(http_status(exc))
    else:
        transient = isinstance(exc, (OSError, TimeoutError)) or "httpx" in type(exc).__module__
    hint = "it will be retried" if transient else "check hub_repo and the token's rights"
    endpoint = hub_endpoint() or "https://huggingface.co"
    return PublishError(f"{what} at {endpoint} failed: {exc} ({hint})", transient=transient)


@task(name="hub-artifact")
def hub_artifact(hub: dict[str, Any]) -> None:
    """A Prefect markdown artifact: where the checkpoint went on the Hub."""
    from prefect.artifacts import create_markdown_artifact

    verified = hub.get("verified")
    check = (
        f"verified: downloaded, loaded, logits within {verified['max_abs_logit_diff']:.2g}"
        if verified
        else "not verified"
    )
    create_markdown_artifact(
        key="hub-" + re.sub(r"[^a-z0-9-]+", "-", hub["repo_id"].lower()),
        markdown=(
            f"## Published to the Hub\n\n[{hub['repo_id']}]({hub['url']}) at commit "
            f"`{hub['commit']}` ({'new revision' if hub['new_revision'] else 'unchanged'}; "
            f"{check})\n"
        ),
        description=f"Hub: {hub['repo_id']}",
    )
