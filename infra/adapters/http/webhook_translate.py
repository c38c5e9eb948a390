"""GitHub webhook payloads -> issue facts: the pure half of the receiver (no I/O).

:func:`translate` maps one delivery (event name, parsed JSON payload, delivery id) to
the issue facts it stands for, often none; :func:`interpret` also says why not.

Trust: issue text becomes input to a model that runs tools. Work is only started, and
requests only accepted, from authors the trust policy (:class:`events.trust.TrustPolicy`)
trusts: by default those whose ``author_association`` is OWNER, MEMBER or COLLABORATOR,
on the repositories of ``CCC_REPOS`` (all when unset). The facts keep the association,
and the coordinator's intake checks the same policy again (the webhook is not the only
writer of the issue subjects). Accounts of type ``Bot`` (and the bot itself) are never
listened to, so the cluster cannot talk to itself in a loop. Pull-request facts count only for branches
the cluster pushes (``ccc/task-<task_id>-<slug>``, see ``infra.adapters.git.gitops.branch_name``) in
the repository itself: a fork cannot close or review its way into a task.

Dedup ids come from the content, never from the delivery: every fact's ``event_id``
(the ``Nats-Msg-Id``) names what happened, ``<source>:<repo>#<n>:<what>`` (the issue
opened; closed, reopened or edited at a time; a label added at a time; the comment
with that id; the pull request's number and action; the review with that id), so a
redelivered webhook is a no-op, and so is a captured body replayed with a new
``X-GitHub-Delivery``. ``IssueOpened``'s id is the issue's own
(``github:<repo>#<n>:opened``, as :func:`infra.adapters.nats.issue_publisher.opened_event_id`),
because GitHub sends ``opened`` *and* ``labeled`` for an issue created with the
trigger label, and both should collapse into one fact. The comments of one review
share the review's id (``…:pr<m>:review:<id>``), with the review itself: a review with
several inline comments is one fact, and fails at most one attempt.

Freshness: dedup holds for the issue stream's window (24 h). With ``max_age`` (the
receiver always passes one, :data:`DEFAULT_MAX_AGE`) a delivery whose own timestamp
(the issue's ``updated_at``, the comment's ``created_at``, the review's
``submitted_at``, the pull request's ``closed_at``) is older than that is refused as
stale, so a body captured yesterday does nothing today either. A delivery without the
timestamp is refused too: its age cannot be told.

Associations are only the first filter: the receiver
(:mod:`infra.adapters.http.webhook`) asks GitHub for the author's permission on the
repository when it can, and writes it on the fact.

A pull request's way to green (issue 12):

* ``check_run.completed``, ``check_suite.completed``, ``workflow_run.completed`` and a
  ``workflow_run`` waiting for approval (``requested``/``completed`` with conclusion
  ``action_required``) on a task branch of the repository itself (or on a merge-queue
  candidate's branch, ``ccc-queue/<task_id>``) translate into no fact
  but a :class:`CommitChecks`: *this commit's checks may all have finished*. Whether they
  have, and what each one's log says, only the API can tell (which deliveries arrive, and
  in what order, is not to be relied on), so the receiver hands it to the checks
  collector (:mod:`infra.adapters.forge.github_checks`), which publishes
  ``issue.checks_completed`` once the last check of the commit has finished.
* ``pull_request.synchronize`` (a push to the pull request) -> ``issue.checks_started``
  for the new head; ``pull_request.edited`` that changed the base branch, and a ``push``
  to the repository's default branch -> ``issue.base_moved`` (a fact about the
  repository, issue number 0): the open pull requests are checked for conflicts.
* ``pull_request_review.submitted`` as ``approved`` -> ``issue.pr_approved`` (an authored
  fact: the trust policy, and the receiver's permission check, apply as to a comment).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec

from events.errors import CccError
from events.issue import (
    REPOSITORY,
    IssueBaseMoved,
    IssueCancelRequested,
    IssueChangesRequested,
    IssueChecksStarted,
    IssueClosed,
    IssueCommented,
    IssueEdited,
    IssueEvent,
    IssueLabeled,
    IssueOpened,
    IssuePullRequestApproved,
    IssuePullRequestClosed,
    IssuePullRequestMerged,
    IssueReopened,
    IssueRetryRequested,
)
from events.subjects import QUEUE_BRANCH_PREFIX, repo_token, task_id_stem
from events.trust import TRUSTED_ASSOCIATIONS, TrustPolicy

TRUSTED: frozenset[str] = TRUSTED_ASSOCIATIONS  # the default policy's associations
DEFAULT_TRUST = TrustPolicy()
TASK_BRANCH_PREFIX = "ccc/task-"  # gitops.branch_name: ccc/task-<task_id>-<slug>
DEFAULT_MAX_AGE = timedelta(minutes=15)
"""How old a delivery may be. GitHub delivers within seconds, and queues some for a few
minutes when it is busy; a redelivery after a longer outage is refused as stale (widen
the window with ``ccc webhook --max-age`` for it). Far inside the issue stream's 24 h
dedup window, so a replay is either a duplicate or stale, never new."""
_ID_TEXT = re.compile(r"[^A-Za-z0-9_.=-]")
_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # a commit id (SHA-1, or SHA-256 repositories)
_NO_COMMIT = frozenset({"0" * 40, "0" * 64})  # GitHub's "before" of a new branch, "after" of a deleted one
WAITING_FOR_APPROVAL = "action_required"  # a workflow run's conclusion while it waits for a maintainer
BRANCH_REF = "refs/heads/"
_FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


# -- the parts of GitHub's payloads we read (unknown fields are ignored) ---------------
class _User(msgspec.Struct, frozen=True):
    login: str = ""
    type: str = "User"


class _Label(msgspec.Struct, frozen=True):
    name: str


class _Repo(msgspec.Struct, frozen=True):
    full_name: str


class _Issue(msgspec.Struct, frozen=True):
    number: int
    title: str = ""
    body: str | None = None
    labels: list[_Label] = []
    user: _User = _User()
    author_association: str = "NONE"
    html_url: str = ""
    updated_at: datetime | None = None
    closed_at: datetime | None = None
    pull_request: dict | None = None  # present when the "issue" is a pull request


class _Comment(msgspec.Struct, frozen=True):
    id: int
    body: str | None = None
    user: _User = _User()
    author_association: str = "NONE"
    html_url: str = ""
    created_at: datetime | None = None
    path: str = ""  # review comments only
    line: int | None = None
    pull_request_review_id: int | None = None


class _Head(msgspec.Struct, frozen=True):
    ref: str
    sha: str = ""
    repo: _Repo | None = None  # null when the fork was deleted


class _PullRequest(msgspec.Struct, frozen=True):
    number: int
    head: _Head
    base: _Head | None = None
    merged: bool | None = False
    html_url: str = ""
    closed_at: datetime | None = None
    merged_at: datetime | None = None
    updated_at: datetime | None = None


class _Review(msgspec.Struct, frozen=True):
    id: int
    state: str
    body: str | None = None
    user: _User = _User()
    author_association: str = "NONE"
    html_url: str = ""
    submitted_at: datetime | None = None


class _IssuesHook(msgspec.Struct, frozen=True):
    issue: _Issue
    repository: _Repo
    sender: _User = _User()
    label: _Label | None = None


class _IssueCommentHook(msgspec.Struct, frozen=True):
    issue: _Issue
    comment: _Comment
    repository: _Repo
    sender: _User = _User()


class _From(msgspec.Struct, frozen=True):
    was: str = msgspec.field(default="", name="from")


class _BaseChange(msgspec.Struct, frozen=True):
    ref: _From | None = None
    sha: _From | None = None


class _Changes(msgspec.Struct, frozen=True):
    base: _BaseChange | None = None  # only when the edit changed the base branch


class _PullRequestHook(msgspec.Struct, frozen=True):
    pull_request: _PullRequest
    repository: _Repo
    sender: _User = _User()
    before: str = ""  # synchronize: the head before and after the push
    after: str = ""
    changes: _Changes | None = None  # edited: what the edit changed


class _CheckSuite(msgspec.Struct, frozen=True):
    head_sha: str
    head_branch: str | None = None  # null for a commit no branch points at (a tag, a fork's)
    conclusion: str | None = None
    updated_at: datetime | None = None


class _CheckRun(msgspec.Struct, frozen=True):
    head_sha: str
    check_suite: _CheckSuite
    name: str = ""
    conclusion: str | None = None
    completed_at: datetime | None = None


class _WorkflowRun(msgspec.Struct, frozen=True):
    head_sha: str
    head_branch: str | None = None
    status: str | None = None
    conclusion: str | None = None
    updated_at: datetime | None = None
    head_repository: _Repo | None = None  # the fork's, for a run of a fork's pull request


class _CheckRunHook(msgspec.Struct, frozen=True):
    check_run: _CheckRun
    repository: _Repo
    sender: _User = _User()


class _CheckSuiteHook(msgspec.Struct, frozen=True):
    check_suite: _CheckSuite
    repository: _Repo
    sender: _User = _User()


class _WorkflowRunHook(msgspec.Struct, frozen=True):
    workflow_run: _WorkflowRun
    repository: _Repo
    sender: _User = _User()


class _PushRepo(msgspec.Struct, frozen=True):
    full_name: str
    default_branch: str = ""
    pushed_at: int | float | datetime | None = None  # a push's payload has epoch seconds here


class _PushHook(msgspec.Struct, frozen=True):
    ref: str
    after: str
    repository: _PushRepo
    before: str = ""
    deleted: bool = False
    sender: _User = _User()


class _ReviewHook(msgspec.Struct, frozen=True):
    review: _Review
    pull_request: _PullRequest
    repository: _Repo
    sender: _User = _User()


class _ReviewCommentHook(msgspec.Struct, frozen=True):
    comment: _Comment
    pull_request: _PullRequest
    repository: _Repo
    sender: _User = _User()


# -- translation (pure) ------------------------------------------------------------------
class BadPayload(CccError):
    """The delivery is signed but its payload is not the shape GitHub documents."""


class CommitChecks(msgspec.Struct, frozen=True, kw_only=True):
    """A commit of a task branch whose checks may all have finished (a check run, a check
    suite or a workflow run of it did): what the checks collector is asked to read
    (:class:`infra.adapters.forge.github_checks.GitHubChecks`). Not a fact: the API, not
    the delivery, says whether every check has finished and how."""

    source: str
    repo: str
    number: int  # the issue the branch is the task of
    head_sha: str
    branch: str
    trigger: str  # the delivery that asked ("check_suite.completed"), for the logs
    actor: str = "github"
    candidate: bool = False  # a merge-queue candidate's branch, not the task's pull request


class Translation(NamedTuple):
    events: list[IssueEvent]
    reason: str = ""  # why nothing was emitted, when nothing was
    stale: bool = False  # refused for its age (a replay, or a very late redelivery)
    checks: CommitChecks | None = None  # a commit whose checks the API has to be asked about


class _Ctx(NamedTuple):
    source: str
    trigger_label: str
    bot_name: str
    trust: TrustPolicy
    now: datetime


def is_signed(secret: str | bytes, body: bytes, signature: str | None) -> bool:
    """``signature`` is ``sha256=<hex HMAC-SHA256(secret, body)>``; constant-time compare."""
    if not signature or not secret:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.strip().encode("utf-8", "replace"))


def sign(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` GitHub would send (tests, replaying a delivery)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def mentions(text: str, bot_name: str) -> bool:
    return _mention(bot_name).search(_unquoted(text)) is not None


@functools.lru_cache(maxsize=8)
def _mention(bot_name: str) -> re.Pattern[str]:
    # a login is [A-Za-z0-9-]; "@ccc-bot" and "me@ccc.io" are not "@ccc"
    return re.compile(rf"(?<![\w@/.-])@{re.escape(bot_name)}(?![\w-])", re.IGNORECASE)


def _unquoted(text: str) -> str:
    """Drop quoted replies and fenced code: quoting ``@ccc cancel`` is not asking again."""
    text = _FENCED.sub("", text or "")
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(">"))


def task_issue_number(branch: str, repo: str, source: str = "github") -> int | None:
    """The issue number of a cluster branch of ``repo``'s issues from ``source``, else
    None. Anchored on the task ids' stem (:func:`events.subjects.task_id_stem`), so ids
    with ``-`` in them (``gh-octo-org_my-app-7``) parse exactly. The branches of tasks
    created before task ids carried their source (``ccc/task-octo-org_my-app-7-…``) are
    recognised too: their pull requests may still be open."""
    for stem in dict.fromkeys((task_id_stem(repo, source), repo_token(repo))):
        prefix = f"{TASK_BRANCH_PREFIX}{stem}-"
        if branch.startswith(prefix) and (m := re.match(r"(\d+)(?:-|$)", branch[len(prefix):])):
            return int(m.group(1))
    return None


def queue_issue_number(branch: str, repo: str, source: str = "github") -> int | None:
    """The issue number of a merge-queue candidate branch of ``repo``'s issues
    (``ccc-queue/<task_id>``: the base with the task's branch merged, which CI tests
    before the base moves to it), else None."""
    prefix = f"{QUEUE_BRANCH_PREFIX}{task_id_stem(repo, source)}-"
    if branch.startswith(prefix) and (m := re.fullmatch(r"(\d+)", branch[len(prefix):])):
        return int(m.group(1))
    return None


def translate(event_name: str, payload: Any, delivery_id: str, *, trigger_label: str = "ccc",
              bot_name: str = "ccc", source: str = "github", trust: TrustPolicy = DEFAULT_TRUST,
              now: datetime | None = None, max_age: timedelta | None = None) -> list[IssueEvent]:
    """The issue facts one delivery stands for (often none). Raises :class:`BadPayload`."""
    return interpret(event_name, payload, delivery_id, trigger_label=trigger_label,
                     bot_name=bot_name, source=source, trust=trust, now=now, max_age=max_age).events


def interpret(event_name: str, payload: Any, delivery_id: str, *, trigger_label: str = "ccc",
              bot_name: str = "ccc", source: str = "github", trust: TrustPolicy = DEFAULT_TRUST,
              now: datetime | None = None, max_age: timedelta | None = None) -> Translation:
    """Like :func:`translate`, with the reason when the delivery is ignored.

    ``max_age``: refuse a delivery whose own timestamp is older than that (relative to
    ``now``); None checks no age (the pure translation, as tests use it)."""
    if not isinstance(payload, dict):
        raise BadPayload("the payload is not a JSON object")
    action = payload.get("action")
    handler = _HANDLERS.get((event_name, action if isinstance(action, str) else ""))
    if handler is None:
        return Translation([], f"not handled: {event_name}" + (f".{action}" if action else ""))
    shape, fn, stamp = handler
    try:
        hook = msgspec.convert(payload, shape)
    except msgspec.ValidationError as e:
        raise BadPayload(f"{event_name}.{action}: {e}") from None
    if why := trust.repo_refusal(hook.repository.full_name):
        return Translation([], why)  # every hook names its repository
    now = now or datetime.now(UTC)
    if max_age is not None and (why := _staleness(stamp(hook), now, max_age, f"{event_name}.{action}")):
        return Translation([], why, stale=True)
    # (the delivery id is not used: the facts' ids come from their content)
    return fn(hook, _Ctx(source, trigger_label.lower(), bot_name, trust, now))


def _staleness(at: datetime | None, now: datetime, max_age: timedelta, what: str) -> str:
    """Why a delivery made at ``at`` is too old to act on, or "". A time in the future is
    accepted: a replay is always of the past, and clocks differ by a little."""
    if at is None:
        return f"stale: {what} carries no timestamp, so its age cannot be checked"
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # GitHub writes UTC ("Z"); never compare naive with aware
    age = now - at
    if age <= max_age:
        return ""
    return (f"stale: {what} of {at.isoformat()} is {_minutes(age)} old, more than the "
            f"{_minutes(max_age)} allowed (a replayed delivery, or redelivered too late)")


def _minutes(d: timedelta) -> str:
    return f"{d.total_seconds() / 60:.0f} min" if d < timedelta(days=2) else f"{d.days} days"


def _at(at: datetime | None) -> str:
    """A timestamp as an id's part: epoch seconds (what GitHub's timestamps resolve)."""
    return "-" if at is None else str(int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _base(ctx: _Ctx, repo: str, number: int, what: str, at: datetime | None, sender: _User) -> dict:
    """The envelope of a fact; its id says what happened (``what``), not which delivery
    said so (the module docstring)."""
    return {"event_id": f"{ctx.source}:{repo}#{number}:{what}", "source": ctx.source, "repo": repo,
            "number": number, "occurred_at": at or ctx.now,
            "actor": f"github:{sender.login}" if sender.login else "github"}


def _is_bot(user: _User, ctx: _Ctx) -> bool:
    login = user.login.lower()
    return user.type == "Bot" or login in (ctx.bot_name.lower(), f"{ctx.bot_name.lower()}[bot]")


def _untrusted(user: _User, association: str, ctx: _Ctx) -> str:
    """Why this author is not listened to, or "" if they are."""
    if _is_bot(user, ctx):
        return f"author {user.login or '?'} is a bot"
    return ctx.trust.author_refusal(user.login or "?", association)


def _triggered(issue: _Issue, ctx: _Ctx) -> bool:
    return (any(label.name.lower() == ctx.trigger_label for label in issue.labels)
            or mentions(f"{issue.title}\n{issue.body or ''}", ctx.bot_name))


def _opened(hook: _IssuesHook, ctx: _Ctx) -> IssueOpened:
    issue, repo = hook.issue, hook.repository.full_name
    return IssueOpened(  # the id as issue_publisher.opened_event_id derives it
        **_base(ctx, repo, issue.number, "opened", issue.updated_at, hook.sender),
        title=issue.title, body=issue.body or "", labels=tuple(lbl.name for lbl in issue.labels),
        url=issue.html_url, author=issue.user.login, author_association=issue.author_association,
    )


def _on_issue(hook: _IssuesHook, ctx: _Ctx, action: str) -> Translation:
    issue, repo = hook.issue, hook.repository.full_name
    if issue.pull_request is not None:
        return Translation([], "a pull request, not an issue")
    if why := _untrusted(issue.user, issue.author_association, ctx):
        return Translation([], why)
    if action == "opened":
        if not _triggered(issue, ctx):
            return Translation([], f"no {ctx.trigger_label!r} label and no @{ctx.bot_name} mention")
        return Translation([_opened(hook, ctx)])

    def base(what: str, at: datetime | None = issue.updated_at) -> dict:
        return _base(ctx, repo, issue.number, what, at, hook.sender)

    if action == "closed":  # no trigger check: the label may be gone by now
        at = issue.closed_at or issue.updated_at
        return Translation([IssueClosed(**base(f"closed:{_at(at)}", at))])
    if action == "reopened":
        return Translation([IssueReopened(**base(f"reopened:{_at(issue.updated_at)}"))])
    if not _triggered(issue, ctx):
        return Translation([], f"issue #{issue.number} is not for @{ctx.bot_name}")
    if action == "edited":  # the text in the id too: two edits within one second are two facts
        what = f"edited:{_at(issue.updated_at)}:{_digest(issue.title, issue.body or '')}"
        return Translation([IssueEdited(**base(what), title=issue.title, body=issue.body or "")])
    # labeled: the trigger added later starts work too; the IssueOpened id is the issue's,
    # so with the "opened" of an issue created with the label it is one fact, not two
    label = hook.label.name if hook.label else ""
    what = f"labeled:{_ID_TEXT.sub('=', label)[:64]}:{_at(issue.updated_at)}"
    labeled = IssueLabeled(**base(what), label=label, labels=tuple(lbl.name for lbl in issue.labels))
    if label.lower() == ctx.trigger_label:
        return Translation([_opened(hook, ctx), labeled])
    return Translation([labeled])


def _on_comment(hook: _IssueCommentHook, ctx: _Ctx) -> Translation:
    issue, comment, repo = hook.issue, hook.comment, hook.repository.full_name
    if why := _untrusted(comment.user, comment.author_association, ctx):
        return Translation([], why)
    if issue.pull_request is not None:
        # the payload has no head branch to map the PR to its task; reviews do
        return Translation([], "a comment on a pull request: comment on the issue or review the PR")
    text = _unquoted(comment.body or "")
    m = _mention(ctx.bot_name).search(text)
    if m is None:
        return Translation([], f"not addressed to @{ctx.bot_name}")
    request = text[m.end():].strip()
    verb, rest = [*request.split(maxsplit=1), "", ""][:2]
    verb, who = verb.strip(".,:;!").lower(), comment.user.login
    base = _base(ctx, repo, issue.number, f"comment:{comment.id}", comment.created_at, hook.sender)
    # the author travels with the request: the intake checks it again
    author = {"author": who, "author_association": comment.author_association}
    if verb == "retry":
        return Translation([IssueRetryRequested(**base, **author,
                                                reason=rest.strip() or f"retry requested by {who}")])
    if verb in ("cancel", "stop"):
        return Translation([IssueCancelRequested(**base, **author,
                                                 reason=rest.strip() or f"cancelled by {who}")])
    if not request:
        return Translation([], f"@{ctx.bot_name} mentioned with no request")
    return Translation([IssueCommented(
        **base, comment_id=comment.id, body=comment.body or "", request=request,
        author=comment.user.login, author_association=comment.author_association, url=comment.html_url,
    )])


def _task_pr(pr: _PullRequest, repo: str) -> int | None:
    if pr.head.repo is None or pr.head.repo.full_name.lower() != repo.lower():
        return None  # from a fork: anyone can name a branch ccc/task-...
    return task_issue_number(pr.head.ref, repo)


def _on_pr_closed(hook: _PullRequestHook, ctx: _Ctx) -> Translation:
    pr, repo = hook.pull_request, hook.repository.full_name
    number = _task_pr(pr, repo)
    if number is None:
        return Translation([], f"branch {pr.head.ref!r} is not a task branch of {repo}")
    if pr.merged:  # once only: a merged pull request stays merged
        base = _base(ctx, repo, number, f"pr{pr.number}:merged", pr.merged_at or pr.closed_at, hook.sender)
        return Translation([IssuePullRequestMerged(**base, pr_number=pr.number, branch=pr.head.ref)])
    # closed, reopened, closed again: each closing is a fact of its own
    base = _base(ctx, repo, number, f"pr{pr.number}:closed:{_at(pr.closed_at)}", pr.closed_at, hook.sender)
    return Translation([IssuePullRequestClosed(**base, pr_number=pr.number, branch=pr.head.ref)])


def _changes(hook: _ReviewHook | _ReviewCommentHook, ctx: _Ctx, author: _User, association: str,
             at: datetime | None, **fields: Any) -> Translation:
    pr, repo = hook.pull_request, hook.repository.full_name
    if why := _untrusted(author, association, ctx):
        return Translation([], why)
    number = _task_pr(pr, repo)
    if number is None:
        return Translation([], f"branch {pr.head.ref!r} is not a task branch of {repo}")
    # grouped by review: the review and each of its inline comments carry one id, so the
    # first to arrive is the fact and the rest are duplicates (one review, one failed
    # attempt); a comment GitHub gives no review is a review of its own
    review, comment = fields.get("review_id"), fields.get("comment_id")
    what = f"pr{pr.number}:" + (f"review:{review}" if review is not None else f"review-comment:{comment}")
    return Translation([IssueChangesRequested(
        **_base(ctx, repo, number, what, at, hook.sender), pr_number=pr.number, branch=pr.head.ref,
        author=author.login, author_association=association, **fields,
    )])


def _on_review(hook: _ReviewHook, ctx: _Ctx) -> Translation:
    review = hook.review
    if review.state.lower() == "approved":
        return _approved(hook, ctx)
    if review.state.lower() != "changes_requested":
        return Translation([], f"review state {review.state!r}, not changes_requested or approved")
    return _changes(hook, ctx, review.user, review.author_association, review.submitted_at,
                    body=review.body or "", review_id=review.id, url=review.html_url)


def _approved(hook: _ReviewHook, ctx: _Ctx) -> Translation:
    """An approval counts once per review (its id), from a trusted reviewer, of a task's
    pull request; the intake checks the reviewer's trust again."""
    pr, review, repo = hook.pull_request, hook.review, hook.repository.full_name
    if why := _untrusted(review.user, review.author_association, ctx):
        return Translation([], why)
    number = _task_pr(pr, repo)
    if number is None:
        return Translation([], f"branch {pr.head.ref!r} is not a task branch of {repo}")
    base = _base(ctx, repo, number, f"pr{pr.number}:review:{review.id}", review.submitted_at, hook.sender)
    return Translation([IssuePullRequestApproved(
        **base, pr_number=pr.number, branch=pr.head.ref, author=review.user.login,
        author_association=review.author_association)])


