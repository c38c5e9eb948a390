"""The task state machine, pure: ``decide(state, command) -> events`` and
``evolve(state, event) -> state``. No clock, no ids, no I/O: time and actor come in
on the command, and every event's id is its aggregate position.

    Pending -> Analyzing -> Queued -> Assigned -> InProgress -> Testing -> Review -> Completed
    Testing/Review (and Assigned/InProgress on an agent's error) -> Failed -> Queued (retry)
    Assigned/InProgress/Testing -> Queued (agent lost or handed back)
    any non-final -> Cancelled
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

import msgspec
from msgspec.structs import replace

from events.errors import DomainError, IllegalTransition, VersionMismatch
from events.fold import fold as fold_events
from events.retry import backoff
from events.subjects import check_id
from events.task import (
    Analysis,
    IssueRef,
    TaskAnalysisStarted,
    TaskAnalyzed,
    TaskAssigned,
    TaskCancellationRequested,
    TaskCancelled,
    TaskCompleted,
    TaskCreated,
    TaskEvent,
    TaskFailed,
    TaskPullRequestOpened,
    TaskRequeued,
    TaskStarted,
    TaskTestsStarted,
    Usage,
)
from events.task_commands import (  # callers use them as task_state.X
    AssignTask,
    CancelTask,
    Command,
    CompleteTask,
    CreateTask,
    FailTask,
    OpenPullRequest,
    RecordAnalysis,
    RequeueTask,
    RetryTask,
    StartAnalysis,
    StartTask,
    StartTests,
)

TaskStatus = Literal[
    "pending", "analyzing", "queued", "assigned", "in_progress", "testing", "review",
    "completed", "failed", "cancelled",
]
TASK_STATUSES: tuple[str, ...] = (
    "pending", "analyzing", "queued", "assigned", "in_progress", "testing", "review",
    "completed", "failed", "cancelled",
)
FINAL: frozenset[str] = frozenset({"completed", "cancelled"})
WITH_AGENT: frozenset[str] = frozenset({"assigned", "in_progress", "testing"})
ACTIVE: frozenset[str] = WITH_AGENT

# event type -> (states it may follow, state it leads to; None = unchanged)
TRANSITIONS: dict[type, tuple[frozenset[str], str | None]] = {
    TaskAnalysisStarted: (frozenset({"pending"}), "analyzing"),
    TaskAnalyzed: (frozenset({"analyzing"}), "queued"),
    TaskAssigned: (frozenset({"queued"}), "assigned"),
    TaskStarted: (frozenset({"assigned"}), "in_progress"),
    TaskTestsStarted: (frozenset({"in_progress"}), "testing"),
    TaskPullRequestOpened: (frozenset({"testing"}), "review"),
    TaskCompleted: (frozenset({"review"}), "completed"),
    TaskFailed: (frozenset({"assigned", "in_progress", "testing", "review"}), "failed"),
    TaskRequeued: (frozenset({"failed", "assigned", "in_progress", "testing"}), "queued"),
    TaskCancellationRequested: (frozenset(WITH_AGENT), None),
    TaskCancelled: (frozenset(TASK_STATUSES) - FINAL, "cancelled"),
}


class TaskState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    task_id: str
    status: TaskStatus
    version: int
    issue: IssueRef
    created_at: datetime
    updated_at: datetime
    max_attempts: int = 3
    attempt: int = 1
    # the task's Analysis (events.task), flat and in its order, its usage summed into the
    # cost below: flat because the views, the KV bucket and `ccc tasks --json` show the
    # state as it is (tests/unit/test_task_state.py checks the two agree)
    specialty: str = "general"
    requirements: tuple[str, ...] = ()
    complexity: str = "small"
    priority: str = "normal"
    security_level: str = "public"
    dependencies: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    plan: str = ""
    agent_id: str | None = None
    not_before: datetime | None = None
    cancel_requested: bool = False
    branch: str = ""
    pr_url: str = ""
    pr_number: int | None = None
    draft: bool = False
    files_changed: tuple[str, ...] = ()
    diff_ref: str = ""
    tests_passed: int = 0
    tests_failed: int = 0
    failure_reason: str = ""
    failure_phase: str = ""
    failure_retryable: bool = False
    status_reason: str = ""
    guidance: str = ""  # review feedback / a request to act on in the current attempt
    dollars: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def can_retry(self) -> bool:
        return (self.status == "failed" and self.failure_retryable and not self.cancel_requested
                and self.attempt < self.max_attempts)


def _add_usage(state: TaskState, usage: Usage | None, **changes) -> TaskState:
    if usage is not None:
        changes["dollars"] = state.dollars + usage.dollars
        changes["input_tokens"] = state.input_tokens + usage.input_tokens
        changes["output_tokens"] = state.output_tokens + usage.output_tokens
    return replace(state, **changes)


def evolve(state: TaskState | None, event: TaskEvent) -> TaskState:
    """Apply one stored event. Raises :class:`VersionMismatch` on a gap or repeat and
    :class:`IllegalTransition` if the log holds a transition the machine forbids."""
    if state is None:
        if not isinstance(event, TaskCreated):
            raise IllegalTransition("task " + event.task_id, "absent", event.__struct_config__.tag)
        if event.version != 1:
            raise VersionMismatch(f"task {event.task_id}: first event has version {event.version}")
        return TaskState(
            task_id=event.task_id, status="pending", version=1, issue=event.issue,
            created_at=event.occurred_at, updated_at=event.occurred_at,
            max_attempts=event.max_attempts,
        )
    if event.version != state.version + 1:
        raise VersionMismatch(
            f"task {state.task_id}: event version {event.version} after {state.version}"
        )
    rule = TRANSITIONS.get(type(event))
    if rule is None or state.status not in rule[0]:
        raise IllegalTransition("task " + state.task_id, state.status, event.__struct_config__.tag)
    return _APPLY[type(event)](state, event, rule[1] or state.status)


# one small function per event type, dispatched by a dict (this runs once per event
# on every projection rebuild, so it is kept flat)
def _status_only(s: TaskState, e: TaskEvent, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status)


ANALYSIS_IN_STATE: tuple[str, ...] = tuple(f for f in Analysis.__struct_fields__ if f != "usage")


def _analyzed(s: TaskState, e: TaskAnalyzed, status: str) -> TaskState:
    analysis = {name: getattr(e, name) for name in ANALYSIS_IN_STATE}
    return _add_usage(s, e.usage, version=e.version, updated_at=e.occurred_at, status=status,
                      **analysis)


def _assigned(s: TaskState, e: TaskAssigned, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   agent_id=e.agent_id, not_before=None)


def _tests_started(s: TaskState, e: TaskTestsStarted, status: str) -> TaskState:
    return _add_usage(s, e.usage, version=e.version, updated_at=e.occurred_at, status=status,
                      files_changed=e.files_changed, diff_ref=e.diff_ref)


def _pr_opened(s: TaskState, e: TaskPullRequestOpened, status: str) -> TaskState:
    return replace(
        s, version=e.version, updated_at=e.occurred_at, status=status, branch=e.branch,
        pr_url=e.pr_url, pr_number=e.pr_number, draft=e.draft,
        tests_passed=e.tests_passed, tests_failed=e.tests_failed,
    )


def _with_reason(s: TaskState, e: TaskCompleted | TaskCancelled, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   status_reason=e.reason)


def _failed(s: TaskState, e: TaskFailed, status: str) -> TaskState:
    return replace(
        s, version=e.version, updated_at=e.occurred_at, status=status,
        failure_reason=e.reason, failure_phase=e.phase, failure_retryable=e.retryable,
        status_reason=e.reason,
    )


def _requeued(s: TaskState, e: TaskRequeued, status: str) -> TaskState:
    return replace(
        s, version=e.version, updated_at=e.occurred_at, status=status, attempt=e.attempt,
        agent_id=None, not_before=e.not_before, cancel_requested=False, status_reason=e.reason,
        guidance=e.guidance or s.guidance,
    )


def _cancel_requested(s: TaskState, e: TaskCancellationRequested, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   cancel_requested=True, status_reason=e.reason)


_APPLY = {
    TaskAnalysisStarted: _status_only,
    TaskAnalyzed: _analyzed,
    TaskAssigned: _assigned,
    TaskStarted: _status_only,
    TaskTestsStarted: _tests_started,
    TaskPullRequestOpened: _pr_opened,
    TaskCompleted: _with_reason,
    TaskFailed: _failed,
    TaskRequeued: _requeued,
    TaskCancellationRequested: _cancel_requested,
    TaskCancelled: _with_reason,
}
assert _APPLY.keys() == TRANSITIONS.keys()


def fold(events: Iterable[TaskEvent], state: TaskState | None = None) -> TaskState | None:
    """The task's state after ``events`` (applied to ``state``, or from nothing)."""
    return fold_events(evolve, events, state)


