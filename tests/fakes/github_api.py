"""A local HTTP server that speaks the subset of GitHub's REST API this project uses,
so the real PyGithub client can be exercised without the internet.

State lives in memory (repos, issues, labels, comments, pull requests); every request
is recorded (method, raw path, query, headers, body) so tests can check where the
token travels. Error injection: ``fail(method, path_regex, status)``. Authors'
permissions (the collaborator-permission endpoint): ``set_permission``.

With ``git_root`` it also serves real git repositories over smart HTTP
(``/git/<owner>/<name>.git``, through ``git http-backend``) behind HTTP Basic auth,
so a clone or push with the forge's ``git_env`` really has to authenticate.

CI (GitHub Actions and other apps' checks), read through the checks and actions endpoints:
``add_workflow_run`` (a workflow run on a commit: its check suite, its jobs, one check run
per job with the job's id, as on GitHub, and each job's log), ``add_check_run`` (another
app's check), ``set_check_run``, ``set_job_log``; re-runs requested through the API are
recorded in ``reruns`` and put the run back to ``queued`` until ``complete_run`` finishes
the re-run jobs; a re-requested check suite of another app (``check-suites/{id}/rerequest``)
gets new queued check runs (``check_run`` finds the newest, ``set_check_run`` finishes it). A job's log is served the way GitHub serves it: ``.../actions/jobs/{id}/logs``
answers 302 to a short-lived signed URL (``/_blobs/...``) that needs no token.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
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


class Rerun(NamedTuple):
    """A re-run requested through the API."""
    repo: str
    kind: str  # "failed_jobs" (runs/{id}/rerun-failed-jobs), "job" (jobs/{id}/rerun), "run" (runs/{id}/rerun)
    #            "suite" (check-suites/{id}/rerequest: run_id is the suite's id, job_ids its check runs')
    run_id: int
    job_ids: tuple[int, ...]  # the jobs re-queued (their ids before the re-run)
    attempt: int  # the run's new run_attempt


# a check run's / job's conclusion once completed, and the states before that
CONCLUSIONS = ("success", "failure", "cancelled", "timed_out", "action_required", "neutral", "skipped",
               "stale")
PENDING = ("queued", "in_progress", "waiting", "requested", "pending")
FAILED = ("failure", "cancelled", "timed_out")  # what rerun-failed-jobs re-runs
ACTIONS_APP = "github-actions"


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
        self.reruns: list[Rerun] = []
        self.log_link_seconds = 60.0  # how long a job log's signed URL stays valid
        self._log_links: dict[str, tuple[str, int, float]] = {}  # signature -> (repo, job id, expiry)
        self._app_ids: dict[str, int] = {ACTIONS_APP: 15368}
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
                "numbers": itertools.count(1), "checks": {}, "suites": {}, "runs": {}, "jobs": {},
                "workflows": {}, "run_numbers": itertools.count(1)})

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

    # -- CI: workflow runs, jobs, check runs, logs ------------------------------------
    def add_workflow_run(self, repo: str, head_sha: str, jobs: Mapping[str, str], *, workflow: str = "CI",
                         branch: str | None = None, event: str = "pull_request",
                         logs: Mapping[str, str] | None = None, conclusion: str | None = None) -> int:
        """A GitHub Actions run of ``workflow`` on ``head_sha`` (on ``branch``, default: the
        repository's default branch) with one job per entry of ``jobs``: name -> a conclusion
        (``CONCLUSIONS``: the job completed so) or a state before that (``PENDING``). As on
        GitHub the run gets its own check suite (app ``github-actions``) and each job a check
        run with the job's id. ``logs``: job name -> log text (default: a short made-up log
        ending the way GitHub's do for that conclusion). The run's status and conclusion follow
        from its jobs, unless ``conclusion`` is given (e.g. ``action_required`` with no jobs: a
        first-time contributor's workflow waiting for approval). Returns the run's id."""
        r = self.add_repo(repo)
        with self.lock:
            branch = branch or r["default_branch"]
            run_id = next(self._ids)
            suite = self._new_suite(r, ACTIONS_APP, head_sha, branch, run=run_id)
            wf = r["workflows"].setdefault(workflow, next(self._ids))
            fixed = conclusion is not None
            status, conclusion = _state(conclusion) if fixed else ("queued", None)
            r["runs"][run_id] = {"id": run_id, "workflow": workflow, "workflow_id": wf, "head_sha": head_sha,
                                 "head_branch": branch, "event": event, "status": status,
                                 "conclusion": conclusion, "fixed": fixed, "attempt": 1, "suite": suite,
                                 "run_number": next(r["run_numbers"])}
            for name, result in jobs.items():
                self._new_job(r, run_id, name, result, (logs or {}).get(name))
            self._settle_run(r, run_id)
            return run_id

    def add_check_run(self, repo: str, head_sha: str, name: str, result: str, *, app: str = "ci-bot",
                      branch: str | None = None, summary: str | None = None) -> int:
        """A check run of another app (no workflow run behind it) on ``head_sha``, in that
        app's check suite for the commit. ``result``: a conclusion or a pending state."""
        r = self.add_repo(repo)
        with self.lock:
            suite = next((s["id"] for s in r["suites"].values()
                          if s["app"] == app and s["head_sha"] == head_sha and s["run"] is None), None)
            if suite is None:
                suite = self._new_suite(r, app, head_sha, branch or r["default_branch"], run=None)
            check_id = next(self._ids)
            status, conclusion = _state(result)
            r["checks"][check_id] = {"id": check_id, "name": name, "head_sha": head_sha, "suite": suite,
                                     "status": status, "conclusion": conclusion, "job": None,
                                     "summary": summary,
                                     "details_url": f"https://{app}.example/runs/{check_id}"}
            return check_id

    def set_check_run(self, repo: str, check_id: int, result: str, summary: str | None = None) -> None:
        """Move another app's check run on (e.g. from ``in_progress`` to a conclusion)."""
        with self.lock:
            c = self.repos[repo]["checks"][check_id]
            c["status"], c["conclusion"] = _state(result)
            if summary is not None:
                c["summary"] = summary

    def set_job_log(self, repo: str, job_id: int, text: str) -> None:
        with self.lock:
            self.repos[repo]["jobs"][job_id]["log"] = text

    def complete_run(self, repo: str, run_id: int, results: str | Mapping[str, str],
                     logs: Mapping[str, str] | None = None) -> None:
        """Finish the run's unfinished jobs (a re-run's, or ones added pending): ``results`` is
        one conclusion for all of them or job name -> conclusion (or a pending state). The
        run's status and conclusion, its check runs and its suite follow."""
        with self.lock:
            r = self.repos[repo]
            for j in self._latest_jobs(r, run_id):
                if j["status"] == "completed":
                    continue
                result = results if isinstance(results, str) else results[j["name"]]
                j["status"], j["conclusion"] = _state(result)
                c = r["checks"][j["id"]]
                c["status"], c["conclusion"] = j["status"], j["conclusion"]
                if j["status"] == "completed":
                    j["log"] = (logs or {}).get(j["name"]) or _default_log(j["name"], j["conclusion"])
            self._settle_run(r, run_id)

    def check_run(self, repo: str, head_sha: str, name: str) -> dict:
        """The newest check run called ``name`` on ``head_sha`` (after a re-request: the new one)."""
        with self.lock:
            found = [c for c in self.repos[repo]["checks"].values()
                     if c["head_sha"] == head_sha and c["name"] == name]
            if not found:
                raise KeyError(f"no check run {name!r} on {head_sha}")
            return dict(max(found, key=lambda c: c["id"]))

    def workflow_run(self, repo: str, run_id: int) -> dict:
        with self.lock:
            return dict(self.repos[repo]["runs"][run_id])

    def jobs_of(self, repo: str, run_id: int, latest: bool = True) -> list[dict]:
        """The run's jobs (``latest``: the newest attempt of each), oldest first."""
        with self.lock:
            r = self.repos[repo]
            jobs = (self._latest_jobs(r, run_id) if latest
                    else [j for j in r["jobs"].values() if j["run"] == run_id])
            return [dict(j) for j in jobs]

    def _new_suite(self, r: dict, app: str, head_sha: str, branch: str, run: int | None) -> int:
        suite = next(self._ids)
        self._app_ids.setdefault(app, next(self._ids))
        r["suites"][suite] = {"id": suite, "app": app, "head_sha": head_sha, "head_branch": branch,
                              "run": run}
        return suite

    def _new_job(self, r: dict, run_id: int, name: str, result: str, log: str | None) -> dict:
        run, job_id = r["runs"][run_id], next(self._ids)
        status, conclusion = _state(result)
        if status == "completed" and log is None:
            log = _default_log(name, conclusion)
        job = {"id": job_id, "run": run_id, "attempt": run["attempt"], "name": name, "status": status,
               "conclusion": conclusion, "log": log if status == "completed" else None}
        r["jobs"][job_id] = job
        r["checks"][job_id] = {  # an Actions job is a check run with the same id
            "id": job_id, "name": name, "head_sha": run["head_sha"], "suite": run["suite"], "status": status,
            "conclusion": conclusion, "job": job_id, "summary": None,
            "details_url": f"{self.root}/{r['full_name']}/actions/runs/{run_id}/job/{job_id}"}
        return job

    def _latest_jobs(self, r: dict, run_id: int) -> list[dict]:
        latest: dict[str, dict] = {}
        for j in r["jobs"].values():
            if j["run"] == run_id:
                latest[j["name"]] = j  # ids grow: the last one is the newest attempt
        return sorted(latest.values(), key=lambda j: j["id"])

    def _settle_run(self, r: dict, run_id: int) -> None:
        run = r["runs"][run_id]
        jobs = self._latest_jobs(r, run_id)
        if jobs and not run["fixed"]:
            run["status"], run["conclusion"] = _overall([(j["status"], j["conclusion"]) for j in jobs])

    def _rerun(self, r: dict, run_id: int, kind: str, job_id: int | None = None) -> tuple[int, Any, dict]:
        run = r["runs"].get(run_id) or _not_found()
        if run["status"] != "completed":
            raise HttpError(403, "This workflow run is not completed and cannot be re-run.")
        latest = self._latest_jobs(r, run_id)
        if kind == "job":
            again = [j for j in latest if j["id"] == job_id]
            if not again:
                raise HttpError(403, "Only the latest attempt of a job can be re-run.")
        elif kind == "failed_jobs":
            again = [j for j in latest if j["conclusion"] in FAILED]
            if not again:
                raise HttpError(403, "This workflow run has no failed jobs to re-run.")
        else:
            again = latest
        run["attempt"] += 1
        run["status"], run["conclusion"], run["fixed"] = "queued", None, False
        for j in again:
            self._new_job(r, run_id, j["name"], "queued", None)
        self.reruns.append(Rerun(r["full_name"], kind, run_id, tuple(j["id"] for j in again), run["attempt"]))
        return 201, {}, {}

    def _rerequest_suite(self, r: dict, suite_id: int) -> tuple[int, Any, dict]:
        """POST /check-suites/{id}/rerequest: GitHub asks the suite's app to run its checks
        again; here every check run of the suite gets a new, queued one (the app's new run,
        finished with ``set_check_run``). An Actions suite is re-run through the Actions
        endpoints instead. Recorded in ``reruns`` with kind ``suite`` (``run_id``: the suite's id)."""
        s = r["suites"].get(suite_id) or _not_found()
        if s["run"] is not None:
            raise HttpError(422, "Re-run a GitHub Actions workflow run through the Actions API.")
        latest: dict[str, dict] = {}
        for c in sorted(r["checks"].values(), key=lambda c: c["id"]):
            if c["suite"] == suite_id:
                latest[c["name"]] = c
        s["attempt"] = s.get("attempt", 1) + 1
        for old in latest.values():
            check_id = next(self._ids)
            r["checks"][check_id] = {**old, "id": check_id, "status": "queued", "conclusion": None,
                                     "summary": None, "details_url": old["details_url"].rsplit("/", 1)[0]
                                     + f"/{check_id}"}
        self.reruns.append(Rerun(r["full_name"], "suite", suite_id, tuple(c["id"] for c in latest.values()),
                                 s["attempt"]))
        return 201, {}, {}

    def _resolve_ref(self, r: dict, ref: str) -> str:
        if re.fullmatch(r"[0-9a-fA-F]{40}", ref):
            return ref.lower()
        bare = self.git_root / f"{r['full_name']}.git" if self.git_root is not None else None
        if bare is not None and bare.is_dir():
            out = _git(bare, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
            if out.returncode == 0:
                return out.stdout.decode().strip()
        for s in sorted(r["suites"].values(), key=lambda s: -s["id"]):
            if s["head_branch"] == ref:
                return s["head_sha"]
        raise HttpError(422, f"No commit found for SHA: {ref}")

    def _log_link(self, r: dict, job_id: int) -> tuple[int, Any, dict]:
        job = r["jobs"].get(job_id) or _not_found()
        if job["status"] != "completed" or job["log"] is None:
            raise HttpError(404, "Not Found")
        sig = secrets.token_urlsafe(16)
        self._log_links[sig] = (r["full_name"], job_id, time.monotonic() + self.log_link_seconds)
        return 302, None, {"Location": f"{self.root}/_blobs/job-logs/{job_id}.txt?sig={sig}"}

    def blob(self, path: str, query: str) -> tuple[int, dict, bytes]:
        """A signed download URL (as GitHub's log links are): no token, the signature is the
        credential, and it expires."""
        m = re.fullmatch(r"/_blobs/job-logs/(\d+)\.txt", path)
        sig = parse_qs(query).get("sig", [""])[0]
        with self.lock:
            link = self._log_links.get(sig)
            if not m or link is None or link[1] != int(m[1]) or time.monotonic() > link[2]:
                denied = b"<Error><Code>AuthenticationFailed</Code></Error>"
                return 403, {"Content-Type": "application/xml"}, denied
            text = self.repos[link[0]]["jobs"][link[1]]["log"] or ""
        return 200, {"Content-Type": "text/plain; charset=utf-8"}, text.encode()

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
        ref = lambda name, sha: {"label": f"{owner}:{name}", "ref": name, "sha": sha,
                                 "user": self._user(owner), "repo": self._repo_json(r)}
        return {"id": i["id"], "node_id": f"PR_{i['id']}", "url": api, "number": n,
                "html_url": f"{self.root}/{r['full_name']}/pull/{n}", "diff_url": "", "patch_url": "",
                "issue_url": f"{self.base_url}/repos/{r['full_name']}/issues/{n}", "state": i["state"],
                "locked": False, "title": i["title"], "body": i["body"], "user": self._user(self.login),
                "labels": [], "draft": p["draft"], "merged": p["merged"], "mergeable": None,
                "created_at": NOW, "updated_at": NOW, "closed_at": None,
                "merged_at": NOW if p["merged"] else None, "merge_commit_sha": None,
                "head": ref(p["head"], p.get("head_sha") or self._branch_sha(r, p["head"])),
                "base": ref(p["base"], self._branch_sha(r, p["base"]))}

    def set_pull_head_sha(self, repo: str, number: int, sha: str) -> None:
        """What the pull request reports as ``head.sha`` (otherwise: its branch in the served
        git repository, if there is one; else forty zeros)."""
        with self.lock:
            self.repos[repo]["pulls"][number]["head_sha"] = sha

    def _branch_sha(self, r: dict, branch: str) -> str:
        bare = self.git_root / f"{r['full_name']}.git" if self.git_root is not None else None
        if bare is not None and bare.is_dir():
            out = _git(bare, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
            if out.returncode == 0:
                return out.stdout.decode().strip()
        return "0" * 40

    def _pull_refs(self, r: dict, branch: str) -> list[dict]:
        """The open pull requests from ``branch``, as check runs, suites and workflow runs list them."""
        api = f"{self.base_url}/repos/{r['full_name']}"
        mini = {"id": r["id"], "url": api, "name": r["full_name"].split("/")[1]}
        return [{"url": f"{api}/pulls/{n}", "id": r["issues"][n]["id"], "number": n,
                 "head": {"ref": p["head"], "sha": p.get("head_sha") or self._branch_sha(r, p["head"]),
                          "repo": mini},
                 "base": {"ref": p["base"], "sha": self._branch_sha(r, p["base"]), "repo": mini}}
                for n, p in r["pulls"].items() if p["head"] == branch and r["issues"][n]["state"] == "open"]

    def _app_json(self, slug: str) -> dict:
        app_id = self._app_ids[slug]
        owner = "github" if slug == ACTIONS_APP else slug
        return {"id": app_id, "slug": slug, "node_id": f"A_{app_id}", "owner": self._user(owner),
                "name": "GitHub Actions" if slug == ACTIONS_APP else slug, "description": "",
                "external_url": f"https://{slug}.example", "html_url": f"{self.root}/apps/{slug}",
                "created_at": NOW, "updated_at": NOW, "permissions": {"checks": "write", "metadata": "read"},
                "events": []}

    def _head_commit_json(self, sha: str) -> dict:
        person = {"name": "octocat", "email": "octocat@example.com"}
        return {"id": sha, "tree_id": "0" * 40, "message": "", "timestamp": NOW, "author": person,
                "committer": person}

    def _commit_json(self, r: dict, sha: str) -> dict:
        api = f"{self.base_url}/repos/{r['full_name']}"
        person = {"name": "octocat", "email": "octocat@example.com", "date": NOW}
        return {"sha": sha, "node_id": f"C_{sha}", "url": f"{api}/commits/{sha}",
                "html_url": f"{self.root}/{r['full_name']}/commit/{sha}",
                "comments_url": f"{api}/commits/{sha}/comments",
                "commit": {"url": f"{api}/git/commits/{sha}", "author": person, "committer": person,
                           "message": "", "tree": {"sha": "0" * 40, "url": f"{api}/git/trees/{'0' * 40}"},
                           "comment_count": 0},
                "author": None, "committer": None, "parents": [], "files": []}

    def _check_run_json(self, r: dict, c: dict) -> dict:
        api = f"{self.base_url}/repos/{r['full_name']}/check-runs/{c['id']}"
        s = r["suites"][c["suite"]]
        done = c["status"] == "completed"
        return {"id": c["id"], "node_id": f"CR_{c['id']}", "head_sha": c["head_sha"], "external_id": "",
                "url": api, "html_url": f"{self.root}/{r['full_name']}/runs/{c['id']}",
                "details_url": c["details_url"], "status": c["status"], "conclusion": c["conclusion"],
                "started_at": None if c["status"] == "queued" else NOW, "completed_at": NOW if done else None,
                "output": {"title": c["conclusion"] and f"{c['name']}: {c['conclusion']}",
                           "summary": c["summary"],
                           "text": None, "annotations_count": 0, "annotations_url": api + "/annotations"},
                "name": c["name"], "check_suite": {"id": c["suite"]}, "app": self._app_json(s["app"]),
                "pull_requests": self._pull_refs(r, s["head_branch"])}

    def _suite_state(self, r: dict, s: dict) -> tuple[str, str | None]:
        if s["run"] is not None:
            run = r["runs"][s["run"]]
            return run["status"], run["conclusion"]
        latest: dict[str, dict] = {}
        for c in sorted(r["checks"].values(), key=lambda c: c["id"]):
            if c["suite"] == s["id"]:
                latest[c["name"]] = c
        return _overall([(c["status"], c["conclusion"]) for c in latest.values()])

    def _check_suite_json(self, r: dict, s: dict) -> dict:
        api = f"{self.base_url}/repos/{r['full_name']}"
        status, conclusion = self._suite_state(r, s)
        return {"id": s["id"], "node_id": f"CS_{s['id']}", "head_branch": s["head_branch"],
                "head_sha": s["head_sha"], "status": status, "conclusion": conclusion,
                "url": f"{api}/check-suites/{s['id']}", "before": None,
                "after": s["head_sha"], "pull_requests": self._pull_refs(r, s["head_branch"]),
                "app": self._app_json(s["app"]), "repository": self._repo_json(r), "created_at": NOW,
                "updated_at": NOW, "head_commit": self._head_commit_json(s["head_sha"]),
                "latest_check_runs_count": len({c["name"] for c in r["checks"].values()
                                                if c["suite"] == s["id"]}),
                "check_runs_url": f"{api}/check-suites/{s['id']}/check-runs", "rerequestable": True,
                "runs_rerequestable": True}

    def _run_json(self, r: dict, run: dict) -> dict:
        api = f"{self.base_url}/repos/{r['full_name']}"
        url = f"{api}/actions/runs/{run['id']}"
        return {"id": run["id"], "name": run["workflow"], "node_id": f"WFR_{run['id']}",
                "check_suite_id": run["suite"], "check_suite_node_id": f"CS_{run['suite']}",
                "head_branch": run["head_branch"], "head_sha": run["head_sha"],
                "path": f".github/workflows/{run['workflow'].lower()}.yml", "display_title": run["workflow"],
                "run_number": run["run_number"], "event": run["event"], "status": run["status"],
                "conclusion": run["conclusion"], "workflow_id": run["workflow_id"], "url": url,
                "html_url": f"{self.root}/{r['full_name']}/actions/runs/{run['id']}",
                "pull_requests": self._pull_refs(r, run["head_branch"]), "created_at": NOW, "updated_at": NOW,
                "actor": self._user(self.login), "triggering_actor": self._user(self.login),
                "run_attempt": run["attempt"], "referenced_workflows": [], "run_started_at": NOW,
                "jobs_url": url + "/jobs", "logs_url": url + "/logs",
                "check_suite_url": f"{api}/check-suites/{run['suite']}", "artifacts_url": url + "/artifacts",
                "cancel_url": url + "/cancel", "rerun_url": url + "/rerun",
                "previous_attempt_url": (f"{url}/attempts/{run['attempt'] - 1}" if run["attempt"] > 1
                                         else None),
                "workflow_url": f"{api}/actions/workflows/{run['workflow_id']}",
                "head_commit": self._head_commit_json(run["head_sha"]), "repository": self._repo_json(r),
                "head_repository": self._repo_json(r)}

    def _job_json(self, r: dict, j: dict) -> dict:
        api = f"{self.base_url}/repos/{r['full_name']}"
        run = r["runs"][j["run"]]
        done, started = j["status"] == "completed", j["status"] != "queued"
        steps = [] if not started else [
            {"name": "Set up job", "status": "completed", "conclusion": "success", "number": 1,
             "started_at": NOW, "completed_at": NOW},
            {"name": f"Run {j['name']}", "status": j["status"], "conclusion": j["conclusion"], "number": 2,
             "started_at": NOW, "completed_at": NOW if done else None}]
        return {"id": j["id"], "run_id": j["run"], "run_url": f"{api}/actions/runs/{j['run']}",
                "run_attempt": j["attempt"], "node_id": f"CR_{j['id']}", "head_sha": run["head_sha"],
                "head_branch": run["head_branch"], "url": f"{api}/actions/jobs/{j['id']}",
                "html_url": f"{self.root}/{r['full_name']}/actions/runs/{j['run']}/job/{j['id']}",
                "status": j["status"], "conclusion": j["conclusion"], "created_at": NOW,
                "started_at": NOW if started else None, "completed_at": NOW if done else None,
                "name": j["name"],
                "steps": steps, "check_run_url": f"{api}/check-runs/{j['id']}", "labels": ["ubuntu-latest"],
                "runner_id": 1 if started else None, "runner_name": "GitHub Actions 1" if started else None,
                "runner_group_id": 1 if started else None,
                "runner_group_name": "GitHub Actions" if started else None, "workflow_name": run["workflow"]}

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
        if method == "GET" or re.fullmatch(r"/actions/(runs|jobs)/\d+/rerun(-failed-jobs)?", rest):
            return self._ci_route(r, method, rest, query)
        if (m := re.fullmatch(r"/check-suites/(\d+)/rerequest", rest)) and method == "POST":
            return self._rerequest_suite(r, int(m[1]))
        return _not_found()

    def _ci_route(self, r: dict, method: str, rest: str, query: dict) -> tuple[int, Any, dict]:
        q = lambda name, default=None: query.get(name, [default])[0]
        if (m := re.fullmatch(r"/commits/(.+)/check-runs", rest)):
            return self._list_checks(r, [c for c in r["checks"].values()
                                         if c["head_sha"] == self._resolve_ref(r, m[1])], query, rest)
        if (m := re.fullmatch(r"/check-suites/(\d+)/check-runs", rest)):
            s = r["suites"].get(int(m[1])) or _not_found()
            checks = [c for c in r["checks"].values() if c["suite"] == s["id"]]
            return self._list_checks(r, checks, query, rest)
        if (m := re.fullmatch(r"/commits/(.+)/check-suites", rest)):
            sha = self._resolve_ref(r, m[1])
            suites = [s for s in r["suites"].values() if s["head_sha"] == sha
                      and q("app_id") in (None, str(self._app_ids[s["app"]]))
                      and (q("check_name") is None
                           or any(c["suite"] == s["id"] and c["name"] == q("check_name")
                                  for c in r["checks"].values()))]
            items = [self._check_suite_json(r, s) for s in suites]
            return self._listing("check_suites", items, query, rest, r)
        if (m := re.fullmatch(r"/commits/(.+)", rest)):
            return 200, self._commit_json(r, self._resolve_ref(r, m[1])), {}
        if (m := re.fullmatch(r"/check-runs/(\d+)", rest)):
            c = r["checks"].get(int(m[1])) or _not_found()
            return 200, self._check_run_json(r, c), {}
        if (m := re.fullmatch(r"/check-suites/(\d+)", rest)):
            s = r["suites"].get(int(m[1])) or _not_found()
            return 200, self._check_suite_json(r, s), {}
        if rest == "/actions/runs":
            runs = [run for run in sorted(r["runs"].values(), key=lambda run: -run["id"])  # newest first
                    if q("head_sha") in (None, run["head_sha"]) and q("branch") in (None, run["head_branch"])
                    and q("event") in (None, run["event"])
                    and q("status") in (None, run["status"], run["conclusion"])
                    and q("check_suite_id") in (None, str(run["suite"]))]
            return self._listing("workflow_runs", [self._run_json(r, run) for run in runs], query, rest, r)
        if (m := re.fullmatch(r"/actions/runs/(\d+)", rest)):
            run = r["runs"].get(int(m[1])) or _not_found()
            return 200, self._run_json(r, run), {}
        if (m := re.fullmatch(r"/actions/runs/(\d+)/jobs", rest)):
            run_id = int(m[1]) if int(m[1]) in r["runs"] else _not_found()
            jobs = (self._latest_jobs(r, run_id) if q("filter", "latest") == "latest"
                    else [j for j in r["jobs"].values() if j["run"] == run_id])
            return self._listing("jobs", [self._job_json(r, j) for j in jobs], query, rest, r)
        if (m := re.fullmatch(r"/actions/jobs/(\d+)", rest)):
            j = r["jobs"].get(int(m[1])) or _not_found()
            return 200, self._job_json(r, j), {}
        if (m := re.fullmatch(r"/actions/jobs/(\d+)/logs", rest)):
            return self._log_link(r, int(m[1]))
        if (m := re.fullmatch(r"/actions/runs/(\d+)/rerun-failed-jobs", rest)) and method == "POST":
            return self._rerun(r, int(m[1]), "failed_jobs")
        if (m := re.fullmatch(r"/actions/runs/(\d+)/rerun", rest)) and method == "POST":
            return self._rerun(r, int(m[1]), "run")
        if (m := re.fullmatch(r"/actions/jobs/(\d+)/rerun", rest)) and method == "POST":
            j = r["jobs"].get(int(m[1])) or _not_found()
            return self._rerun(r, j["run"], "job", j["id"])
        return _not_found()

    def _list_checks(self, r: dict, checks: list[dict], query: dict, rel: str) -> tuple[int, Any, dict]:
        q = lambda name, default=None: query.get(name, [default])[0]
        checks = sorted(checks, key=lambda c: c["id"])
        if q("filter", "latest") == "latest":  # the newest check run of each name
            checks = list({c["name"]: c for c in checks}.values())
        checks = [c for c in checks if q("check_name") in (None, c["name"])
                  and q("status") in (None, c["status"])
                  and q("app_id") in (None, str(self._app_ids[r["suites"][c["suite"]]["app"]]))]
        return self._listing("check_runs", [self._check_run_json(r, c) for c in checks], query, rel, r)

    def _listing(self, key: str, items: list, query: dict, rel: str, r: dict) -> tuple[int, Any, dict]:
        """A page of a list GitHub wraps in an object: ``{"total_count": n, key: [...]}``."""
        status, chunk, headers = self._page(items, query, rel, r)
        return status, {"total_count": len(items), key: chunk}, headers

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


def _state(result: str) -> tuple[str, str | None]:
    """(status, conclusion) for a conclusion or a pending state."""
    if result in CONCLUSIONS:
        return "completed", result
    if result in PENDING:
        return result, None
    raise ValueError(f"{result!r} is neither a conclusion {CONCLUSIONS} nor a pending state {PENDING}")


def _overall(states: list[tuple[str, str | None]]) -> tuple[str, str | None]:
    """A suite's or a run's state from its check runs' or jobs' (the fake's rule): pending while
    any is; then the first of action_required, failure, timed_out, cancelled, stale present;
    else success if any succeeded, neutral if any was neutral, else skipped."""
    if not states:
        return "queued", None
    if any(status != "completed" for status, _ in states):
        started = any(status != "queued" for status, _ in states)
        return ("in_progress" if started else "queued"), None
    found = {conclusion for _, conclusion in states}
    for conclusion in ("action_required", "failure", "timed_out", "cancelled", "stale", "success", "neutral"):
        if conclusion in found:
            return "completed", conclusion
    return "completed", "skipped"


def _default_log(name: str, conclusion: str | None) -> str:
    ts = "2026-01-01T00:00:00.0000000Z"
    ends = {"failure": "##[error]Process completed with exit code 1.",
            "timed_out": "##[error]The job has exceeded the maximum execution time of 360m0s",
            "cancelled": "##[error]The operation was canceled."}
    end = ends.get(conclusion or "", "Cleaning up orphan processes")
    lines = [f"##[group]Run {name}", f"{name}: running", "##[endgroup]"]
    if conclusion == "failure":
        lines.append(f"Error: {name} failed")
    return "".join(f"{ts} {line}\n" for line in [*lines, end])


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
            if parts.path.startswith("/_blobs/"):
                self._send(*fake.blob(parts.path, parts.query))
                return
            try:
                body = json.loads(raw) if raw else None
                status, data, extra = fake.handle(self.command, parts.path, parse_qs(parts.query), body, headers)
            except HttpError as e:
                status, extra = e.status, {}
                data = {"message": e.message, "documentation_url": "https://docs.github.com/rest"}
                if e.errors:
                    data["errors"] = e.errors
            payload = b"" if status in (204, 302) else json.dumps(data).encode()
            self._send(status, {"Content-Type": "application/json; charset=utf-8", **extra}, payload)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

    return Handler


@pytest.fixture(name="fake_github")
def fake_github_fixture(tmp_path):
    fake = FakeGitHub(git_root=tmp_path / "git-server").start()
    yield fake
    fake.stop()
