"""Task aggregate events.

Every event is a frozen, ``kw_only`` msgspec Struct with an explicit, stable tag;
the envelope lives on :class:`TaskEventBase`. Schemas evolve additively only:
new fields get defaults, no type changes, no reused tags.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

import msgspec

from events.checks import CheckRun, Classification
from events.payload import flat, payload_of
from events.subjects import task_subject

Specialty = Literal[
    "backend", "frontend", "testing", "devops", "database", "security", "documentation", "general"
]
SPECIALTIES: tuple[str, ...] = get_args(Specialty)
Priority = Literal["low", "normal", "high", "urgent"]  # in rising order
PRIORITIES: tuple[str, ...] = get_args(Priority)
Complexity = Literal["trivial", "small", "medium", "large"]
COMPLEXITIES: tuple[str, ...] = get_args(Complexity)
SecurityLevel = Literal["public", "internal", "confidential", "restricted"]  # in rising order
SECURITY_LEVELS: tuple[str, ...] = get_args(SecurityLevel)


class IssueRef(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The issue a task works on, as it was when the task was created."""

    source: str
    repo: str
    number: int
    title: str
    body: str = ""
    labels: tuple[str, ...] = ()
    url: str = ""
    author: str = ""


class Usage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Model usage and cost, carried on the event that incurred it."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    dollars: float = 0.0


