"""GitHub as the forge, through PyGithub: what an agent needs (clone URL, git
credentials, opening a pull request) and what the forge sync needs (read an issue,
one ``ccc:*`` state label, one tracking comment per task, a pull request's state), and
what the webhook receiver needs (an author's permission on a repository, cached).

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
Errors (:mod:`infra.adapters.forge.errors`): network trouble, 5xx and rate limits ->
:class:`ForgeUnavailable` (retryable); 401/403 -> :class:`ForgeAuthError`, 404 ->
:class:`ForgeNotFound` (not retryable).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from github import Auth, Github, GithubException, GithubRetry

from events.errors import ConfigError
from events.secrets import add_secrets
from events.subjects import repo_parts

from infra.adapters.forge.github_api import check_github_repo, error_message
from infra.adapters.forge.github_issues import IssueSync
from infra.adapters.git import gitops

DEFAULT_API_URL = "https://api.github.com"
GIT_USERNAME = "x-access-token"  # what GitHub expects with an installation token (and accepts with a PAT)
_CLOSES = r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s*:?\s+(?:[\w.-]+/[\w.-]+)?#{n}\b"
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


def _read_key(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"GitHub App private key: no such file {path}")
    return path.read_text()


class GitHubForge(IssueSync):
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
        permission_ttl: float = 300.0,
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
            key = _read_key(app_private_key)
            add_secrets(key)
            try:
                auth = Auth.AppAuth(app_id, key).get_installation_auth(int(installation_id))
            except ValueError:
                raise ConfigError(f"GITHUB_APP_INSTALLATION_ID: not a number: {installation_id!r}") from None
        elif env.get("GITHUB_TOKEN"):
            self._token = env["GITHUB_TOKEN"]
            auth = Auth.Token(self._token)
        else:
            raise ConfigError("GitHub: no credentials; set GITHUB_TOKEN, or GITHUB_APP_ID, "
                              "GITHUB_APP_PRIVATE_KEY(_PATH) and GITHUB_APP_INSTALLATION_ID")
        self._auth = auth
        if self._token:
            add_secrets(self._token)  # masked everywhere from now on (events, artifacts, logs)
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
        # authors' permissions, for the webhook receiver: how long an answer is trusted
        # (a revoked write access counts after at most this long)
        self.permission_ttl = permission_ttl
        self.permission_lookups = 0
        self._permissions: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._permission_locks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._askpass_dir: str | None = None
        self._finalizer: weakref.finalize | None = None

    # -- ForgeClient (what an agent uses) ---------------------------------------------
    def clone_url(self, repo: str) -> str:
        """Where to clone from; never carries credentials."""
        repo = check_github_repo(repo)
        owner, name = repo_parts(repo)
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
        add_secrets(password)  # an App's installation token is minted at run time
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
        repo = check_github_repo(repo)
        owner, _ = repo_parts(repo)
        body = ensure_closes(body, issue_number)

        def run() -> tuple[str, int]:
            r = self._gh.get_repo(repo)
            try:
                pr = r.create_pull(base=base, head=branch, title=title, body=body, draft=draft)
            except GithubException as e:
                text = error_message(e).lower()
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

    # -- plumbing -------------------------------------------------------------------
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
