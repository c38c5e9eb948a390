"""Issue facts from outside (webhook, CLI, ``nats pub``): the intake's input.

These are not an aggregate of ours; they are observations. ``event_id`` is the
deduplication id (a GitHub delivery id, or one the CLI derives).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from .subjects import issue_subject


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
    author_association: str = "OWNER"


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


class IssueRetryRequested(IssueEventBase, tag="issue.retry_requested"):
    reason: str = ""


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
)

issue_decoder = msgspec.json.Decoder(IssueEvent)
