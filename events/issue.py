"""Issue facts from outside (webhook, CLI, ``nats pub``): the intake's input.

These are not an aggregate of ours; they are observations. ``event_id`` is the
deduplication id (a GitHub delivery id, or one the CLI derives).

The facts a person writes carry ``author_association`` (GitHub's word for the author's
role on the repository). A fact without it is ``NONE``: trusted with nothing, so a
plain ``nats pub`` cannot start work by leaving the field out (the intake re-checks it,
:mod:`events.trust`). Until issue 10 the default of ``IssueOpened`` was ``OWNER``; old
messages that relied on it now read as ``NONE`` (:mod:`events.trust` says why that is
the intended reading of an old log).

They may also carry ``author_permission``: the author's permission on the repository
as the forge's API reported it when the fact was received (GitHub's collaborator
permission: ``admin``, ``maintain``, ``write``, ``triage``, ``read`` or ``none``). Empty
means not looked up; the trust policy says when that is enough (:mod:`events.trust`).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from events.checks import CheckRun
from events.subjects import issue_subject

REPOSITORY = 0  # the issue number of a fact about the repository itself (its base moved)


class IssueEventBase(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False, omit_defaults=True
):
    event_id: str
    source: str = "local"
    repo: str
    number: int
    occurred_at: datetime
    actor: str = ""

    @property
    def rel_subject(self) -> str:
        return issue_subject(
            self.source, self.repo, self.number, self.__struct_config__.tag.split(".", 1)[1]
        )


class IssueOpened(IssueEventBase, tag="issue.opened"):
    title: str
    body: str = ""
    labels: tuple[str, ...] = ()
    url: str = ""
    author: str = ""
    author_association: str = "NONE"  # missing: trusted with nothing (events.trust)
    author_permission: str = ""  # the forge's answer when received; "" not looked up


class IssueEdited(IssueEventBase, tag="issue.edited"):
    title: str
    body: str = ""


class IssueLabeled(IssueEventBase, tag="issue.labeled"):
    label: str
    labels: tuple[str, ...] = ()


class IssueClosed(IssueEventBase, tag="issue.closed"):
    pass


class IssueReopened(IssueEventBase, tag="issue.reopened"):
    pass


class IssuePullRequestMerged(IssueEventBase, tag="issue.pr_merged"):
    """The pull request that resolves this issue was merged (forge fact)."""

    pr_number: int | None = None
    branch: str = ""


class IssuePullRequestClosed(IssueEventBase, tag="issue.pr_closed"):
    """The pull request was closed without merging: rejected."""

    pr_number: int | None = None
    branch: str = ""
    reason: str = "pull request closed without merging"


class IssueCancelRequested(IssueEventBase, tag="issue.cancel_requested"):
    reason: str = ""
    author: str = ""  # who asked: a comment's author, or the CLI's operator
    author_association: str = "NONE"
    author_permission: str = ""


class IssueRetryRequested(IssueEventBase, tag="issue.retry_requested"):
    reason: str = ""
    author: str = ""
    author_association: str = "NONE"
    author_permission: str = ""


class IssueCommented(IssueEventBase, tag="issue.commented"):
    """A trusted person addressed the bot on the issue with a free-text request
    (``@ccc please also cover the CLI``). ``request`` is the text after the mention;
    ``body`` the whole comment, for context."""

    comment_id: int | None = None
    body: str = ""
    request: str = ""
    author: str = ""
    author_association: str = "NONE"
    author_permission: str = ""
    url: str = ""


class IssueChangesRequested(IssueEventBase, tag="issue.changes_requested"):
    """A trusted reviewer asked for changes on the task's pull request: a review
    submitted as "changes requested" (``review_id``, no ``comment_id``) or one
    inline review comment (``comment_id``, with ``path``/``line``). The inline comments
    of one review share its ``review_id``, so a consumer can group them."""

    pr_number: int | None = None
    branch: str = ""
    body: str = ""
    author: str = ""
    author_association: str = "NONE"
    author_permission: str = ""
    review_id: int | None = None
    comment_id: int | None = None
    path: str = ""
    line: int | None = None
    url: str = ""


class IssueChecksCompleted(IssueEventBase, tag="issue.checks_completed"):
    """Every check of one commit of the issue's pull request has finished (forge fact:
    the local forge's CI, or GitHub's check suites and workflow runs). ``base`` holds
    the same checks' conclusions on the base commit, where the forge knows them."""

    head_sha: str
    branch: str = ""
    pr_number: int | None = None
    checks: tuple[CheckRun, ...] = ()
    base_sha: str = ""
    base: dict[str, str] = {}


class IssueChecksStarted(IssueEventBase, tag="issue.checks_started"):
    """Checks began on a commit of the issue's pull request (informational: the task
    already waits for them from the push on)."""

    head_sha: str
    branch: str = ""
    names: tuple[str, ...] = ()


class IssuePullRequestApproved(IssueEventBase, tag="issue.pr_approved"):
    """A reviewer approved the issue's pull request (GitHub: a review submitted as
    "approved"; locally: ``ccc pr approve``). Only a trusted reviewer's counts."""

    pr_number: int | None = None
    branch: str = ""
    author: str = ""
    author_association: str = "NONE"
    author_permission: str = ""


class IssueBaseMoved(IssueEventBase, tag="issue.base_moved"):
    """A branch of the repository moved (a push to it, or a merge): the open pull
    requests based on it are checked for conflicts. A fact about the repository, not an
    issue: its ``number`` is :data:`REPOSITORY` (0)."""

    number: int = REPOSITORY
    branch: str = ""
    sha: str = ""
    before: str = ""


IssueEvent = (
    IssueOpened
    | IssueEdited
    | IssueLabeled
    | IssueClosed
    | IssueReopened
    | IssuePullRequestMerged
    | IssuePullRequestClosed
    | IssueCancelRequested
    | IssueRetryRequested
    | IssueCommented
    | IssueChangesRequested
    | IssueChecksCompleted
    | IssueChecksStarted
    | IssuePullRequestApproved
    | IssueBaseMoved
)

issue_decoder = msgspec.json.Decoder(IssueEvent)