class Analysis(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What analysing an issue decided about its task, each decision with its reason.

    The one declaration of these fields: an analyser returns it, the ``RecordAnalysis``
    command carries it, :class:`TaskAnalyzed` records it (flat) and the task state keeps
    it (flat, without the usage, which is summed into the task's cost)."""

    specialty: Specialty = "general"
    requirements: tuple[str, ...] = ()
    complexity: Complexity = "small"
    priority: Priority = "normal"
    security_level: SecurityLevel = "public"
    dependencies: tuple[str, ...] = ()  # task ids that must complete first
    reasons: tuple[str, ...] = ()
    plan: str = ""
    usage: Usage | None = None  # when a model was asked
    # files the change is predicted to touch (named in the issue, or by the model): tasks
    # of one repository predicted to touch the same file do not run at the same time
    paths: tuple[str, ...] = ()


class TaskEventBase(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False, omit_defaults=True
):
    # envelope, set at construction
    event_id: str
    task_id: str
    version: int
    occurred_at: datetime
    correlation_id: str
    causation_id: str | None = None
    actor: str

    @property
    def rel_subject(self) -> str:
        return task_subject(self.task_id, self.__struct_config__.tag[5:])


class TaskCreated(TaskEventBase, tag="task.created"):
    """A task for an issue. With ``analysis``, a synchronous analyser's decision (the
    rules answer at once) is recorded on the creation itself, and the task is created
    queued: one append instead of three (created, analysis started, analysed), the same
    information. An analyser that takes time (Claude) still records
    ``task.analysis_started`` and ``task.analyzed``."""

    issue: IssueRef
    max_attempts: int = 3
    analyser: str = ""  # who analysed it, when ``analysis`` is here
    analysis: Analysis | None = None


class TaskAnalysisStarted(TaskEventBase, tag="task.analysis_started"):
    analyser: str = "rules"


class TaskAnalyzed(flat(TaskEventBase, Analysis), tag="task.analyzed"):
    """The task's :class:`Analysis`, its fields flat beside the envelope's."""

    @property
    def analysis(self) -> Analysis:
        return payload_of(self, Analysis)


class TaskAssigned(TaskEventBase, tag="task.assigned"):
    agent_id: str
    attempt: int
    # the scheduler's choice in words, one bounded line (actors.assignment_why): the task's
    # lane and urgency, why this agent; "" on assignments written before it existed
    why: str = ""

    @property
    def rel_subject(self) -> str:  # the agent's durable consumer filters on this
        return task_subject(self.task_id, "assigned", self.agent_id)


class TaskStarted(TaskEventBase, tag="task.started"):
    agent_id: str
    workspace: str = ""


class TaskTestsStarted(TaskEventBase, tag="task.testing"):
    agent_id: str
    files_changed: tuple[str, ...] = ()
    diff_stat: str = ""
    diff_ref: str = ""
    usage: Usage | None = None


class TaskPullRequestOpened(TaskEventBase, tag="task.pr_opened"):
    """The change is pushed and its pull request open (after a fix or a rebase round:
    the same pull request, a new head commit). Its checks are awaited next."""

    agent_id: str
    branch: str
    pr_url: str = ""
    pr_number: int | None = None
    draft: bool = False
    tests_passed: int = 0
    tests_failed: int = 0
    head_sha: str = ""  # the commit pushed: the checks that count are this commit's
    base_branch: str = ""


class TaskCompleted(TaskEventBase, tag="task.completed"):
    reason: str = "pull request merged"


class TaskFailed(TaskEventBase, tag="task.failed"):
    reason: str
    phase: str = ""
    retryable: bool = True
    log_ref: str = ""


class TaskRequeued(TaskEventBase, tag="task.requeued"):
    """Back to Queued with the next attempt: a retry after failure, or a task taken
    back from an agent that was lost or handed it back."""

    reason: Literal["retry", "agent_lost", "handed_back"]
    attempt: int  # the new attempt number
    not_before: datetime | None = None  # retry backoff: do not assign earlier
    guidance: str = ""  # what a reviewer or requester asked for, for the next attempt
    agent_id: str = ""  # the agent the task was taken from (or the last assignee, on a retry)


class TaskCancellationRequested(TaskEventBase, tag="task.cancel_requested"):
    reason: str = ""
    requested_by: str = ""


class TaskCancelled(TaskEventBase, tag="task.cancelled"):
    reason: str = ""


WorkKind = Literal["implement", "ci_fix", "rebase"]


class TaskChecksPassed(TaskEventBase, tag="task.checks_passed"):
    """Every check of the head commit (or, in the merge queue, of the commit that
    would become the base) passed."""

    head_sha: str
    checks: tuple[CheckRun, ...] = ()


class TaskChecksFailed(TaskEventBase, tag="task.checks_failed"):
    """Checks of the head commit failed: which ones (each with a masked log tail), and
    why, as classified (:func:`events.checks.classify`). What happens next follows in
    the same write: a re-run, a fix round, a human, or the end."""

    head_sha: str
    classification: Classification
    reason: str
    checks: tuple[CheckRun, ...] = ()


class TaskChecksRerun(TaskEventBase, tag="task.checks_rerun"):
    """The forge is asked to run the failing checks of the head commit again."""

    head_sha: str
    checks: tuple[str, ...] = ()
    reason: str = ""
    rerun: int = 1  # re-runs of this commit so far, this one included
    # why: "flaky" (only these count as the one re-run a possibly flaky check gets),
    # "infrastructure", or "requested" (a person asked)
    cause: str = ""


class TaskNeedsHuman(TaskEventBase, tag="task.needs_human"):
    """Nothing the cluster runs can move the task on: ``needed`` says what would."""

    reason: str
    needed: str = ""


class TaskFixQueued(TaskEventBase, tag="task.fix_queued"):
    """Back to the queue for a round of work on the pull request's own branch: a CI fix
    (``ci_fix``, counted against ``--max-ci-fixes``, not against the task's attempts) or
    a rebase on the moved base (``rebase``)."""

    kind: WorkKind
    number: int  # the CI fix (or rebase) number, this one included
    guidance: str = ""
    reason: str = ""
    of: int = 0  # how many such rounds the task may have (0: not said)


class TaskConflicted(TaskEventBase, tag="task.conflicted"):
    """The base branch moved and the pull request no longer merges cleanly
    (``git merge-tree`` of the branch against the new base)."""

    base_branch: str = ""
    base_sha: str = ""
    files: tuple[str, ...] = ()


class TaskApproved(TaskEventBase, tag="task.approved"):
    """A trusted reviewer approved the pull request."""

    by: str = ""


class TaskMergeQueued(TaskEventBase, tag="task.merge_queued"):
    """Entered the repository's merge queue (approved, checks green)."""

    position: int = 0  # tasks ahead of it when it entered


class TaskMergeTesting(TaskEventBase, tag="task.merge_testing"):
    """At the head of the queue: the pull request combined with the latest base is
    ``queue_sha`` (on ``queue_ref``); its checks decide whether it merges."""

    queue_ref: str
    queue_sha: str
    base_sha: str = ""


class TaskMergeDequeued(TaskEventBase, tag="task.merge_dequeued"):
    """Left the merge queue without merging: ejected because the combination with the
    latest base fails its checks (``checks`` and ``classification`` then say how), or
    taken out (base moved under it and it conflicts, approval withdrawn, ...)."""

    reason: str
    checks: tuple[CheckRun, ...] = ()
    classification: Classification | None = None


class TaskMerged(TaskEventBase, tag="task.merged"):
    """The merge queue merged the tested commit into the base branch: done."""

    base_branch: str = ""
    merge_sha: str = ""


TaskEvent = (
    TaskCreated
    | TaskAnalysisStarted
    | TaskAnalyzed
    | TaskAssigned
    | TaskStarted
    | TaskTestsStarted
    | TaskPullRequestOpened
    | TaskCompleted
    | TaskFailed
    | TaskRequeued
    | TaskCancellationRequested
    | TaskCancelled
    | TaskChecksPassed
    | TaskChecksFailed
    | TaskChecksRerun
    | TaskNeedsHuman
    | TaskFixQueued
    | TaskConflicted
    | TaskApproved
    | TaskMergeQueued
    | TaskMergeTesting
    | TaskMergeDequeued
    | TaskMerged
)
