"""GitHub as the forge, through PyGithub: what an agent needs (clone URL, git
credentials, opening a pull request) and what the forge sync needs (read an issue,
one ``ccc:*`` state label, one tracking comment per task, a pull request's state).

Credentials: a token (``GITHUB_TOKEN``) or a GitHub App installation
(``GITHUB_APP_ID`` + ``GITHUB_APP_PRIVATE_KEY``/``_PATH`` + ``GITHUB_APP_INSTALLATION_ID``),
whose short-lived installation token PyGithub mints and refreshes. ``GITHUB_API_URL``
selects GitHub Enterprise (``https://ghe.example.com/api/v3``).

How git authenticates: ``GIT_ASKPASS`` pointing at a tiny helper script in a private
temporary directory. The token travels only in the git process's environment
(``CCC_GIT_PASSWORD``), never in a URL, an argv, a config file or a log line, and
git sends it only after the server asked (HTTP 401). The helper answers only for
the expected host, so a remote URL or ``url.*.insteadOf`` rewritten inside the
(untrusted) clone cannot collect the token, and ``credential.helper`` is reset so no
helper from the repository's or the user's config is handed the token to "store".
(``http.extraHeader`` would have worked too, but sends the token pre-emptively and
would put it in a ``GIT_CONFIG_VALUE_*`` next to the hardening overrides.)

PyGithub blocks: calls run on a small dedicated thread pool, so a slow or
rate-limited GitHub never starves the default executor that git and tests use.
Errors: network trouble, 5xx and rate limits -> :class:`ForgeUnavailable` (retryable);
401/403 -> :class:`ForgeAuthError`, 404 -> :class:`ForgeNotFound` (not retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import requests
import urllib3
from github import (
    Auth,
    Github,
    GithubException,
    GithubRetry,
    RateLimitExceededException,
    UnknownObjectException,
)

from events.errors import CccError, ConfigError, InfrastructureError
from events.task import IssueRef

from . import gitops
from .coders.base import mask_secrets

T = TypeVar("T")
DEFAULT_API_URL = "https://api.github.com"
GIT_USERNAME = "x-access-token"  # what GitHub expects with an installation token (and accepts with a PAT)
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_CLOSES = r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s*:?\s+(?:[\w.-]+/[\w.-]+)?#{n}\b"
STATE_LABELS: dict[str, tuple[str, str]] = {  # name -> (colour, description)
    "ccc:queued": ("fbca04", "claude-code-cluster: waiting for an agent"),
    "ccc:in-progress": ("1d76db", "claude-code-cluster: an agent is working on it"),
    "ccc:review": ("5319e7", "claude-code-cluster: pull request open"),
    "ccc:done": ("0e8a16", "claude-code-cluster: done"),
    "ccc:failed": ("d73a4a", "claude-code-cluster: failed"),
    "ccc:cancelled": ("cfd3d7", "claude-code-cluster: cancelled"),
}
LABEL_PREFIX = "ccc:"
_ASKPASS = """#!/bin/sh
# git's credential prompt, answered from the environment git was started with; only
# for the host the forge expects (a rewritten remote must not collect the token)
[ -n "$CCC_GIT_HOST" ] || exit 1
case "$1" in
  *"://$CCC_GIT_HOST'"*|*"@$CCC_GIT_HOST'"*) ;;
  *) echo "ccc askpass: not answering for this host" >&2; exit 1 ;;
esac
case "$1" in
  Username*) printf '%s\\n' "$CCC_GIT_USERNAME" ;;
  *) printf '%s\\n' "$CCC_GIT_PASSWORD" ;;