def _on_review_comment(hook: _ReviewCommentHook, ctx: _Ctx) -> Translation:
    c = hook.comment
    return _changes(hook, ctx, c.user, c.author_association, c.created_at, body=c.body or "",
                    review_id=c.pull_request_review_id, comment_id=c.id, path=c.path, line=c.line,
                    url=c.html_url)


def _on_pr_synchronize(hook: _PullRequestHook, ctx: _Ctx) -> Translation:
    pr, repo = hook.pull_request, hook.repository.full_name
    number = _task_pr(pr, repo)
    if number is None:
        return Translation([], f"branch {pr.head.ref!r} is not a task branch of {repo}")
    head = _commit(hook.after or pr.head.sha, "pull_request.synchronize: after")
    base = _base(ctx, repo, number, f"pr{pr.number}:sync:{head}", pr.updated_at, hook.sender)
    return Translation([IssueChecksStarted(**base, head_sha=head, branch=pr.head.ref)])


def _on_pr_edited(hook: _PullRequestHook, ctx: _Ctx) -> Translation:
    """A task's pull request moved to another base branch: its conflicts are to be
    checked against that branch. The fact is about the repository (number 0), as a push
    to the base is; its id names the pull request, so it is not taken for that push."""
    pr, repo = hook.pull_request, hook.repository.full_name
    change = hook.changes.base if hook.changes is not None else None
    if change is None or pr.base is None:
        return Translation([], "pull request edited, its base branch unchanged")
    if _task_pr(pr, repo) is None:
        return Translation([], f"branch {pr.head.ref!r} is not a task branch of {repo}")
    sha = _commit(pr.base.sha, "pull_request.edited: base.sha")
    before = change.sha.was if change.sha is not None and _SHA.match(change.sha.was) else ""
    what = f"pr{pr.number}:base:{_ID_TEXT.sub('=', pr.base.ref)[:100]}:{sha}"
    return Translation([IssueBaseMoved(**_base(ctx, repo, REPOSITORY, what, pr.updated_at, hook.sender),
                                       branch=pr.base.ref, sha=sha, before=before)])


