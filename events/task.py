"""Task aggregate events.

Every event is a frozen, ``kw_only`` msgspec Struct with an explicit, stable tag;
the envelope lives on :class:`TaskEventBase`. Schemas evolve additively only:
new fields get defaults, no type changes, no reused tags.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

import msgspec

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
    issue: IssueRef
    max_attempts: int = 3


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
    agent_id: str
    branch: str
    pr_url: str = ""
    pr_number: int | None = None
    draft: bool = False
    tests_passed: int = 0
    tests_failed: int = 0


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
)