esac
"""


class ForgeError(CccError):
    """GitHub refused a request in a way retrying will not fix."""


class ForgeAuthError(ForgeError):
    """Bad or insufficient credentials (401/403)."""


class ForgeNotFound(ForgeError):
    """The repository, issue or pull request does not exist or is not visible (404)."""


class ForgeUnavailable(InfrastructureError):
    """GitHub could not be reached, failed (5xx) or rate-limited us: retry later,
    not before ``retry_after`` seconds when GitHub said so."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PullRequestInfo(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    state: str  # "open" | "closed"
    merged: bool
    draft: bool
    html_url: str
    head: str
    base: str


class CommentRef(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    html_url: str
    action: str  # "created" | "updated" | "unchanged"


def web_url_for(api_url: str) -> str:
    """``https://api.github.com`` -> ``https://github.com``; GHE
    ``https://ghe.example.com/api/v3`` -> ``https://ghe.example.com``;
    ``https://api.acme.ghe.com`` -> ``https://acme.ghe.com``."""
    parts = urlsplit(api_url.rstrip("/"))
    host, path = parts.netloc, parts.path
    if path.endswith("/api/v3"):
        path = path[: -len("/api/v3")]
    elif host.startswith("api."):
        host = host[len("api."):]
    return f"{parts.scheme}://{host}{path}"


def ensure_closes(body: str, issue_number: int) -> str:
    """The body, with ``Closes #N`` appended unless a closing keyword already links it."""
    if re.search(_CLOSES.format(n=int(issue_number)), body, re.IGNORECASE):
        return body
    return f"{body.rstrip()}\n\nCloses #{int(issue_number)}\n"


def _check_repo(repo: str) -> tuple[str, str]:
    if not _REPO.match(repo or "") or ".." in repo:
        raise ForgeError(f"not a GitHub repository name: {repo!r} (expected owner/name)")
    owner, _, name = repo.partition("/")
    return owner, name


def _read_key(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"GitHub App private key: no such file {path}")
    return path.read_text()


class GitHubForge:
    name = "github"

    def __init__(
        self,
        token: str | None = None,
        *,
        api_url: str | None = None,
        app_id: int | str | None = None,
        app_private_key: str | None = None,
        installation_id: int | str | None = None,
        git_url_template: str | None = None,
        env: Mapping[str, str] | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: int = 15,
        seconds_between_requests: float | None = 0.25,
        seconds_between_writes: float | None = 1.0,
        max_rate_limit_wait: float = 30.0,
        max_workers: int = 4,
    ) -> None:
        env = os.environ if env is None else env
        self.api_url = (api_url or env.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
        self.web_url = web_url_for(self.api_url)
        self.git_url_template = git_url_template
        app_id = app_id or env.get("GITHUB_APP_ID") or None
        installation_id = installation_id or env.get("GITHUB_APP_INSTALLATION_ID") or None
        app_private_key = (app_private_key or env.get("GITHUB_APP_PRIVATE_KEY")
                           or env.get("GITHUB_APP_PRIVATE_KEY_PATH") or None)
        self._token: str | None = None
        if token:
            self._token = token
            auth: Auth.Auth = Auth.Token(token)
        elif app_id is not None:
            missing = [n for n, v in (("GITHUB_APP_PRIVATE_KEY", app_private_key),
                                      ("GITHUB_APP_INSTALLATION_ID", installation_id)) if not v]
            if missing:
                raise ConfigError(f"GitHub App {app_id}: {' and '.join(missing)} not set")
            try:
                auth = Auth.AppAuth(app_id, _read_key(app_private_key)).get_installation_auth(
                    int(installation_id))
            except ValueError:
                raise ConfigError(f"GITHUB_APP_INSTALLATION_ID: not a number: {installation_id!r}") from None
        elif env.get("GITHUB_TOKEN"):
            self._token = env["GITHUB_TOKEN"]
            auth = Auth.Token(self._token)
        else:
            raise ConfigError("GitHub: no credentials; set GITHUB_TOKEN, or GITHUB_APP_ID, "
                              "GITHUB_APP_PRIVATE_KEY(_PATH) and GITHUB_APP_INSTALLATION_ID")
        self._auth = auth
        # a rate limit that resets soon is waited out on the thread; a longer one (and
        # every secondary limit: GitHub asks for a minute) becomes ForgeUnavailable
        # with retry_after, so the caller's retry policy decides, not a blocked thread
        retry = GithubRetry(total=retries, backoff_factor=backoff, raise_on_status=False,
                            max_rate_limit_wait=max_rate_limit_wait) if retries else None
        # lazy: objects are not fetched until an attribute is needed, so a label
        # change or a comment edit costs exactly the requests it makes
        self._gh = Github(auth=auth, base_url=self.api_url, timeout=timeout, retry=retry, lazy=True,
                          seconds_between_requests=seconds_between_requests,
                          seconds_between_writes=seconds_between_writes)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="github")
        self._known_labels: set[tuple[str, str]] = set()
        self._comments: OrderedDict[tuple[str, int, str], tuple[int, str]] = OrderedDict()
        self._askpass_dir: str | None = None
        self._finalizer: weakref.finalize | None = None

    # -- ForgeClient (what an agent uses) ---------------------------------------------
    def clone_url(self, repo: str) -> str:
        """Where to clone from; never carries credentials."""
        owner, name = _check_repo(repo)
        if self.git_url_template:
            return self.git_url_template.format(repo=repo, owner=owner, name=name)
        return f"{self.web_url}/{repo}.git"

    def git_env(self, repo: str) -> dict[str, str]:
        """Environment for git processes on ``repo`` that authenticates with the token
        through ``GIT_ASKPASS`` (see the module docstring). Empty for non-HTTP remotes
        (a local path needs no credentials), and for plain HTTP except on loopback.

        With a GitHub App this may mint a fresh installation token (one blocking
        request, at most about once an hour); call it off the event loop."""
        parts = urlsplit(self.clone_url(repo))
        host = parts.hostname or ""
        if parts.scheme != "https" and not (parts.scheme == "http" and host in ("127.0.0.1", "localhost", "::1")):
            return {}
        base = gitops.git_env()
        count = int(base.get("GIT_CONFIG_COUNT", "0"))
        env = {k: v for k, v in base.items() if k.startswith("GIT_CONFIG_")}
        for key, value in (("credential.helper", ""),):  # empty resets every configured helper
            env[f"GIT_CONFIG_KEY_{count}"], env[f"GIT_CONFIG_VALUE_{count}"] = key, value
            count += 1
        env["GIT_CONFIG_COUNT"] = str(count)
        with self._translating(f"get a token for git on {repo}"):
            password = self._auth.token
        env.update({
            "GIT_ASKPASS": self._askpass(),
            "GIT_TERMINAL_PROMPT": "0",
            "CCC_GIT_HOST": parts.netloc.rpartition("@")[2],
            "CCC_GIT_USERNAME": GIT_USERNAME,
            "CCC_GIT_PASSWORD": password,
        })
        return env

    async def open_pull_request(
        self, *, repo: str, branch: str, base: str, title: str, body: str, draft: bool, issue_number: int
    ) -> tuple[str, int | None]:
        """Open (or, on a retry, update) the pull request for ``branch``; its body
        always links the issue with a closing keyword. Returns (html_url, number)."""
        owner, _ = _check_repo(repo)
        body = ensure_closes(body, issue_number)

        def run() -> tuple[str, int]:
            r = self._gh.get_repo(repo)
            try:
                pr = r.create_pull(base=base, head=branch, title=title, body=body, draft=draft)
            except GithubException as e:
                text = _message(e).lower()
                if e.status != 422:
                    raise
                if draft and "draft" in text:  # the plan has no drafts: open it for real, say so
                    note = "\n\n_(Opened as a normal pull request: drafts are not available here.)_\n"
                    pr = r.create_pull(base=base, head=branch, title=title, body=body + note, draft=False)
                elif "already exists" in text:  # a retry after a crash, or a later attempt
                    pr = next(iter(r.get_pulls(state="open", head=f"{owner}:{branch}", base=base)), None)
                    if pr is None:
                        raise
                    pr.edit(title=title, body=body)
                else:
                    raise
            return pr.html_url, pr.number

        return await self._run(f"open a pull request for {repo}:{branch}", run)

    # -- what the forge sync uses ---------------------------------------------------
    async def read_issue(self, repo: str, number: int) -> IssueRef:
        _check_repo(repo)

        def run() -> IssueRef:
            issue = self._gh.get_repo(repo).get_issue(int(number)).complete()
            if issue.pull_request is not None:
                raise ForgeError(f"{repo}#{number} is a pull request, not an issue")
            return IssueRef(source="github", repo=repo, number=issue.number, title=issue.title,
                            body=issue.body or "", labels=tuple(lab.name for lab in issue.labels),
                            url=issue.html_url, author=issue.user.login if issue.user else "")

        return await self._run(f"read issue {repo}#{number}", run)

    async def set_state_label(self, repo: str, number: int, label: str) -> bool:
        """Make ``label`` the issue's only ``ccc:*`` label (creating it in the repository,
        with its colour, if missing). Returns whether anything changed."""
        _check_repo(repo)

        def run() -> bool:
            r = self._gh.get_repo(repo)
            issue = r.get_issue(int(number))
            current = [lab.name for lab in issue.labels]
            stale = [n for n in current if n.startswith(LABEL_PREFIX) and n != label]
            if label not in current:
                self._ensure_label(r, repo, label)
                issue.add_to_labels(label)  # added before the old one goes: never unlabelled
            for name in stale:
                try:
                    issue.remove_from_labels(name)
                except UnknownObjectException:
                    pass  # removed meanwhile: that is what we wanted
            return label not in current or bool(stale)

        return await self._run(f"label {repo}#{number} {label}", run)

    def _ensure_label(self, r, repo: str, label: str) -> None:
        if (repo, label) in self._known_labels:
            return
        try:
            r.get_label(label).complete()
        except UnknownObjectException:
            colour, description = STATE_LABELS.get(label, ("ededed", ""))
            try:
                r.create_label(label, colour, description)
            except GithubException as e:
                if e.status != 422:  # 422: created concurrently, fine
                    raise
        self._known_labels.add((repo, label))

    async def upsert_tracking_comment(self, repo: str, number: int, marker: str, body: str) -> CommentRef:
        """Keep exactly one comment carrying ``marker`` on the issue, with ``body``:
        created once, then edited in place (and duplicates from a race removed).

        Only the comment's id is cached, never its text: another process may have
        edited it since, so a known comment is edited blindly (one request), and an
        unknown one is found by listing and compared with what GitHub holds."""
        _check_repo(repo)
        text = body if marker in body else f"{marker}\n{body}"
        key = (repo, int(number), marker)

        def run() -> CommentRef:
            issue = self._gh.get_repo(repo).get_issue(int(number))
            known = self._comments.get(key)
            if known is not None:
                try:
                    issue.get_comment(known[0]).edit(text)
                    return self._remember(key, known[0], known[1], "updated")
                except UnknownObjectException:
                    self._comments.pop(key, None)  # deleted by someone: find or create again
            ours = self._marked(issue, marker)
            action = "updated"
            if not ours:
                issue.create_comment(text)
                ours, action = self._marked(issue, marker), "created"
            keep = ours[0]
            for extra in ours[1:]:  # two writers created one each: keep the oldest
                try:
                    extra.delete()
                except UnknownObjectException:
                    pass
            if keep.body != text:
                keep.edit(text)
            elif action == "updated":
                action = "unchanged"
            return self._remember(key, keep.id, keep.html_url, action)

        return await self._run(f"comment on {repo}#{number}", run)

    @staticmethod
    def _marked(issue, marker: str) -> list:
        return sorted((c for c in issue.get_comments() if marker in (c.body or "")), key=lambda c: c.id)

    def _remember(self, key, cid: int, url: str, action: str) -> CommentRef:
        self._comments[key] = (cid, url)
        self._comments.move_to_end(key)
        while len(self._comments) > 10_000:
            self._comments.popitem(last=False)
        return CommentRef(id=cid, html_url=url, action=action)

    async def pull_request_state(self, repo: str, number: int) -> PullRequestInfo:
        _check_repo(repo)

        def run() -> PullRequestInfo:
            pr = self._gh.get_repo(repo).get_pull(int(number)).complete()
            return PullRequestInfo(number=pr.number, state=pr.state, merged=bool(pr.merged),
                                   draft=bool(pr.draft), html_url=pr.html_url, head=pr.head.ref,
                                   base=pr.base.ref)

        return await self._run(f"read pull request {repo}#{number}", run)

    # -- plumbing -------------------------------------------------------------------
    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        with self._translating(what):
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @contextlib.contextmanager
    def _translating(self, what: str) -> Iterator[None]:
        try:
            yield
        except GithubException as e:
            raise self._translate(what, e) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise ForgeUnavailable(self._mask(f"{what}: GitHub unreachable: {type(e).__name__}: {e}")) from None

    def _translate(self, what: str, e: GithubException) -> CccError:
        status, msg = e.status, _message(e)
        if isinstance(e, RateLimitExceededException) or status == 429 or "rate limit" in msg.lower():
            return ForgeUnavailable(self._mask(f"{what}: GitHub rate limit ({status} {msg})"),
                                    retry_after=getattr(e, "wait", None) or _retry_after(e.headers))
        if status == 401:
            return ForgeAuthError(self._mask(
                f"{what}: GitHub rejected the credentials (401 {msg}); check GITHUB_TOKEN or the App settings"))
        if status == 403:
            return ForgeAuthError(self._mask(
                f"{what}: permission denied (403 {msg}); the token needs issues, pull requests and contents write"))
        if status == 404:
            return ForgeNotFound(self._mask(
                f"{what}: not found (404); it does not exist or these credentials cannot see it"))
        if status >= 500 or status == 408:
            return ForgeUnavailable(self._mask(f"{what}: GitHub failed ({status} {msg})"))
        return ForgeError(self._mask(f"{what}: GitHub refused the request ({status} {msg})"))

    def _mask(self, text: str) -> str:
        return mask_secrets(text, [self._token] if self._token else [])

    def _askpass(self) -> str:
        """The helper script, (re)written if missing or altered since we wrote it."""
        if self._askpass_dir is None or not os.path.isdir(self._askpass_dir):
            self._askpass_dir = tempfile.mkdtemp(prefix="ccc-askpass-")  # mode 0700
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._askpass_dir, True)
        path = Path(self._askpass_dir, "askpass.sh")
        try:
            ok = path.read_text() == _ASKPASS and stat.S_IMODE(path.stat().st_mode) == 0o700
        except OSError:
            ok = False
        if not ok:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(_ASKPASS)
            tmp.chmod(0o700)
            tmp.replace(path)
        return str(path)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._gh.close()
        if self._finalizer is not None:
            self._finalizer()


def _retry_after(headers: Mapping[str, Any] | None) -> float | None:
    h = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    if h.get("retry-after", "").isdigit():
        return float(h["retry-after"])
    if h.get("x-ratelimit-reset", "").isdigit():
        return max(0.0, int(h["x-ratelimit-reset"]) - time.time()) + 1.0
    return None


def _message(e: GithubException) -> str:
    data: Any = e.data
    if isinstance(data, dict):
        parts = [str(data.get("message") or "")]
        parts += [str(x.get("message") or x.get("code") or "") if isinstance(x, dict) else str(x)
                  for x in data.get("errors") or ()]
        return "; ".join(p for p in parts if p)
    return e.message or str(data or "")