def _on_push(hook: _PushHook, ctx: _Ctx) -> Translation:
    """A push to the default branch moved the base of the cluster's pull requests."""
    repo, branch = hook.repository.full_name, hook.ref.removeprefix(BRANCH_REF)
    if not hook.ref.startswith(BRANCH_REF):
        return Translation([], f"a push to {hook.ref}, not to a branch")
    if hook.deleted or hook.after in _NO_COMMIT:
        return Translation([], f"branch {branch!r} deleted")
    if branch != hook.repository.default_branch:
        return Translation([], f"a push to {branch!r}, not to the default branch "
                               f"{hook.repository.default_branch or '?'!r}")
    sha = _commit(hook.after, "push: after")
    before = hook.before if _SHA.match(hook.before) and hook.before not in _NO_COMMIT else ""
    what = f"base:{_ID_TEXT.sub('=', branch)[:100]}:{sha}"
    return Translation([IssueBaseMoved(**_base(ctx, repo, REPOSITORY, what, _pushed_at(hook), hook.sender),
                                       branch=branch, sha=sha, before=before)])


def _pushed_at(hook: _PushHook) -> datetime | None:
    at = hook.repository.pushed_at
    if isinstance(at, (int, float)) and not isinstance(at, bool):
        return datetime.fromtimestamp(at, UTC)
    return at if isinstance(at, datetime) else None


