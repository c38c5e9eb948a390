"""The task commands: what an actor asks of a task. Plain data; the task state machine
(:mod:`events.task_state`) decides which events each one leads to, and re-exports them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from events.checks import MAX_INFRA_RERUNS, CheckRun
from events.task import Analysis, IssueRef, Usage


class Command(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    actor: str
    causation_id: str | None = None


class CreateTask(Command, frozen=True, kw_only=True):
    task_id: str
    issue: IssueRef
    max_attempts: int = 3
    # a synchronous analyser's decision, recorded on the creation (the task is created queued)
    analyser: str = ""
    analysis: Analysis | None = None


class StartAnalysis(Command, frozen=True, kw_only=True):
    analyser: str = "rules"


class RecordAnalysis(Command, frozen=True, kw_only=True):
    analysis: Analysis = msgspec.field(default_factory=Analysis)


class AssignTask(Command, frozen=True, kw_only=True):
    agent_id: str
    why: str = ""  # the scheduler's choice in words (TaskAssigned.why)


class StartTask(Command, frozen=True, kw_only=True):
    agent_id: str
    workspace: str = ""


class StartTests(Command, frozen=True, kw_only=True):
    agent_id: str
    files_changed: tuple[str, ...] = ()
    diff_stat: str = ""
    diff_ref: str = ""
    usage: Usage | None = None


class OpenPullRequest(Command, frozen=True, kw_only=True):
    agent_id: str
    branch: str
    pr_url: str = ""
    pr_number: int | None = None
    draft: bool = False
    tests_passed: int = 0
    tests_failed: int = 0
    head_sha: str = ""
    base_branch: str = ""


class CompleteTask(Command, frozen=True, kw_only=True):
    reason: str = "pull request merged"


class FailTask(Command, frozen=True, kw_only=True):
    reason: str
    phase: str = ""
    retryable: bool = True
    log_ref: str = ""
    agent_id: str | None = None  # when an agent reports, it must be the assignee


class RetryTask(Command, frozen=True, kw_only=True):
    backoff_base: float = 5.0  # seconds; doubles each attempt
    backoff_max: float = 300.0
    guidance: str = ""


class RequeueTask(Command, frozen=True, kw_only=True):
    reason: Literal["agent_lost", "handed_back"]
    agent_id: str  # the agent the task is taken from: a stale report is refused


class CancelTask(Command, frozen=True, kw_only=True):
    reason: str = ""
    force: bool = False  # skip asking the agent (it acknowledged, or it is gone)


# -- pull request to green (checks, conflicts, the merge queue) ---------------------------
class RecordChecks(Command, frozen=True, kw_only=True):
    """Every check of ``head_sha`` finished. The state machine records them and, when
    some failed, classifies the failure and decides the next step (re-run, fix round,
    a human, or Failed) in the same write."""

    head_sha: str
    checks: tuple[CheckRun, ...]
    base: dict[str, str] = {}  # the same checks' conclusions on the base commit
    max_ci_fixes: int = 2
    max_infra_reruns: int = MAX_INFRA_RERUNS
    merge_queue: bool = False  # the repository merges through the queue


class ChecksTimedOut(Command, frozen=True, kw_only=True):
    waited: float  # seconds since the checks were awaited


class RequestRerun(Command, frozen=True, kw_only=True):
    """A person asked to run the checks again (``issue.retry_requested`` on a task that
    needs a human)."""

    reason: str = "re-run requested"


class RecordConflict(Command, frozen=True, kw_only=True):
    base_branch: str
    base_sha: str = ""
    files: tuple[str, ...] = ()
    max_rebases: int = 3


class ApprovePullRequest(Command, frozen=True, kw_only=True):
    by: str = ""
    merge_queue: bool = False


class StartMergeTest(Command, frozen=True, kw_only=True):
    queue_ref: str
    queue_sha: str
    base_sha: str = ""


class DequeueMerge(Command, frozen=True, kw_only=True):
    reason: str


class CompleteMerge(Command, frozen=True, kw_only=True):
    base_branch: str = ""
    merge_sha: str = ""
