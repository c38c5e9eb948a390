"""What each pipeline phase reports, as typed values.

The pipeline builds one of these at the end of a phase (``TestsRun(passed=3, ...)``); the
agent wraps it in :class:`events.agent_state.ReportWork`, and ``decide`` turns it into
the report event of :data:`EVENT_OF_REPORT` with the envelope added. A misspelled or
missing field is therefore a ``TypeError`` where the report is built (and a type
checker's error before that), not a refusal found at run time by looking up a tag.

The fields are declared here only: each report event in :mod:`events.agent` is the
envelope plus its body's fields, laid out flat (:func:`events.payload.flat`), so the
events on the wire are the ones the pipeline always wrote.
"""

from __future__ import annotations

import msgspec

from events.task import Usage


class WorkReportBody(msgspec.Struct, frozen=True, kw_only=True):
    """The payload of one work report (task and attempt are added by the agent)."""


class WorkspacePrepared(WorkReportBody):
    path: str
    base_commit: str = ""


class CodebaseAnalysed(WorkReportBody):
    languages: dict[str, int] = {}
    test_command: tuple[str, ...] = ()


class ImplementationProduced(WorkReportBody):
    coder: str = ""
    summary: str = ""
    files_changed: tuple[str, ...] = ()
    diff_stat: str = ""
    diff_ref: str = ""  # "<bucket> <name>" in the object store (events.refs); never the diff itself
    diff_digest: str = ""  # the object store's digest of the diff stored: "SHA-256=<base64url>"
    turns: int = 0
    usage: Usage | None = None
    transcript_ref: str = ""  # the coder's transcript: "<bucket> <name>", like every reference


class TestsRun(WorkReportBody):
    __test__ = False  # not a pytest test class

    command: tuple[str, ...] = ()
    exit_code: int | None = None
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    duration: float = 0.0
    timed_out: bool = False
    log_ref: str = ""  # the test output: "<bucket> <name>" (events.refs)


class ChangesPushed(WorkReportBody):
    branch: str
    commit: str


class PullRequestOpened(WorkReportBody):
    """The change is pushed and its pull request open: opened by this attempt, or (after
    a CI fix or a rebase round) the same pull request with a new head commit."""

    branch: str
    pr_url: str = ""
    pr_number: int | None = None
    draft: bool = False
    tests_passed: int = 0
    tests_failed: int = 0
    head_sha: str = ""  # the commit pushed: the checks that count are this commit's
    base_branch: str = ""  # what the pull request is against


class WorkFailed(WorkReportBody):
    phase: str
    reason: str
    retryable: bool = True
    log_ref: str = ""  # what shows the failure (a test log, the diff): "<bucket> <name>"