def _commit(sha: str, what: str) -> str:
    """A commit id from a payload, checked: it goes into ids, subjects' facts and API paths."""
    if not _SHA.match(sha or ""):
        raise BadPayload(f"{what}: not a commit id: {sha[:80]!r}")
    return sha


def _commit_checks(hook: _CheckRunHook | _CheckSuiteHook | _WorkflowRunHook, ctx: _Ctx, trigger: str,
                   head_sha: str, branch: str | None) -> Translation:
    repo = hook.repository.full_name
    number = task_issue_number(branch or "", repo)
    candidate = number is None and (number := queue_issue_number(branch or "", repo)) is not None
    if number is None:
        return Translation([], f"branch {branch!r} is not a task branch of {repo}")
    sender = hook.sender
    return Translation([], checks=CommitChecks(
        source=ctx.source, repo=repo, number=number, head_sha=_commit(head_sha, f"{trigger}: head_sha"),
        branch=branch or "", trigger=trigger, actor=f"github:{sender.login}" if sender.login else "github",
        candidate=candidate))


def _on_check_run(hook: _CheckRunHook, ctx: _Ctx) -> Translation:
    run = hook.check_run
    return _commit_checks(hook, ctx, "check_run.completed", run.head_sha, run.check_suite.head_branch)


def _on_check_suite(hook: _CheckSuiteHook, ctx: _Ctx) -> Translation:
    suite = hook.check_suite
    return _commit_checks(hook, ctx, "check_suite.completed", suite.head_sha, suite.head_branch)