def decide(state: TaskState | None, command: Command) -> list[TaskEvent]:
    """What happens if ``command`` is applied now. Raises a :class:`DomainError` when
    the command is not allowed; never mutates anything."""
    if isinstance(command, CreateTask):
        if state is not None:
            raise IllegalTransition("task " + command.task_id, state.status, "create")
        check_id(command.task_id, "task id", error=DomainError)  # it becomes a subject token
        if command.max_attempts < 1:
            raise DomainError("max_attempts must be at least 1")
        return [_validated(TaskCreated(**_env(command, command.task_id, 1), issue=command.issue,
                                       max_attempts=command.max_attempts))]
    if state is None:
        raise DomainError(f"no such task for {type(command).__name__}")
    env = _env(command, state.task_id, state.version + 1)
    event: TaskEvent
    match command:
        case StartAnalysis():
            event = TaskAnalysisStarted(**env, analyser=command.analyser)
        case RecordAnalysis():
            event = TaskAnalyzed(**env, **msgspec.structs.asdict(command.analysis))
        case AssignTask():
            _require(state, "queued", "assign")
            if state.not_before is not None and command.at < state.not_before:
                raise DomainError(f"task {state.task_id}: retry backoff until {state.not_before.isoformat()}")
            event = TaskAssigned(**env, agent_id=command.agent_id, attempt=state.attempt)
        case StartTask():
            _require_agent(state, command.agent_id, "start")
            event = TaskStarted(**env, agent_id=command.agent_id, workspace=command.workspace)
        case StartTests():
            _require_agent(state, command.agent_id, "report tests")
            event = TaskTestsStarted(**env, **_payload(command))
        case OpenPullRequest():
            _require_agent(state, command.agent_id, "open a pull request")
            event = TaskPullRequestOpened(**env, **_payload(command))
        case CompleteTask():
            event = TaskCompleted(**env, reason=command.reason)
        case FailTask():
            if command.agent_id is not None:
                _require_agent(state, command.agent_id, "fail")
            event = TaskFailed(**env, reason=command.reason, phase=command.phase,
                               retryable=command.retryable, log_ref=command.log_ref)
        case RetryTask():
            _require(state, "failed", "retry")
            if not state.failure_retryable:
                raise DomainError(f"task {state.task_id}: failure is not retryable")
            if state.cancel_requested:  # the failure came after a cancel: honour the cancel
                raise DomainError(f"task {state.task_id}: cancellation requested, not retrying")
            if state.attempt >= state.max_attempts:
                raise DomainError(f"task {state.task_id}: attempts exhausted ({state.attempt}/{state.max_attempts})")
            # retry number n waits backoff_base * 2**(n-1), capped
            delay = backoff(state.attempt, command.backoff_base, command.backoff_max)
            event = TaskRequeued(**env, reason="retry", attempt=state.attempt + 1,
                                 not_before=command.at + timedelta(seconds=delay),
                                 guidance=command.guidance[:20000], agent_id=state.agent_id or "")
        case RequeueTask():
            if state.status not in WITH_AGENT or state.agent_id != command.agent_id:
                raise IllegalTransition("task " + state.task_id, state.status,
                                        f"take back from {command.agent_id}")
            if state.cancel_requested:
                # the agent will never acknowledge the cancel now: finish it rather than
                # put a task the user cancelled back in the queue
                lost = "lost" if command.reason == "agent_lost" else "handed it back"
                event = TaskCancelled(
                    **env, reason=f"cancellation requested; agent {command.agent_id} {lost}")
            elif state.attempt >= state.max_attempts:
                event = TaskFailed(**env, reason=f"agent {command.agent_id} lost; attempts exhausted",
                                   phase=state.status, retryable=False)
            else:
                event = TaskRequeued(**env, reason=command.reason, attempt=state.attempt + 1,
                                     agent_id=command.agent_id)
        case CancelTask():
            if state.final:
                raise IllegalTransition("task " + state.task_id, state.status, "cancel")
            if state.status in WITH_AGENT and not command.force:
                if state.cancel_requested:
                    return []  # already asked; idempotent
                event = TaskCancellationRequested(**env, reason=command.reason, requested_by=command.actor)
            else:
                event = TaskCancelled(**env, reason=command.reason)
        case _:
            raise DomainError(f"unknown command {type(command).__name__}")
    # validate first: evolve trusts field types (e.g. reads usage.dollars), so a
    # malformed command must fail here as a DomainError, not inside evolve
    event = _validated(event)
    evolve(state, event)  # the transition table is the single source of legality
    return [event]


def _validated(event: TaskEvent) -> TaskEvent:
    """Struct constructors do not check types; a round trip does, so nothing that
    cannot be decoded again ever reaches the log."""
    try:
        return msgspec.json.decode(msgspec.json.encode(event), type=type(event))
    except msgspec.ValidationError as e:
        raise DomainError(f"invalid {event.__struct_config__.tag}: {e}") from None


def _payload(command: Command) -> dict:
    d = msgspec.structs.asdict(command)
    for k in ("at", "actor", "causation_id"):
        d.pop(k, None)
    return d


def _env(command: Command, task_id: str, version: int) -> dict:
    return {
        "event_id": f"{task_id}:{version}",
        "task_id": task_id,
        "version": version,
        "occurred_at": command.at,
        "correlation_id": task_id,
        "causation_id": command.causation_id,
        "actor": command.actor,
    }


def _require(state: TaskState, status: str, action: str) -> None:
    if state.status != status:
        raise IllegalTransition("task " + state.task_id, state.status, action)


def _require_agent(state: TaskState, agent_id: str, action: str) -> None:
    if state.agent_id != agent_id:
        raise IllegalTransition(
            "task " + state.task_id, f"{state.status} (assigned to {state.agent_id})",
            f"{action} as {agent_id}",
        )
