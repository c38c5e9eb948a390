"""What the forge sync needs from GitHub: read an issue, keep one ``ccc:*`` state
label on it, keep one tracking comment per task, read a pull request's state; and what
the webhook receiver needs: an author's permission on a repository.
:class:`IssueSync` holds those calls; :class:`~infra.adapters.forge.github.GitHubForge`
inherits them."""

from __future__ import annotations

import asyncio
import re
import time
import weakref
from collections import OrderedDict

import msgspec
from github import Github, GithubException, UnknownObjectException

from events.task import IssueRef

from infra.adapters.forge.errors import ForgeError, ForgeNotFound
from infra.adapters.forge.github_api import GitHubCalls, check_github_repo

STATE_LABELS: dict[str, tuple[str, str]] = {  # name -> (colour, description)
    "ccc:queued": ("fbca04", "claude-code-cluster: waiting for an agent"),
    "ccc:in-progress": ("1d76db", "claude-code-cluster: an agent is working on it"),
    "ccc:checking": ("c5def5", "claude-code-cluster: pull request open, checks running"),
    "ccc:checks-failed": ("e99695", "claude-code-cluster: checks failed, deciding what next"),
    "ccc:review": ("5319e7", "claude-code-cluster: pull request green, waiting for review"),
    "ccc:needs-human": ("b60205", "claude-code-cluster: a person must act (see the comment)"),
    "ccc:conflicted": ("f9d0c4", "claude-code-cluster: conflicts with its base, rebasing"),
    "ccc:merge-queue": ("0052cc", "claude-code-cluster: in the merge queue"),
    "ccc:done": ("0e8a16", "claude-code-cluster: done"),
    "ccc:failed": ("d73a4a", "claude-code-cluster: failed"),
    "ccc:cancelled": ("cfd3d7", "claude-code-cluster: cancelled"),
}
LABEL_PREFIX = "ccc:"
_LOGIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$")  # GitHub's rule for a user's login
MAX_PERMISSIONS_CACHED = 10_000


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


class IssueSync(GitHubCalls):
    """The forge sync's calls on issues and pull requests; the client (``_gh``) and
    the caches are set up by :class:`~infra.adapters.forge.github.GitHubForge`."""

    _gh: Github
    _known_labels: set[tuple[str, str]]
    _comments: OrderedDict[tuple[str, int, str], tuple[int, str]]
    permission_ttl: float
    permission_lookups: int  # API calls made for permissions (the cache's misses)
    _permissions: OrderedDict[tuple[str, str], tuple[str, float]]
    _permission_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock]

    # -- what the webhook receiver uses -----------------------------------------------
    async def author_permission(self, repo: str, login: str) -> str:
        """``login``'s permission on ``repo`` as GitHub's collaborator-permission API
        says it (``admin``, ``write``, ``read`` or ``none``; ``maintain`` and ``triage``
        where GitHub reports them), remembered for ``permission_ttl`` seconds.

        The cache is what keeps a busy repository (or someone posting comments to make
        us call GitHub) from spending the rate limit: one call per author and repository
        per TTL, and concurrent lookups of one author share the call. A revoked
        permission is therefore honoured after at most the TTL. An answer of "not
        found" (no such user, or a repository these credentials cannot see) is
        ``none``, and cached like any other; a failure (network, 5xx, rate limit,
        rejected credentials) raises and is not cached, so nobody is trusted on it."""
        repo = check_github_repo(repo)
        if not _LOGIN.match(login or ""):
            return "none"  # not a user's login (a bot's "x[bot]", or nothing): no one to ask about
        key = (repo.lower(), login.lower())
        if (cached := self._cached_permission(key)) is not None:
            return cached
        lock = self._permission_locks.get(key)
        if lock is None:
            lock = self._permission_locks[key] = asyncio.Lock()
        async with lock:  # the first caller asks; the others find its answer in the cache
            if (cached := self._cached_permission(key)) is not None:
                return cached
            answer = await self._ask_permission(repo, login)
            self._permissions[key] = (answer, time.monotonic() + self.permission_ttl)
            self._permissions.move_to_end(key)
            while len(self._permissions) > MAX_PERMISSIONS_CACHED:
                self._permissions.popitem(last=False)
            return answer

    def _cached_permission(self, key: tuple[str, str]) -> str | None:
        hit = self._permissions.get(key)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    async def _ask_permission(self, repo: str, login: str) -> str:
        def run() -> str:
            return str(self._gh.get_repo(repo).get_collaborator_permission(login) or "none").lower()

        self.permission_lookups += 1
        try:
            return await self._run(f"read {login}'s permission on {repo}", run)
        except ForgeNotFound:
            return "none"

    # -- what the forge sync uses ---------------------------------------------------
    async def read_issue(self, repo: str, number: int) -> IssueRef:
        repo = check_github_repo(repo)

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
        repo = check_github_repo(repo)

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
        repo = check_github_repo(repo)
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
        repo = check_github_repo(repo)

        def run() -> PullRequestInfo:
            pr = self._gh.get_repo(repo).get_pull(int(number)).complete()
            return PullRequestInfo(number=pr.number, state=pr.state, merged=bool(pr.merged),
                                   draft=bool(pr.draft), html_url=pr.html_url, head=pr.head.ref,
                                   base=pr.base.ref)

        return await self._run(f"read pull request {repo}#{number}", run)