def _on_workflow_run(hook: _WorkflowRunHook, ctx: _Ctx, action: str) -> Translation:
    run, repo = hook.workflow_run, hook.repository.full_name
    if action == "requested" and run.conclusion != WAITING_FOR_APPROVAL:
        return Translation([], "workflow run requested: its result comes when it completes")
    if run.head_repository is not None and run.head_repository.full_name.lower() != repo.lower():
        return Translation([], f"a workflow run of {run.head_repository.full_name}, a fork")
    return _commit_checks(hook, ctx, f"workflow_run.{action}", run.head_sha, run.head_branch)


# (event, action) -> (payload shape, translation, the delivery's own time: what its age is)
_HANDLERS: dict[tuple[str, str], tuple[type, Callable[[Any, _Ctx], Translation],
                                       Callable[[Any], datetime | None]]] = {
    **{("issues", a): (_IssuesHook, lambda h, c, a=a: _on_issue(h, c, a), lambda h: h.issue.updated_at)
       for a in ("opened", "edited", "labeled", "closed", "reopened")},
    ("issue_comment", "created"): (_IssueCommentHook, _on_comment, lambda h: h.comment.created_at),
    ("pull_request", "closed"): (_PullRequestHook, _on_pr_closed,
                                 lambda h: h.pull_request.closed_at or h.pull_request.updated_at),
    ("pull_request_review", "submitted"): (_ReviewHook, _on_review, lambda h: h.review.submitted_at),
    ("pull_request_review_comment", "created"): (_ReviewCommentHook, _on_review_comment,
                                                 lambda h: h.comment.created_at),
    ("pull_request", "synchronize"): (_PullRequestHook, _on_pr_synchronize, lambda h: h.pull_request.updated_at),
    ("pull_request", "edited"): (_PullRequestHook, _on_pr_edited, lambda h: h.pull_request.updated_at),
    ("push", ""): (_PushHook, _on_push, _pushed_at),
    ("check_run", "completed"): (_CheckRunHook, _on_check_run, lambda h: h.check_run.completed_at),
    ("check_suite", "completed"): (_CheckSuiteHook, _on_check_suite, lambda h: h.check_suite.updated_at),
    **{("workflow_run", a): (_WorkflowRunHook, lambda h, c, a=a: _on_workflow_run(h, c, a),
                             lambda h: h.workflow_run.updated_at) for a in ("completed", "requested")},
}
