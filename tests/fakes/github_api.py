"""A local HTTP server that speaks the subset of GitHub's REST API this project uses,
so the real PyGithub client can be exercised without the internet.

State lives in memory (repos, issues, labels, comments, pull requests); every request
is recorded (method, raw path, query, headers, body) so tests can check where the
token travels. Error injection: ``fail(method, path_regex, status)``. Authors'
permissions (the collaborator-permission endpoint): ``set_permission``.

With ``git_root`` it also serves real git repositories over smart HTTP
(``/git/<owner>/<name>.git``, through ``git http-backend``) behind HTTP Basic auth,
so a clone or push with the forge's ``git_env`` really has to authenticate.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
import pytest

NOW = "2026-01-01T00:00:00Z"


class Recorded(NamedTuple):
    method: str
    path: str  # raw, as sent (percent-encoded)
    query: str
    headers: dict[str, str]
    body: bytes


class HttpError(Exception):
    def __init__(self, status: int, message: str, errors: list | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


class FakeGitHub:
    def __init__(self, *, tokens: Iterable[str] = ("ghp_fake_token_123456",), api_prefix: str = "",
                 git_root: Path | None = None, login: str = "ccc-bot") -> None:
        self.tokens = set(tokens)
        self.read_only_tokens: set[str] = set()
        self.api_prefix = api_prefix.rstrip("/")
        self.git_root = git_root
        self.login = login
        self.apps: dict[str, str] = {}  # app id -> public key (PEM)
        self.requests: list[Recorded] = []
        self.repos: dict[str, dict] = {}
        self.permissions: dict[tuple[str, str], str] = {}  # (repo, login lowercased) -> role
        self.failures: list[list] = []  # [method, regex, status, message, times_left]
        self.lock = threading.RLock()
        self._ids = itertools.count(1000)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    # -- lifecycle and set-up -----------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.root + self.api_prefix

    def start(self) -> FakeGitHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, full_name: str, *, default_branch: str = "main", drafts: bool = True) -> dict:
        with self.lock:
            return self.repos.setdefault(full_name, {
                "id": next(self._ids), "full_name": full_name, "default_branch": default_branch,
                "drafts": drafts, "labels": {}, "issues": {}, "comments": {}, "pulls": {},
                "numbers": itertools.count(1)})

    def add_issue(self, repo: str, title: str, body: str = "", labels: Iterable[str] = (),
                  user: str = "octocat") -> int:
        r = self.add_repo(repo)
        with self.lock:
            n = next(r["numbers"])
            for name in labels:
                self._ensure_label(r, name)
            r["issues"][n] = {"number": n, "title": title, "body": body, "labels": list(labels),
                              "user": user, "state": "open", "id": next(self._ids)}
            return n

    def set_permission(self, repo: str, login: str, permission: str) -> None:
        """``login``'s role on ``repo`` (admin, maintain, write, triage, read, none), as the
        collaborator-permission endpoint reports it. Unset: the owner is admin, a user
        called ``ghost`` does not exist (404), anyone else may read (a public repository)."""
        self.add_repo(repo)
        with self.lock:
            self.permissions[(repo, login.lower())] = permission

    def add_app(self, app_id: int | str, public_key_pem: str) -> None:
        self.apps[str(app_id)] = public_key_pem

    def fail(self, method: str, path_regex: str, status: int, message: str = "", times: int = 1) -> None:
        self.failures.append([method, re.compile(path_regex), status, message, times])

    def init_git_repo(self, full_name: str, files: dict[str, str]) -> Path:
        """A bare repository served at ``/git/<full_name>.git`` with one commit on main."""
        assert self.git_root is not None
        bare = self.git_root / f"{full_name}.git"
        bare.parent.mkdir(parents=True, exist_ok=True)
        _git(None, "init", "-q", "--bare", "-b", "main", str(bare))
        with tempfile.TemporaryDirectory() as work:
            _git(work, "init", "-q", "-b", "main")
            for name, text in files.items():
                Path(work, name).parent.mkdir(parents=True, exist_ok=True)
                Path(work, name).write_text(text)
            _git(work, "add", "-A")
            _git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "initial")
            _git(work, "push", "-q", str(bare), "main")
        self.add_repo(full_name)
        return bare

    def git_url(self, full_name: str) -> str:
        return f"{self.root}/git/{full_name}.git"

    # -- queries for tests ----------------------------------------------------------
    def issue_labels(self, repo: str, number: int) -> list[str]:
        with self.lock:
            return list(self.repos[repo]["issues"][number]["labels"])

    def comments_on(self, repo: str, number: int) -> list[dict]:
        with self.lock:
            return [dict(c) for c in self.repos[repo]["comments"].values() if c["issue"] == number]

    def pull(self, repo: str, number: int) -> dict:
        with self.lock:
            return dict(self.repos[repo]["pulls"][number])

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]

    def permission_requests(self, repo: str | None = None, login: str | None = None) -> list[Recorded]:
        """The calls made to the collaborator-permission endpoint (to check a cache)."""
        want = re.compile(rf"/repos/{re.escape(repo) if repo else '[^/]+/[^/]+'}/collaborators/"
                          rf"{re.escape(login) if login else '[^/]+'}/permission$", re.IGNORECASE)
        return [r for r in self.requests if want.search(unquote(r.path))]

    # -- JSON shapes ----------------------------------------------------------------
    def _user(self, login: str) -> dict:
        return {"login": login, "id": abs(hash(login)) % 10**7, "node_id": f"U_{login}",
                "avatar_url": f"{self.root}/avatars/{login}", "url": f"{self.base_url}/users/{login}",
                "html_url": f"{self.root}/{login}", "type": "User", "site_admin": False}

    def _repo_json(self, r: dict) -> dict:
        owner, name = r["full_name"].split("/")
        api = f"{self.base_url}/repos/{r['full_name']}"
        return {"id": r["id"], "node_id": f"R_{r['id']}", "name": name, "full_name": r["full_name"],
                "owner": self._user(owner), "private": False, "html_url": f"{self.root}/{r['full_name']}",
                "url": api, "issues_url": api + "/issues{/number}", "pulls_url": api + "/pulls{/number}",
                "labels_url": api + "/labels{/name}", "clone_url": f"{self.root}/{r['full_name']}.git",
                "default_branch": r["default_branch"], "created_at": NOW, "updated_at": NOW}

    def _label_json(self, r: dict, name: str) -> dict:
        lab = r["labels"][name]
        return {"id": lab["id"], "node_id": f"L_{lab['id']}", "name": name, "color": lab["color"],
                "description": lab["description"], "default": False,
                "url": f"{self.base_url}/repos/{r['full_name']}/labels/{name}"}

    def _issue_json(self, r: dict, n: int) -> dict:
        i = r["issues"][n]
        api = f"{self.base_url}/repos/{r['full_name']}/issues/{n}"
        out = {"id": i["id"], "node_id": f"I_{i['id']}", "url": api, "number": n,
               "repository_url": f"{self.base_url}/repos/{r['full_name']}", "labels_url": api + "/labels{/name}",
               "comments_url": api + "/comments", "events_url": api + "/events",
               "html_url": f"{self.root}/{r['full_name']}/issues/{n}", "state": i["state"],
               "title": i["title"], "body": i["body"], "user": self._user(i["user"]),
               "labels": [self._label_json(r, x) for x in i["labels"]], "assignee": None, "assignees": [],
               "milestone": None, "locked": False, "comments": len(self.comments_on(r["full_name"], n)),
               "created_at": NOW, "updated_at": NOW, "closed_at": None, "author_association": "OWNER"}
        if n in r["pulls"]:
            out["pull_request"] = {"url": f"{self.base_url}/repos/{r['full_name']}/pulls/{n}",
                                   "html_url": f"{self.root}/{r['full_name']}/pull/{n}"}
        return out

    def _permission_json(self, r: dict, login: str) -> dict:
        # GET /repos/{owner}/{repo}/collaborators/{username}/permission: "permission" is the
        # legacy base role (maintain reads as write, triage as read), "role_name" the real one
        owner = r["full_name"].split("/")[0]
        role = self.permissions.get((r["full_name"], login.lower()))
        if role is None:
            if login.lower() == "ghost":
                raise HttpError(404, f"{login} is not a user")
            role = "admin" if login.lower() == owner.lower() else "read"
        legacy = {"maintain": "write", "triage": "read"}.get(role, role)
        return {"permission": legacy, "role_name": role, "user": self._user(login)}

    def _comment_json(self, r: dict, c: dict) -> dict:
        return {"id": c["id"], "node_id": f"IC_{c['id']}", "body": c["body"], "user": self._user(c["user"]),
                "url": f"{self.base_url}/repos/{r['full_name']}/issues/comments/{c['id']}",
                "html_url": f"{self.root}/{r['full_name']}/issues/{c['issue']}#issuecomment-{c['id']}",
                "issue_url": f"{self.base_url}/repos/{r['full_name']}/issues/{c['issue']}",
                "created_at": NOW, "updated_at": NOW, "author_association": "OWNER"}

    def _pull_json(self, r: dict, n: int) -> dict:
        p, i = r["pulls"][n], r["issues"][n]
        api = f"{self.base_url}/repos/{r['full_name']}/pulls/{n}"
        owner = r["full_name"].split("/")[0]
        ref = lambda name: {"label": f"{owner}:{name}", "ref": name, "sha": "0" * 40,
                            "user": self._user(owner), "repo": self._repo_json(r)}
        return {"id": i["id"], "node_id": f"PR_{i['id']}", "url": api, "number": n,
                "html_url": f"{self.root}/{r['full_name']}/pull/{n}", "diff_url": "", "patch_url": "",
                "issue_url": f"{self.base_url}/repos/{r['full_name']}/issues/{n}", "state": i["state"],
                "locked": False, "title": i["title"], "body": i["body"], "user": self._user(self.login),
                "labels": [], "draft": p["draft"], "merged": p["merged"], "mergeable": None,
                "created_at": NOW, "updated_at": NOW, "closed_at": None,
                "merged_at": NOW if p["merged"] else None, "merge_commit_sha": None,
                "head": ref(p["head"]), "base": ref(p["base"])}

    # -- request handling -----------------------------------------------------------
    def _ensure_label(self, r: dict, name: str, color: str = "ededed", description: str | None = None) -> None:
        r["labels"].setdefault(name, {"id": next(self._ids), "color": color, "description": description})

    def _authorize(self, headers: dict[str, str], path: str, write: bool) -> None:
        scheme, _, cred = headers.get("authorization", "").partition(" ")
        if path.startswith("/app/"):
            try:
                iss = jwt.decode(cred, options={"verify_signature": False})["iss"]
                jwt.decode(cred, self.apps[str(iss)], algorithms=["RS256"])
                return
            except Exception:  # noqa: BLE001
                raise HttpError(401, "A JSON web token could not be decoded") from None
        if scheme.lower() not in ("token", "bearer") or cred not in self.tokens:
            raise HttpError(401, "Bad credentials")
        if write and cred in self.read_only_tokens:
            raise HttpError(403, "Resource not accessible by integration")

    def handle(self, method: str, raw_path: str, query: dict, body: Any, headers: dict) -> tuple[int, Any, dict]:
        path = raw_path[len(self.api_prefix):] if raw_path.startswith(self.api_prefix + "/") else raw_path
        for f in self.failures:
            if f[4] > 0 and f[0] == method and f[1].search(path):
                f[4] -= 1
                raise HttpError(f[2], f[3] or {500: "Server Error", 502: "Bad Gateway"}.get(f[2], "error"))
        self._authorize(headers, path, method != "GET")
        if m := re.fullmatch(r"/app/installations/(\d+)/access_tokens", path):
            token = f"ghs_installation_{m[1]}_{next(self._ids)}"
            self.tokens.add(token)
            expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            return 201, {"token": token, "expires_at": expires, "permissions": {"issues": "write"},
                         "repository_selection": "all"}, {}
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)(/.*)?", path)
        if not m or m[1] not in self.repos:
            raise HttpError(404, "Not Found")
        r, rest = self.repos[m[1]], unquote(m[2] or "")
        with self.lock:
            return self._repo_route(r, method, rest, query, body)

    def _repo_route(self, r: dict, method: str, rest: str, query: dict, body: Any) -> tuple[int, Any, dict]:
        issue_n = lambda s: int(s) if int(s) in r["issues"] else _not_found()
        if rest == "" and method == "GET":
            return 200, self._repo_json(r), {}
        if rest == "/labels" and method == "GET":
            return self._page([self._label_json(r, x) for x in r["labels"]], query, "/labels", r)
        if rest == "/labels" and method == "POST":
            if body["name"] in r["labels"]:
                raise HttpError(422, "Validation Failed", [{"resource": "Label", "code": "already_exists",
                                                            "field": "name"}])
            self._ensure_label(r, body["name"], body.get("color", "ededed"), body.get("description"))
            return 201, self._label_json(r, body["name"]), {}
        if (m := re.fullmatch(r"/labels/(.+)", rest)) and method == "GET":
            return (200, self._label_json(r, m[1]), {}) if m[1] in r["labels"] else _not_found()
        if (m := re.fullmatch(r"/issues/(\d+)", rest)):
            n = issue_n(m[1])
            if method == "PATCH":
                r["issues"][n].update({k: body[k] for k in ("title", "body", "state") if k in body})
            return 200, self._issue_json(r, n), {}
        if (m := re.fullmatch(r"/issues/(\d+)/labels(?:/(.+))?", rest)):
            i = r["issues"][issue_n(m[1])]
            if method in ("POST", "PUT"):
                names = body["labels"] if isinstance(body, dict) else body
                if method == "PUT":
                    i["labels"] = []
                for name in names:
                    self._ensure_label(r, name)  # GitHub creates unknown labels (grey)
                    if name not in i["labels"]:
                        i["labels"].append(name)
            elif method == "DELETE" and m[2] is not None:
                if m[2] not in i["labels"]:
                    raise HttpError(404, "Label does not exist")
                i["labels"].remove(m[2])
            elif method == "DELETE":
                i["labels"] = []
            return 200, [self._label_json(r, x) for x in i["labels"]], {}
        if (m := re.fullmatch(r"/issues/(\d+)/comments", rest)):
            n = issue_n(m[1])
            if method == "POST":
                c = {"id": next(self._ids), "issue": n, "body": body["body"], "user": self.login}
                r["comments"][c["id"]] = c
                return 201, self._comment_json(r, c), {}
            items = [self._comment_json(r, c) for c in r["comments"].values() if c["issue"] == n]
            return self._page(items, query, f"/issues/{n}/comments", r)
        if (m := re.fullmatch(r"/issues/comments/(\d+)", rest)):
            c = r["comments"].get(int(m[1])) or _not_found()
            if method == "PATCH":
                c["body"] = body["body"]
            elif method == "DELETE":
                del r["comments"][c["id"]]
                return 204, None, {}
            return 200, self._comment_json(r, c), {}
        if (m := re.fullmatch(r"/collaborators/([^/]+)/permission", rest)) and method == "GET":
            return 200, self._permission_json(r, m[1]), {}
        if rest == "/pulls" and method == "POST":
            return 201, self._create_pull(r, body), {}
        if rest == "/pulls" and method == "GET":
            head = query.get("head", [None])[0]
            state = query.get("state", ["open"])[0]
            owner = r["full_name"].split("/")[0]
            items = [self._pull_json(r, n) for n, p in r["pulls"].items()
                     if (head is None or f"{owner}:{p['head']}" == head)
                     and state in ("all", r["issues"][n]["state"])]
            return self._page(items, query, "/pulls", r)
        if (m := re.fullmatch(r"/pulls/(\d+)", rest)):
            n = int(m[1]) if int(m[1]) in r["pulls"] else _not_found()
            if method == "PATCH":
                r["issues"][n].update({k: body[k] for k in ("title", "body", "state") if k in body})
            return 200, self._pull_json(r, n), {}
        return _not_found()

    def _create_pull(self, r: dict, body: dict) -> dict:
        head, base = body["head"], body["base"]
        if body.get("draft") and not r["drafts"]:
            raise HttpError(422, "Draft pull requests are not supported in this repository.")
        bare = self.git_root / f"{r['full_name']}.git" if self.git_root is not None else None
        if bare is not None and bare.is_dir() and _git(
                bare, "rev-parse", "-q", "--verify", f"refs/heads/{head}", check=False).returncode:
            raise HttpError(422, "Validation Failed", [{"resource": "PullRequest", "field": "head",
                                                        "code": "invalid"}])
        for n, p in r["pulls"].items():
            if p["head"] == head and p["base"] == base and r["issues"][n]["state"] == "open":
                owner = r["full_name"].split("/")[0]
                raise HttpError(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom",
                                "message": f"A pull request already exists for {owner}:{head}."}])
        n = next(r["numbers"])
        r["issues"][n] = {"number": n, "title": body["title"], "body": body.get("body") or "",
                          "labels": [], "user": self.login, "state": "open", "id": next(self._ids)}
        r["pulls"][n] = {"head": head, "base": base, "draft": bool(body.get("draft")), "merged": False}
        return self._pull_json(r, n)

    def _page(self, items: list, query: dict, rel: str, r: dict) -> tuple[int, Any, dict]:
        per_page = int(query.get("per_page", ["30"])[0])
        page = int(query.get("page", ["1"])[0])
        chunk = items[(page - 1) * per_page: page * per_page]
        headers = {}
        if page * per_page < len(items):
            extra = "".join(f"&{k}={v[0]}" for k, v in query.items() if k not in ("page", "per_page"))
            url = f"{self.base_url}/repos/{r['full_name']}{rel}?per_page={per_page}&page={page + 1}{extra}"
            headers["Link"] = f'<{url}>; rel="next"'
        return 200, chunk, headers

    # -- git smart HTTP -----------------------------------------------------------
    def git_request(self, method: str, path: str, query: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        scheme, _, cred = headers.get("authorization", "").partition(" ")
        user = password = ""
        if scheme.lower() == "basic":
            user, _, password = base64.b64decode(cred).decode().partition(":")
        if password not in self.tokens:
            return 401, {"WWW-Authenticate": 'Basic realm="fake-github"'}, b"authentication required\n"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(self.git_root),
               "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": method, "PATH_INFO": path[len("/git"):],
               "QUERY_STRING": query, "CONTENT_TYPE": headers.get("content-type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": user, "REMOTE_ADDR": "127.0.0.1",
               "HTTP_CONTENT_ENCODING": headers.get("content-encoding", ""),
               "HTTP_GIT_PROTOCOL": headers.get("git-protocol", "")}
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                             timeout=60, check=False).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, extra = 200, {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                extra[name] = value.strip()
        return status, extra, payload


def _not_found():
    raise HttpError(404, "Not Found")


def _git(cwd, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True)


def _make_handler(fake: FakeGitHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, headers: dict, payload: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _any(self) -> None:
            raw = self._body()
            parts = urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            fake.requests.append(Recorded(self.command, parts.path, parts.query, headers, raw))
            if parts.path.startswith("/git/") and fake.git_root is not None:
                self._send(*fake.git_request(self.command, parts.path, parts.query, headers, raw))
                return
            try:
                body = json.loads(raw) if raw else None
                status, data, extra = fake.handle(self.command, parts.path, parse_qs(parts.query), body, headers)
            except HttpError as e:
                status, extra = e.status, {}
                data = {"message": e.message, "documentation_url": "https://docs.github.com/rest"}
                if e.errors:
                    data["errors"] = e.errors
            payload = b"" if status == 204 else json.dumps(data).encode()
            self._send(status, {"Content-Type": "application/json; charset=utf-8", **extra}, payload)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

    return Handler


@pytest.fixture(name="fake_github")
def fake_github_fixture(tmp_path):
    fake = FakeGitHub(git_root=tmp_path / "git-server").start()
    yield fake
    fake.stop()
