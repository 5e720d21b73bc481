"""The stand-in Hub (tests/support/hub_server.py) driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import get_session
from huggingface_hub.utils._runtime import is_xet_available

from tests.support.hub_server import running_hub

WRITE, READ = "hf_test_write", "hf_test_read"  # running_hub's default tokens, both for "alice"


@pytest.fixture
def hub(tmp_path, tmp_path_factory, monkeypatch):
    # The suite may run with HF_HUB_OFFLINE=1; this server is local, so let the client reach it.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # upload_folder opens an hf_xet session (even though nothing goes through Xet here), which
    # writes logs under HF_HOME/xet unless told otherwise when it is first opened.
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path_factory.getbasetemp() / "hf-xet"))
    with running_hub(tmp_path) as server:
        yield server


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_folder(root: Path) -> dict[str, bytes]:
    """Small text files (one a model card) and a ~5 MB binary, written under ``root``."""
    files = {
        "README.md": b"---\nlicense: apache-2.0\n---\n# A model\n",
        "config.json": b'{"hidden_size": 64}\n',
        "weights/model.safetensors": os.urandom(5 << 20),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def commit_ids(api: HfApi, repo: str) -> list[str]:
    return [c.commit_id for c in api.list_repo_commits(repo)]


def test_create_repo_private_and_exist_ok(hub):
    api = hub.api(WRITE)
    assert api.create_repo("alice/secret", private=True).repo_id == "alice/secret"
    assert api.model_info("alice/secret").private is True
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/secret", private=True)
    assert err.value.response.status_code == 409
    assert api.create_repo("alice/secret", private=True, exist_ok=True).repo_id == "alice/secret"
    with pytest.raises(RepositoryNotFoundError):  # anonymous: the private repo is invisible
        HfApi(endpoint=hub.endpoint, token=False).model_info("alice/secret")
    # Like the Hub, a new repo starts with one commit holding .gitattributes.
    assert api.list_repo_files("alice/secret") == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits("alice/secret")] == ["initial commit"]
    api.create_repo("alice/open")
    assert HfApi(endpoint=hub.endpoint, token=False).model_info("alice/open").private is False


def test_upload_folder_is_one_commit_and_downloads_back(hub, tmp_path):
    api, repo = hub.api(WRITE), "alice/model"
    api.create_repo(repo, private=True)
    before = commit_ids(api, repo)
    files = make_folder(tmp_path / "folder")

    info = api.upload_folder(folder_path=tmp_path / "folder", repo_id=repo, commit_message="Add")

    assert commit_ids(api, repo) == [info.oid, *before]
    assert api.list_repo_commits(repo)[0].title == "Add"
    assert api.list_repo_files(repo) == sorted([".gitattributes", *files])
    assert [r["status"] for r in hub.requests("/commit/", method="POST")] == [200]
    # Oids as the Hub gives them: git sha1 for text, LFS sha256 for the binary.
    listed = {f.path: f for f in api.get_paths_info(repo, list(files))}
    assert listed["config.json"].blob_id == git_sha1(files["config.json"])
    assert listed["config.json"].lfs is None
    weights = files["weights/model.safetensors"]
    assert listed["weights/model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()

    snapshot = snapshot_download(
        repo, revision=info.oid, cache_dir=tmp_path / "cache", endpoint=hub.endpoint, token=WRITE
    )
    for name, data in files.items():
        assert (Path(snapshot) / name).read_bytes() == data
    config = hf_hub_download(
        repo, "config.json", cache_dir=tmp_path / "c2", endpoint=hub.endpoint, token=WRITE
    )
    assert Path(config).read_bytes() == files["config.json"]


def test_identical_reupload_makes_no_new_revision(hub, tmp_path):
    api, repo = hub.api(WRITE), "alice/model"
    api.create_repo(repo)
    make_folder(tmp_path / "folder")
    first = api.upload_folder(folder_path=tmp_path / "folder", repo_id=repo)
    head = commit_ids(api, repo)
    hub.clear_requests()

    # preupload returns each file's remote oid; the client drops unchanged files and, with
    # nothing left, sends no commit at all and returns the current head.
    again = api.upload_folder(folder_path=tmp_path / "folder", repo_id=repo)
    config = b'{"hidden_size": 64}\n'  # as make_folder wrote it
    same = api.upload_file(path_or_fileobj=config, path_in_repo="config.json", repo_id=repo)

    assert again.oid == same.oid == first.oid
    assert commit_ids(api, repo) == head
    assert len(hub.requests("/preupload/")) == 2
    assert hub.requests("/commit/") == []


def test_bad_token_and_read_only_token(hub):
    api, repo = hub.api(WRITE), "alice/model"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_not_a_token").whoami()
    assert err.value.response.status_code == 401
    reader = hub.api(READ)
    assert reader.whoami()["auth"]["accessToken"]["role"] == "read"
    api.create_repo(repo)
    head = commit_ids(api, repo)

    with pytest.raises(HfHubHTTPError) as err:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert err.value.response.status_code == 403
    # The commit endpoint itself refuses read-only, anonymous and unknown tokens.
    body = b'{"key": "header", "value": {"summary": "sneaky"}}\n'
    for token, status in [(READ, 403), (None, 401), ("hf_not_a_token", 401)]:
        headers = {"Content-Type": "application/x-ndjson"}
        headers.update({"Authorization": f"Bearer {token}"} if token else {})
        url = f"{hub.endpoint}/api/models/{repo}/commit/main"
        response = get_session().post(url, content=body, headers=headers)
        assert response.status_code == status
        assert "error" in response.json()
    assert commit_ids(api, repo) == head
    # The request log names users, never tokens.
    log = json.dumps(hub.requests())
    assert WRITE not in log and READ not in log and "hf_not_a_token" not in log


@pytest.mark.parametrize("mode", ["drop", "500"])
def test_commit_failing_part_way_leaves_no_revision(hub, mode):
    api, repo = hub.api(WRITE), "alice/model"
    api.create_repo(repo)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo)
    payload = os.urandom(3 << 20)

    def commit():
        operations = [
            CommitOperationAdd("a.txt", b"v2"),
            CommitOperationAdd("big.bin", payload),
        ]
        return api.create_commit(repo, operations, commit_message="update")

    hub.fail_next_commits(1, mode=mode)
    with pytest.raises((httpx2.TransportError, HfHubHTTPError)) as err:
        commit()  # create_commit does not retry the commit POST
    if mode == "500":
        assert err.value.response.status_code == 500
    assert commit_ids(api, repo)[0] == first.oid
    assert api.list_repo_files(repo) == [".gitattributes", "a.txt"]
    assert api.get_paths_info(repo, ["a.txt"])[0].blob_id == git_sha1(b"v1")

    second = commit()
    assert commit_ids(api, repo)[:2] == [second.oid, first.oid]
    assert api.list_repo_files(repo) == [".gitattributes", "a.txt", "big.bin"]
    failed = 0 if mode == "drop" else 500
    assert [r["status"] for r in hub.requests("/commit/", method="POST")] == [200, failed, 200]


def test_upload_folder_retries_a_dropped_commit_or_raises(hub, tmp_path):
    api, repo = hub.api(WRITE), "alice/model"
    api.create_repo(repo)
    head = commit_ids(api, repo)
    make_folder(tmp_path / "folder")
    hub.fail_next_commits(1, mode="drop")
    if is_xet_available():
        # With hf_xet installed, upload_folder's pipeline retries the commit POST (after ~1 s).
        info = api.upload_folder(folder_path=tmp_path / "folder", repo_id=repo)
        assert commit_ids(api, repo) == [info.oid, *head]
        assert [r["status"] for r in hub.requests("/commit/", method="POST")] == [0, 200]
    else:  # without it, upload_folder goes through create_commit, which does not retry
        with pytest.raises(httpx2.TransportError):
            api.upload_folder(folder_path=tmp_path / "folder", repo_id=repo)
        assert commit_ids(api, repo) == head


def test_file_spanning_several_reads_and_restart(hub, tmp_path):
    api, repo = hub.api(WRITE), "alice/model"
    api.create_repo(repo, private=True)
    data = os.urandom(20 << 20)  # its base64 line is longer than the server's 16 MiB read block
    info = api.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id=repo)

    hub.restart()  # same port, same data folder

    assert commit_ids(api, repo)[0] == info.oid
    path = hf_hub_download(
        repo, "model.safetensors", cache_dir=tmp_path / "cache", endpoint=hub.endpoint, token=WRITE
    )
    assert hashlib.sha256(Path(path).read_bytes()).digest() == hashlib.sha256(data).digest()
