"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests that push and load back for real.

It speaks the part of the Hub API that ``huggingface_hub`` uses to create a repo, a branch, validate a README,
pre-upload (every file is a "regular" upload here, sent base64 inside the NDJSON commit), commit, read repo
info, and resolve files (HEAD and GET, with the ``X-Repo-Commit`` / ``ETag`` headers its downloader reads).
Point ``HF_ENDPOINT`` (``huggingface_hub.constants.ENDPOINT``) at ``server.url``.

:func:`serving` is the test fixture's body: the server, with huggingface_hub (and transformers' shared ``HfApi``)
pointed at it and online, and ``HF_TOKEN`` set.

Tokens: ``TOKEN`` writes; a missing or other token is refused with 401. Private repos are invisible (401,
``RepoNotFound``) without the token. ``server.drop_next`` names an endpoint ("commit", "preupload", ...) whose
next request gets its connection closed with no response, like a dropped network.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_test_write_token"
USER = "tester"


class Repo:
    def __init__(self, private: bool):
        self.private = private
        # in every commit id: ids never repeat across servers, as on the Hub (transformers caches a repo's code
        # by commit id, across processes, so a repeated id would load code an earlier test pushed)
        self.nonce = uuid.uuid4().hex
        self.commits: dict = {}  # sha -> {path: bytes}
        self.messages: dict = {}  # sha -> commit message
        self.branches: dict = {}  # name -> sha
        self.prs = 0
        self.branches["main"] = self._commit({}, "initial commit")

    def _commit(self, files: dict, message: str) -> str:
        sha = hashlib.sha1(json.dumps([self.nonce, message, len(self.commits), sorted(files)]).encode()).hexdigest()
        self.commits[sha] = files
        self.messages[sha] = message
        return sha

    def tree(self, revision: str = "main") -> dict:
        """``{path: bytes}`` at a branch or commit."""
        return self.commits[self.resolve(revision)]

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, branch: str, files: dict, deleted: list, message: str) -> str:
        tree = dict(self.commits[self.branches[branch]])
        tree.update(files)
        for path in deleted:
            tree.pop(path, None)
        self.branches[branch] = self._commit(tree, message)
        return self.branches[branch]


class Handler(BaseHTTPRequestHandler):
    server_version = "hfprune-test-hub/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {TOKEN}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _dropped(self, endpoint: str) -> bool:
        if self.hub.drop_next == endpoint:
            self.hub.drop_next = None
            self.close_connection = True
            self.connection.shutdown(2)  # no response at all, as if the network went away
            return True
        return False

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(401 if not self._authorized() else 404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        return repo

    # -- routing ---------------------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.hub.requests.append((self.command, url.path))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            rest = parts[4:]
            revision = rest[1] if len(rest) >= 2 and rest[0] == "revision" else "main"
            return self._info(f"{parts[2]}/{parts[3]}", revision)
        if parts[:2] == ["api", "whoami-v2"]:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": USER, "auth": {"type": "access_token"}})
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self._error(404, f"no route for {url.path}")

    def do_POST(self):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        self.hub.requests.append((self.command, url.path))
        body = self._body()
        if parts == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if self._dropped(action):
                return None
            if action == "preupload":
                return self._preupload(repo_id, revision, json.loads(body))
            if action == "commit":
                return self._commit(repo_id, revision, body, "create_pr" in query)
            if action == "branch":
                return self._branch(repo_id, revision)
        self._error(404, f"no route for {url.path}")

    # -- endpoints -------------------------------------------------------------------------------------------
    def _create(self, payload: dict):
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.repos[repo_id] = Repo(private)
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict):
        text = payload.get("content", "")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1])
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
            if not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, revision: str, payload: dict):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        sha = repo.resolve(revision)
        tree = repo.commits.get(sha, {})
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": _git_oid(tree[f["path"]]) if f["path"] in tree else None} for f in payload["files"]]
        self._send(200, {"files": files, "commitOid": sha})

    def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files, deleted, message = {}, [], ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                deleted.append(value["path"])
            else:
                return self._error(400, f"unsupported commit operation {item['key']!r}")
        pr_url = None
        if create_pr:
            repo.prs += 1
            branch = f"refs/pr/{repo.prs}"
            repo.branches[branch] = repo.branches[revision]
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
        else:
            branch = revision
        sha = repo.commit(branch, files, deleted, message)
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": pr_url})

    def _branch(self, repo_id: str, branch: str):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._send(409, {"error": f"Reference already exists: refs/heads/{branch}"})
        repo.branches[branch] = repo.branches["main"]
        self._send(200, {})

    def _revision(self, repo_id: str, revision: str):
        """``(repo, sha, tree)`` of a readable repo at ``revision``, or ``None`` once the error reply is sent."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, sha, repo.commits[sha]

    def _info(self, repo_id: str, revision: str):
        found = self._revision(repo_id, revision)
        if found is None:
            return
        repo, sha, tree = found
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "author": repo_id.split("/")[0], "tags": [], "downloads": 0, "likes": 0,
                         "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(tree.items())]})

    def _resolve(self, repo_id: str, revision: str, path: str):
        found = self._revision(repo_id, revision)
        if found is None:
            return
        _, sha, tree = found
        if path not in tree:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        data = tree[path]
        self._send(200, headers={"X-Repo-Commit": sha, "ETag": f'"{_git_oid(data)}"',
                                 "Content-Type": "application/octet-stream"}, body=data)


def _git_oid(data: bytes) -> str:
    """The git blob id the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """``with HubServer() as hub: ...``: serves on a free port of 127.0.0.1 in a background thread."""

    def __init__(self):
        self.repos: dict = {}
        self.requests: list = []
        self.drop_next: str | None = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def serving(monkeypatch, tmp_path):
    """A :class:`HubServer`, with huggingface_hub pointed at it and online (tests/conftest.py sets
    ``HF_HUB_OFFLINE=1`` otherwise) and ``HF_TOKEN`` set to :data:`TOKEN`. transformers' shared ``HfApi`` (which
    fixes its endpoint when it is made) is made afresh against the server, and dropped afterwards."""
    from huggingface_hub import constants
    from transformers.utils import hub as transformers_hub

    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server
