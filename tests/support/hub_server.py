"""A stand-in for the Hugging Face Hub's HTTP API, for tests (the real Hub cannot be reached here).

Tests run the real ``huggingface_hub`` client (written against 2.4.0) against it, with
``HfApi(endpoint=hub.endpoint)`` or ``HF_ENDPOINT=http://127.0.0.1:PORT`` set before the client
is imported (it reads HF_ENDPOINT once). Stdlib only (PyYAML if present). Run it as::

    python -m tests.support.hub_server --port 0 --data DIR --token TOKEN:USER[:ORG,ORG] \
        [--token ...] [--read-token TOKEN:USER]

It prints ``hub_server ready http://127.0.0.1:PORT`` when listening (``--port 0``: a free port);
``GET /api/health`` answers too. In tests, ``with running_hub(tmp_path) as hub:`` runs it and
yields a ``RunningHub`` (``.endpoint``, ``.api(token)``, ``.restart()``, admin helpers).

Covered: ``GET /api/whoami-v2`` (name, orgs, role "write" or "read"); ``POST /api/repos/create``
(private; 409 if it exists, so ``exist_ok`` works; a new repo gets an initial commit holding
.gitattributes, as on the Hub); ``POST /api/validate-yaml`` (README.md front matter must be a
YAML mapping); under ``/api/{type}s/{ns}/{name}``: ``preupload/{rev}``, ``commit/{branch}``
(ndjson), ``tree/{rev}[/{path}]``, ``paths-info/{rev}``, ``commits/{rev}`` and the repo itself or
``revision/{rev}`` (model_info/repo_info; sizes and oids with ``blobs=true``); and ``HEAD``/``GET
/[{type}s/]{ns}/{name}/resolve/{rev}/{path}`` (X-Repo-Commit, ETag, byte ranges, X-Linked-Etag
and -Size for LFS-like files, never Xet headers): hf_hub_download and snapshot_download work.

Uploads: preupload answers ``uploadMode: "regular"`` for every file, so the client sends contents
base64-encoded inside the commit and never uses LFS or Xet, whatever its settings. Its ``oid`` is
the git blob sha1 of the file already at that path: the client drops unchanged files itself and,
if nothing is left, sends no commit (it reads ``revision/main`` and returns that head). A commit
that does arrive is recorded even if it changes nothing, as on the Hub. ``lfsFile`` lines are
accepted only for content the server already holds (copies). Files the Hub would keep in LFS
(>= 10 MiB, a NUL in the first KiB, or a suffix such as .safetensors) are listed as the Hub lists
them: the git oid of their LFS pointer file, and ``lfs: {oid: sha256, size, pointerSize}``.

Not covered: the LFS batch and Xet protocols, pull requests, branches or tags other than ``main``,
deleting repos, gated repos, pagination (one page), chunked request bodies, .gitattributes rules,
the Hub's other metadata checks, and every other endpoint (404, logged).

Auth (``Authorization: Bearer TOKEN``): an unknown token gets 401 everywhere; no token gets 401 on
writes and on private repos (X-Error-Code RepoNotFound); a read token gets 403 on preupload,
commit and repo creation. Errors are JSON ``{"error": ...}`` with X-Error-Code/-Message headers.

Storage under ``--data``: ``repos/<type>s/<ns>/<name>/repo.json`` (refs) and ``commits/<id>.json``
(each commit a full snapshot: file table, parent, 40-hex sha1 id), contents in ``blobs/<sha256>``.
A commit's whole payload is read and stored before its snapshot is written and ``repo.json`` is
swapped by ``os.replace``: a commit failing part-way leaves no new revision (only stray blobs).
State survives a restart.

Admin (no auth; loopback test use): ``POST /_admin/faults {"fail_next_commits": N, "mode": M}``:
the next N commit POSTs fail part-way; mode "drop" reads half the body, then closes the connection
without a response; "500" reads and stores the whole payload, then answers 500 instead of
publishing. ``GET /_admin/requests``: the request log ``[{method, path, status, user}]`` (path
without query, status 0 = dropped, no header values; /_admin and /api/health are not logged);
``DELETE /_admin/requests`` clears it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, unquote, urlsplit

READY = "hub_server ready"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".npy")
LFS_SUFFIXES += (".msgpack", ".npz", ".pkl", ".zip", ".gz", ".tar", ".parquet", ".arrow")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
FILE_LINE = b'{"key": "file", "value": {"content": "'  # how the client starts each file line
BLOCK = 16 << 20  # bytes read at a time; also a multiple of 4 for piecewise base64 decoding
API_REPO = re.compile(r"/api/(model|dataset|space)s/([^/]+)/([^/]+)(?:/(.*))?")
RESOLVE = re.compile(r"/(?:(dataset|space)s/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str = "", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_json(path: str, e: dict) -> dict:
    out = {"type": "file", "oid": e["sha1"], "size": e["size"], "path": path}
    if e["lfs"]:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{e['sha256']}\n"
        pointer = f"{pointer}size {e['size']}\n".encode()
        out["oid"] = git_sha1(pointer)
        out["lfs"] = {"oid": e["sha256"], "size": e["size"], "pointerSize": len(pointer)}
    return out


def folder_json(path: str, files: dict) -> dict:
    inside = [f"{p} {e['sha1']}" for p, e in sorted(files.items()) if p.startswith(path + "/")]
    inside = "\n".join(inside)
    return {"type": "directory", "oid": hashlib.sha1(inside.encode()).hexdigest(), "path": path}


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Store:
    """Repos, immutable commit snapshots and content-addressed blobs under one folder."""

    def __init__(self, root: Path):
        self.root, self.blobs, self.tmp = root, root / "blobs", root / "tmp"
        for folder in (self.blobs, self.tmp, root / "repos"):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # serialises repo creation and branch updates

    def _dir(self, rtype: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{rtype}s" / repo_id

    def repo(self, rtype: str, repo_id: str) -> dict | None:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(NAME.fullmatch(p) and ".." not in p for p in parts):
            return None
        path = self._dir(rtype, repo_id) / "repo.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def commit(self, repo: dict, rev: str) -> dict:
        cid = repo["refs"].get(rev, rev)
        path = self._dir(repo["type"], repo["id"]) / "commits" / f"{cid}.json"
        if re.fullmatch(r"[0-9a-f]{40}", cid) and path.is_file():
            return json.loads(path.read_text())
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def put_blob(self, chunks, size: int, path: str) -> dict:
        """Store a file from an iterable of byte chunks of ``size`` bytes in all."""
        sha1, sha256, n, binary = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256(), 0, False
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    binary = binary or (n < 1024 and b"\0" in chunk[: 1024 - n])
                    sha1.update(chunk)
                    sha256.update(chunk)
                    n += f.write(chunk)
            if n != size:
                raise HubError(400, f"{path}: got {n} bytes, expected {size}")
            os.replace(tmp, self.blobs / sha256.hexdigest())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        lfs = size >= 10 << 20 or binary or path.lower().endswith(LFS_SUFFIXES)
        return {"sha256": sha256.hexdigest(), "sha1": sha1.hexdigest(), "size": size, "lfs": lfs}

    def known_blob(self, sha256: str, path: str) -> dict:
        blob = self.blobs / sha256
        if not (re.fullmatch(r"[0-9a-f]{64}", sha256) and blob.is_file()):
            raise HubError(422, f"{path}: LFS uploads are not supported by this stand-in Hub")
        with open(blob, "rb") as f:
            entry = self.put_blob(iter(lambda: f.read(BLOCK), b""), blob.stat().st_size, path)
        return {**entry, "lfs": True}

    def create(self, rtype: str, repo_id: str, private: bool, author: str) -> bool:
        with self.lock:
            if self.repo(rtype, repo_id) is not None:
                return False
            (self._dir(rtype, repo_id) / "commits").mkdir(parents=True, exist_ok=True)
            repo = {"type": rtype, "id": repo_id, "private": private, "createdAt": now()}
            attributes = GITATTRIBUTES.encode()
            files = {
                ".gitattributes": self.put_blob([attributes], len(attributes), ".gitattributes")
            }
            repo["refs"] = {"main": self._snapshot(repo, None, files, "initial commit", "", author)}
            write_json(self._dir(rtype, repo_id) / "repo.json", repo)
            return True

    def apply(self, repo: dict, branch: str, ops: list, header: dict, author: str) -> str:
        """Apply staged operations on top of the branch head atomically; return the new id."""
        with self.lock:
            repo = self.repo(repo["type"], repo["id"])
            head = self.commit(repo, branch)
            if header.get("parentCommit") and not head["id"].startswith(header["parentCommit"]):
                raise HubError(412, f"parentCommit is not the head of {branch}")
            files = dict(head["files"])
            for kind, path, entry in ops:
                if kind == "add":
                    files[path] = entry
                    continue
                prefix = path.rstrip("/") + "/"
                gone = (
                    [path] if kind == "deletedFile" else [p for p in files if p.startswith(prefix)]
                )
                if not gone or not all(p in files for p in gone):
                    raise HubError(404, f"No such file or folder: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            title, message = header["summary"], header.get("description", "")
            repo["refs"][branch] = self._snapshot(repo, head["id"], files, title, message, author)
            write_json(self._dir(repo["type"], repo["id"]) / "repo.json", repo)
            return repo["refs"][branch]

    def _snapshot(self, repo, parent, files, title, message, author) -> str:
        commit = {"parent": parent, "title": title, "message": message, "author": author}
        commit.update(date=now(), files=files)
        commit["id"] = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        write_json(self._dir(repo["type"], repo["id"]) / "commits" / f"{commit['id']}.json", commit)
        return commit["id"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1].lower() for k, v in parse_qs(url.query).items()}
        self.user, self.remaining = None, int(self.headers.get("Content-Length") or 0)
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise HubError(411, "chunked request bodies are not supported")
            if url.path.startswith("/_admin/"):
                return self._admin(url.path)
            if url.path == "/api/health":
                return self._send(200, {"status": "ok"})
            if auth := self.headers.get("Authorization"):
                self.user = self.server.tokens.get(auth.removeprefix("Bearer ").strip())
                if self.user is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
            self._route(url.path)
        except HubError as e:
            message = e.message.encode("ascii", "replace").decode()
            headers = {"X-Error-Code": e.code, "X-Error-Message": message, **e.headers}
            self._send(e.status, {"error": e.message}, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            self._record(0)
        except Exception as e:
            traceback.print_exc()
            self._send(500, {"error": f"internal error: {e!r}"})

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read(self, n: int = -1) -> bytes:
        n = self.remaining if n < 0 else min(n, self.remaining)
        data = self.rfile.read(n)
        self.remaining -= len(data)
        if len(data) < n:
            raise ConnectionError("client closed the connection mid-body")
        return data

    def _lines(self) -> Iterator[bytearray]:
        """The body's lines, read in large blocks (readline is slow on 400 MB lines)."""
        buf, scanned = bytearray(), 0
        while buf or self.remaining:
            end = buf.find(b"\n", scanned) + 1
            if not end and self.remaining:
                scanned = len(buf)
                buf += self._read(BLOCK)
                continue
            rest = buf[end:] if end else bytearray()
            del buf[len(buf) - len(rest) :]  # truncate in place: no copy of a long line
            line, buf, scanned = buf, rest, 0
            yield line

    def _json_body(self) -> dict:
        try:
            return json.loads(self._read() or b"{}")
        except ValueError as e:
            raise HubError(400, f"malformed JSON body: {e}") from None

    def _send(self, status: int, obj, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        while self.remaining:  # drain the request body so the connection stays usable
            self._read(BLOCK)
        self.send_response(status)
        for key, value in {**(headers or {}), "Content-Type": "application/json"}.items():
            if value:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:
        self._record(int(code))

    def _record(self, status: int) -> None:
        path, user = urlsplit(self.path).path, getattr(self, "user", None)
        if not path.startswith(("/_admin/", "/api/health")):
            entry = {"method": self.command, "path": path, "status": status}
            with self.server.state_lock:
                self.server.requests.append({**entry, "user": user and user["name"]})
        self.log_message('"%s %s" %s', self.command, path, status)

    def _url(self, repo: dict) -> str:
        prefix = "" if repo["type"] == "model" else f"{repo['type']}s/"
        return f"http://{self.headers.get('Host')}/{prefix}{repo['id']}"

    def _admin(self, path: str) -> None:
        srv, method = self.server, self.command
        if (method, path) == ("POST", "/_admin/faults"):
            body = self._json_body()
            faults = {"fail_next_commits": int(body.get("fail_next_commits", 0))}
            if (faults.setdefault("mode", body.get("mode", "drop"))) not in ("drop", "500"):
                raise HubError(400, "mode must be 'drop' or '500'")
            srv.faults = faults
        elif path == "/_admin/requests" and method in ("GET", "DELETE"):
            with srv.state_lock:
                log = list(srv.requests)
                if method == "DELETE":
                    srv.requests.clear()
            return self._send(200, log)
        elif (method, path) != ("GET", "/_admin/faults"):
            raise HubError(404, f"unknown admin endpoint {method} {path}")
        self._send(200, srv.faults)

    def _route(self, path: str) -> None:
        method = self.command
        if (method, path) == ("GET", "/api/whoami-v2"):
            return self._whoami()
        if (method, path) == ("POST", "/api/repos/create"):
            return self._create_repo()
        if (method, path) == ("POST", "/api/validate-yaml"):
            return self._validate_yaml()
        if m := API_REPO.fullmatch(path):
            rest = [unquote(s) for s in m[4].split("/")] if m[4] else []
            action, rev = (rest + [""])[0], (rest + ["", "main"])[1]
            route = {
                ("GET", ""): self._info,
                ("GET", "revision"): self._info,
                ("GET", "tree"): self._tree,
                ("POST", "paths-info"): self._paths_info,
                ("GET", "commits"): self._commits,
                ("POST", "preupload"): self._preupload,
                ("POST", "commit"): self._commit,
            }.get((method, action))
            if route is not None:
                repo = self._access(m[1], f"{unquote(m[2])}/{unquote(m[3])}", action)
                return route(repo, rev, "/".join(rest[2:]))
        elif (m := RESOLVE.fullmatch(path)) and method in ("GET", "HEAD"):
            repo = self._access(m[1] or "model", f"{unquote(m[2])}/{unquote(m[3])}", "resolve")
            return self._resolve(repo, unquote(m[4]), unquote(m[5]))
        raise HubError(404, f"{method} {path} is not implemented by this stand-in Hub")

    def _access(self, rtype: str, repo_id: str, action: str) -> dict:
        repo, user = self.server.store.repo(rtype, repo_id), self.user
        member = user is not None and repo_id.split("/")[0] in (user["name"], *user["orgs"])
        if repo is None or (repo["private"] and not member):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if action in ("preupload", "commit") and user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if action in ("preupload", "commit") and (not member or user["role"] != "write"):
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def _whoami(self) -> None:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        name, role, orgs = self.user["name"], self.user["role"], self.user["orgs"]
        token = {"type": "access_token", "accessToken": {"displayName": name, "role": role}}
        info = {"type": "user", "id": hashlib.sha1(name.encode()).hexdigest()[:24], "name": name}
        info.update(fullname=name, email=f"{name}@example.invalid", emailVerified=True, auth=token)
        self._send(200, {**info, "orgs": [{"type": "org", "name": org} for org in orgs]})

    def _create_repo(self) -> None:
        body, user = self._json_body(), self.user
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        rtype, namespace = body.get("type") or "model", body.get("organization") or user["name"]
        repo = {"type": rtype, "id": f"{namespace}/{body.get('name')}"}
        if rtype not in ("model", "dataset", "space") or not NAME.fullmatch(str(body.get("name"))):
            raise HubError(400, f"Invalid repo type or name: {rtype} {repo['id']}")
        if namespace not in (user["name"], *user["orgs"]) or user["role"] != "write":
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        private = body.get("visibility") == "private" or body.get("private") is True
        if not self.server.store.create(rtype, repo["id"], private, user["name"]):
            error = f"You already created this {rtype} repo"
            return self._send(409, {"error": error, "url": self._url(repo)})
        self._send(200, {"url": self._url(repo), "name": repo["id"], "id": repo["id"]})

    def _validate_yaml(self) -> None:
        """README.md metadata: only that its front matter is a YAML mapping (if PyYAML is there)."""
        content, problem = self._json_body().get("content", ""), None
        front, closed, _ = content[3:].partition("\n---")
        if content.startswith("---"):
            try:
                import yaml

                if not closed or not isinstance(yaml.safe_load(front) or {}, dict):
                    problem = "the metadata block is not a closed YAML mapping"
            except ImportError:
                pass
            except Exception as e:
                problem = f"invalid YAML metadata: {e}"
        if problem:
            return self._send(400, {"error": problem, "errors": [{"message": problem}]})
        self._send(200, {"errors": [], "warnings": []})

    def _info(self, repo: dict, rev: str, _sub: str) -> None:
        commit, siblings = self.server.store.commit(repo, rev), []
        for path, entry in sorted(commit["files"].items()):
            f = file_json(path, entry)
            sibling = {"rfilename": path, "size": f["size"], "blobId": f["oid"]}
            if "lfs" in f:
                sibling["lfs"] = {"sha256": f["lfs"]["oid"], "size": f["size"]}
                sibling["lfs"]["pointerSize"] = f["lfs"]["pointerSize"]
            siblings.append(sibling if self.query.get("blobs") == "true" else {"rfilename": path})
        info = {"id": repo["id"], "author": repo["id"].split("/")[0], "sha": commit["id"]}
        info.update(lastModified=commit["date"], createdAt=repo["createdAt"])
        info.update(private=repo["private"], disabled=False, gated=False, downloads=0, likes=0)
        self._send(200, {**info, "tags": [], "siblings": siblings})

    def _tree(self, repo: dict, rev: str, sub: str) -> None:
        files = self.server.store.commit(repo, rev)["files"]
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        under = sorted(p for p in files if p.startswith(prefix))
        if prefix and not under:
            raise HubError(404, f"{sub} does not exist at {rev}", "EntryNotFound")
        recursive, out, seen = self.query.get("recursive") == "true", [], set()
        for path in under:
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                if (folder := prefix + "/".join(parts[:depth])) not in seen:
                    seen.add(folder)
                    out.append(folder_json(folder, files))
            if recursive or len(parts) == 1:
                out.append(file_json(path, files[path]))
        self._send(200, out)

    def _paths_info(self, repo: dict, rev: str, _sub: str) -> None:
        files, body = self.server.store.commit(repo, rev)["files"], self._read().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or "{}").get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        out = [file_json(p, files[p]) for p in paths if p in files]
        folders = [p.rstrip("/") for p in paths if p not in files]
        out += [folder_json(p, files) for p in folders if any(f.startswith(p + "/") for f in files)]
        self._send(200, out)

    def _commits(self, repo: dict, rev: str, _sub: str) -> None:
        commit, out = self.server.store.commit(repo, rev), []
        while commit is not None:
            item = {"id": commit["id"], "title": commit["title"], "message": commit["message"]}
            out.append({**item, "date": commit["date"], "authors": [{"user": commit["author"]}]})
            parent = commit["parent"]
            commit = self.server.store.commit(repo, parent) if parent else None
        self._send(200, out)

    def _preupload(self, repo: dict, rev: str, _sub: str) -> None:
        commit, answer = self.server.store.commit(repo, rev), []
        for path in (f["path"] for f in self._json_body().get("files", [])):
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False})
            if path in commit["files"]:  # the git sha1, which the client computes for "regular"
                answer[-1]["oid"] = commit["files"][path]["sha1"]
        self._send(200, {"files": answer, "commitOid": commit["id"]})

    def _commit(self, repo: dict, branch: str, _sub: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this stand-in Hub")
        if branch not in repo["refs"]:
            raise HubError(404, f"Can only commit to branch main, not {branch}", "RevisionNotFound")
        with self.server.state_lock:
            faults, mode = self.server.faults, None
            if faults["fail_next_commits"] > 0:
                faults["fail_next_commits"] -= 1
                mode = faults["mode"]
        if mode == "drop":
            self._read(self.remaining // 2)
            self.close_connection = True
            self._record(0)
            return self.connection.shutdown(socket.SHUT_RDWR)
        header, ops = None, []
        for line in self._lines():
            try:
                content = None
                if line.startswith(FILE_LINE):  # parse all but the (huge) base64 content
                    end = line.index(b'"', len(FILE_LINE))
                    content = memoryview(line)[len(FILE_LINE) : end]
                    line = line[: len(FILE_LINE)] + line[end:]
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                    continue
                path = value["path"].rstrip("/") if key == "deletedFolder" else value["path"]
                if path.startswith("/") or any(s in ("", ".", "..") for s in path.split("/")):
                    raise HubError(400, f"Invalid path: {path}")
                if key == "file":
                    ops.append(("add", path, self._ingest(value, content)))
                elif key == "lfsFile":
                    ops.append(("add", path, self.server.store.known_blob(value["oid"], path)))
                elif key in ("deletedFile", "deletedFolder"):
                    ops.append((key, path, None))
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
                raise HubError(400, f"Malformed commit payload: {e!r}") from None
        if not header or not header.get("summary"):
            raise HubError(400, "The commit header (with a summary) is missing")
        if mode == "500":
            raise HubError(500, "Injected fault: the commit failed after its payload was received")
        cid = self.server.store.apply(repo, branch, ops, header, self.user["name"])
        url = f"{self._url(repo)}/commit/{cid}"
        self._send(200, {"success": True, "commitOid": cid, "commitUrl": url, "hookOutput": ""})

    def _ingest(self, value: dict, content: memoryview | None) -> dict:
        if content is None:
            content = memoryview(value["content"].encode("ascii"))
        if value.get("encoding", "base64") != "base64" or len(content) % 4:
            raise HubError(400, f"{value['path']}: content must be base64")
        size = len(content) // 4 * 3 - bytes(content[-2:]).count(b"=")
        chunks = (
            base64.b64decode(content[i : i + BLOCK], validate=True)
            for i in range(0, len(content), BLOCK)
        )
        return self.server.store.put_blob(chunks, size, value["path"])

    def _resolve(self, repo: dict, rev: str, path: str) -> None:
        commit = self.server.store.commit(repo, rev)
        if (entry := commit["files"].get(path)) is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit["id"]})
        size, start, end, status = entry["size"], 0, entry["size"] - 1, 200
        if m := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip()):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            elif m[2]:
                start = max(size - int(m[2]), 0)
            if start > end:
                raise HubError(
                    416, "Range Not Satisfiable", "", {"Content-Range": f"bytes */{size}"}
                )
            status = 206
        etag = entry["sha256"] if entry["lfs"] else entry["sha1"]
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers.update({"Content-Type": "application/octet-stream"})
        self._read()
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(end - start + 1)}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET" and end >= start:
            with open(self.server.store.blobs / entry["sha256"], "rb") as f:
                self.connection.sendfile(f, start, end - start + 1)


class HubServer(ThreadingHTTPServer):
    daemon_threads, request_queue_size = True, 64

    def __init__(self, address: tuple[str, int], store: Store, tokens: dict):
        super().__init__(address, Handler)
        self.store, self.tokens, self.state_lock = store, tokens, threading.Lock()
        self.faults, self.requests = {"fail_next_commits": 0, "mode": "drop"}, []


def parse_token(spec: str, role: str) -> tuple[str, dict]:
    """``TOKEN:USER[:ORG,ORG]`` → (token, user record)."""
    token, _, rest = spec.partition(":")
    name, _, orgs = rest.partition(":")
    if not token or not NAME.fullmatch(name):
        raise SystemExit(f"expected TOKEN:USER[:ORG,...], got {spec!r}")
    return token, {"name": name, "role": role, "orgs": [o for o in orgs.split(",") if o]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stand-in Hugging Face Hub API for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--data", required=True, type=Path, help="folder holding the repos")
    parser.add_argument("--token", action="append", default=[], help="TOKEN:USER[:ORG,...]")
    parser.add_argument("--read-token", action="append", default=[], help="read-only token")
    args = parser.parse_args(argv)
    tokens = dict(parse_token(spec, "write") for spec in args.token)
    tokens.update(parse_token(spec, "read") for spec in args.read_token)
    server = HubServer((args.host, args.port), Store(args.data), tokens)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{READY} http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


DEFAULT_TOKENS = MappingProxyType({"hf_test_write": "alice"})
DEFAULT_READ_TOKENS = MappingProxyType({"hf_test_read": "alice"})


class RunningHub:
    """A hub_server subprocess; ``endpoint`` is its URL. Made by ``running_hub``."""

    def __init__(self, data_dir: Path, tokens: Mapping, read_tokens: Mapping, log_path: Path):
        self.data_dir, self.tokens, self.read_tokens = data_dir, dict(tokens), dict(read_tokens)
        self.log_path, self.port, self.endpoint, self.process = log_path, 0, "", None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy

    def start(self, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "tests.support.hub_server", "--port", str(self.port)]
        cmd += ["--data", str(self.data_dir)]
        cmd += [a for t, u in self.tokens.items() for a in ("--token", f"{t}:{u}")]
        cmd += [a for t, u in self.read_tokens.items() for a in ("--read-token", f"{t}:{u}")]
        with open(self.log_path, "ab") as log:
            root = Path(__file__).resolve().parents[2]
            self.process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=log)
        ready = select.select([self.process.stdout], [], [], timeout)[0]
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith(READY):
            self.stop()
            raise RuntimeError(f"hub_server did not start; see {self.log_path}")
        self.endpoint = line.split()[-1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.process is not None:
            self.process.stdout.close()

    def restart(self) -> None:
        """Stop, then start again on the same port and data folder."""
        self.stop()
        self.start()

    def admin(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        with self._opener.open(request, timeout=30) as response:
            return json.loads(response.read())

    def fail_next_commits(self, count: int = 1, mode: str = "drop") -> dict:
        """Make the next ``count`` commit POSTs fail part-way (mode "drop" or "500")."""
        return self.admin("POST", "/_admin/faults", {"fail_next_commits": count, "mode": mode})

    def requests(self, path_contains: str = "", method: str | None = None) -> list[dict]:
        """The request log, oldest first: ``[{method, path, status, user}]``."""
        log = self.admin("GET", "/_admin/requests")
        return [r for r in log if path_contains in r["path"] and method in (None, r["method"])]

    def clear_requests(self) -> None:
        self.admin("DELETE", "/_admin/requests")

    def api(self, token: str | None = None):
        """A real ``huggingface_hub.HfApi`` on this server (default: the first write token)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token or next(iter(self.tokens)))


@contextlib.contextmanager
def running_hub(
    tmp_path: Path,
    tokens: Mapping[str, str] = DEFAULT_TOKENS,
    read_tokens: Mapping[str, str] = DEFAULT_READ_TOKENS,
    *,
    data_dir: Path | None = None,
) -> Iterator[RunningHub]:
    """Run a stand-in Hub on a free loopback port for the duration of the block.

    ``tokens``/``read_tokens`` map a token to ``USER`` or ``USER:ORG,ORG``. Repos are kept in
    ``data_dir`` (default ``tmp_path/"hub-data"``); the server logs to
    ``tmp_path/"hub_server.log"``.
    """
    data_dir = Path(data_dir or Path(tmp_path) / "hub-data")
    hub = RunningHub(data_dir, tokens, read_tokens, Path(tmp_path) / "hub_server.log")
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


if __name__ == "__main__":
    main()
