"""The task state machine, pure: ``decide(state, command) -> events`` and
``evolve(state, event) -> state``. No clock, no ids, no I/O: time and actor come in
on the command, and every event's id is its aggregate position.

    Pending -> Analyzing -> Queued -> Assigned -> InProgress -> Testing -> Checking
    Checking --checks passed--> Review --approved, merge queue--> MergeQueued -> Merging -> Completed
    Checking --checks failed--> ChecksFailed -> Checking (re-run) | Queued (CI fix round)
                                             | NeedsHuman | Failed (fixes exhausted)
    Checking/Review/NeedsHuman/MergeQueued --base moved, conflicts--> Conflicted -> Queued (rebase)
    Merging --the combination fails--> ChecksFailed (ejected from the queue)
    a pull request merged by a person: any state with an open pull request -> Completed
    Testing/Review... (and Assigned/InProgress on an agent's error) -> Failed -> Queued (retry)
    Assigned/InProgress/Testing -> Queued (agent lost or handed back)
    any non-final -> Cancelled

A CI fix or a rebase is a *round* on the pull request's own branch: the task goes
through Queued -> ... -> Testing again (``work`` says which kind of round) and back to
Checking with the new head commit. CI fixes are counted apart from the attempts.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

import msgspec
from msgspec.structs import replace

from events.checks import MAX_FLAKY_RERUNS, CheckRun, classify, failing, guidance_for
from events.errors import DomainError, IllegalTransition, VersionMismatch
from events.fold import fold as fold_events
from events.retry import backoff
from events.subjects import check_id
from events.task import (
    Analysis,
    IssueRef,
    TaskAnalysisStarted,
    TaskAnalyzed,
    TaskApproved,
    TaskAssigned,
    TaskCancellationRequested,
    TaskCancelled,
    TaskChecksFailed,
    TaskChecksPassed,
    TaskChecksRerun,
    TaskCompleted,
    TaskConflicted,
    TaskCreated,
    TaskEvent,
    TaskFailed,
    TaskFixQueued,
    TaskMergeDequeued,
    TaskMerged,
    TaskMergeQueued,
    TaskMergeTesting,
    TaskNeedsHuman,
    TaskPullRequestOpened,
    TaskRequeued,
    TaskStarted,
    TaskTestsStarted,
    Usage,
    WorkKind,
)
from events.task_commands import (  # callers use them as task_state.X
    ApprovePullRequest,
    AssignTask,
    CancelTask,
    ChecksTimedOut,
    Command,
    CompleteMerge,
    CompleteTask,
    CreateTask,
    DequeueMerge,
    FailTask,
    OpenPullRequest,
    RecordAnalysis,
    RecordChecks,
    RecordConflict,
    RequestRerun,
    RequeueTask,
    RetryTask,
    StartAnalysis,
    StartMergeTest,
    StartTask,
    StartTests,
)

TaskStatus = Literal[
    "pending", "analyzing", "queued", "assigned", "in_progress", "testing", "checking",
    "checks_failed", "review", "needs_human", "conflicted", "merge_queued", "merging",
    "completed", "failed", "cancelled",
]
TASK_STATUSES: tuple[str, ...] = (
    "pending", "analyzing", "queued", "assigned", "in_progress", "testing", "checking",
    "checks_failed", "review", "needs_human", "conflicted", "merge_queued", "merging",
    "completed", "failed", "cancelled",
)
FINAL: frozenset[str] = frozenset({"completed", "cancelled"})
WITH_AGENT: frozenset[str] = frozenset({"assigned", "in_progress", "testing"})
ACTIVE: frozenset[str] = WITH_AGENT
# the pull request is open and the task follows it (its checks, base and approval)
PR_OPEN: frozenset[str] = frozenset({"checking", "checks_failed", "review", "needs_human", "conflicted",
                                     "merge_queued", "merging"})
AWAITING_CHECKS: frozenset[str] = frozenset({"checking", "merging"})

# event type -> (states it may follow, state it leads to; None = unchanged)
TRANSITIONS: dict[type, tuple[frozenset[str], str | None]] = {
    TaskAnalysisStarted: (frozenset({"pending"}), "analyzing"),
    TaskAnalyzed: (frozenset({"analyzing"}), "queued"),
    TaskAssigned: (frozenset({"queued"}), "assigned"),
    TaskStarted: (frozenset({"assigned"}), "in_progress"),
    TaskTestsStarted: (frozenset({"in_progress"}), "testing"),
    TaskPullRequestOpened: (frozenset({"testing"}), "checking"),
    TaskCompleted: (PR_OPEN, "completed"),
    TaskFailed: (WITH_AGENT | PR_OPEN, "failed"),
    TaskRequeued: (frozenset({"failed", "assigned", "in_progress", "testing"}), "queued"),
    TaskCancellationRequested: (frozenset(WITH_AGENT), None),
    TaskCancelled: (frozenset(TASK_STATUSES) - FINAL, "cancelled"),
    # checking -> review; merging stays merging (the merge follows)
    TaskChecksPassed: (frozenset({"checking", "merging", "needs_human"}), None),
    TaskChecksFailed: (frozenset({"checking", "needs_human"}), "checks_failed"),
    # checks_failed/needs_human -> checking; merging stays merging
    TaskChecksRerun: (frozenset({"checks_failed", "needs_human", "merging"}), None),
    TaskNeedsHuman: (frozenset({"checking", "checks_failed", "review", "conflicted"}), "needs_human"),
    TaskFixQueued: (frozenset({"checks_failed", "conflicted"}), "queued"),
    TaskConflicted: (frozenset({"checking", "checks_failed", "review", "needs_human"}), "conflicted"),
    TaskApproved: (PR_OPEN, None),
    TaskMergeQueued: (frozenset({"review"}), "merge_queued"),
    TaskMergeTesting: (frozenset({"merge_queued"}), "merging"),
    # -> checks_failed when ejected for failing checks, else back to review
    TaskMergeDequeued: (frozenset({"merge_queued", "merging"}), None),
    TaskMerged: (frozenset({"merging"}), "completed"),
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
    # the scheduler's words for choosing agent_id (TaskAssigned.why); goes with agent_id
    # (a requeue clears both: the next assignment says why again)
    assigned_why: str = ""
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
    paths: tuple[str, ...] = ()  # (of the analysis: files the change is predicted to touch)
    # -- the pull request's way to green -------------------------------------------------
    work: WorkKind = "implement"  # what the current (or next) round does
    head_sha: str = ""  # the pull request's head commit: whose checks count
    base_branch: str = ""
    checks_since: datetime | None = None  # when the awaited checks were asked for
    checks: tuple[CheckRun, ...] = ()  # the last completed checks
    classification: str = ""  # of the last failure
    reruns: int = 0  # of the awaited commit's checks
    flaky_reruns: int = 0  # ... of them because the failure looked flaky (not the runner's fault)
    ci_fixes: int = 0
    max_ci_fixes: int = 0  # as the last fix round was told (for display)
    rebases: int = 0
    conflict_files: tuple[str, ...] = ()
    approved: bool = False
    approved_by: str = ""
    needed: str = ""  # what a human must do (needs_human)
    queue_ref: str = ""
    queue_sha: str = ""
    merge_sha: str = ""
    green_at: datetime | None = None  # first time all checks passed
    merge_queued_at: datetime | None = None  # when it (last) entered the merge queue: its place
    # its place in the agents' queue, while it holds one: when it became ready to assign.
    # Set at assignment; a task taken back from a lost agent or handed back (through no
    # fault of its own) keeps it, so it is not sent behind every task queued since
    # (projections.fairness.ready_since); any other way into the queue starts afresh
    queued_since: datetime | None = None

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
        created = TaskState(
            task_id=event.task_id, status="pending", version=1, issue=event.issue,
            created_at=event.occurred_at, updated_at=event.occurred_at,
            max_attempts=event.max_attempts,
        )
        if event.analysis is None:
            return created
        # created and analysed in one event: what task.analyzed would have applied
        a = event.analysis
        return _add_usage(created, a.usage, status="queued",
                          **{name: getattr(a, name) for name in ANALYSIS_IN_STATE})
    if event.version != state.version + 1:
        raise VersionMismatch(
            f"task {state.task_id}: event version {event.version} after {state.version}"
        )
    rule = TRANSITIONS.get(type(event))
    if rule is None or state.status not in rule[0]:
        raise IllegalTransition("task " + state.task_id, state.status, event.__struct_config__.tag)
    new = _APPLY[type(event)](state, event, rule[1] or state.status)
    if new.status == "queued" and state.status != "queued" and new.queued_since is not None \
            and not (isinstance(event, TaskRequeued) and event.reason in KEEPS_PLACE):
        new = replace(new, queued_since=None)  # a new place in the queue
    return new


KEEPS_PLACE = frozenset({"agent_lost", "handed_back"})
"""Requeue reasons after which a task keeps its place in the queue: the work was
interrupted, not judged (a retry after a failure waits its backoff and queues afresh)."""


# one small function per event type, dispatched by a dict (this runs once per event
# on every projection rebuild, so it is kept flat)
def _status_only(s: TaskState, e: TaskEvent, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status)


ANALYSIS_IN_STATE: tuple[str, ...] = tuple(f for f in Analysis.__struct_fields__ if f != "usage")
# the analysis is flat in the state, in its order, the pull-request fields after it
# (the golden projection's key order stays the same: paths was added after the others)


def _analyzed(s: TaskState, e: TaskAnalyzed, status: str) -> TaskState:
    analysis = {name: getattr(e, name) for name in ANALYSIS_IN_STATE}
    return _add_usage(s, e.usage, version=e.version, updated_at=e.occurred_at, status=status,
                      **analysis)


def _assigned(s: TaskState, e: TaskAssigned, status: str) -> TaskState:
    place = s.queued_since or (s.not_before if s.not_before is not None and s.not_before > s.updated_at
                               else s.updated_at)
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   agent_id=e.agent_id, assigned_why=e.why, not_before=None, queued_since=place)


def _tests_started(s: TaskState, e: TaskTestsStarted, status: str) -> TaskState:
    return _add_usage(s, e.usage, version=e.version, updated_at=e.occurred_at, status=status,
                      files_changed=e.files_changed, diff_ref=e.diff_ref)


def _pr_opened(s: TaskState, e: TaskPullRequestOpened, status: str) -> TaskState:
    return replace(
        s, version=e.version, updated_at=e.occurred_at, status=status, branch=e.branch,
        pr_url=e.pr_url, pr_number=e.pr_number, draft=e.draft,
        tests_passed=e.tests_passed, tests_failed=e.tests_failed,
        head_sha=e.head_sha, base_branch=e.base_branch or s.base_branch,
        checks_since=e.occurred_at, reruns=0, flaky_reruns=0, conflict_files=(), queue_ref="", queue_sha="",
    )


def _checks_passed(s: TaskState, e: TaskChecksPassed, status: str) -> TaskState:
    merging = s.status == "merging"
    return replace(s, version=e.version, updated_at=e.occurred_at,
                   status="merging" if merging else "review", checks=e.checks,
                   checks_since=None, needed="", status_reason="",
                   green_at=s.green_at or e.occurred_at)


def _checks_failed(s: TaskState, e: TaskChecksFailed, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status, checks=e.checks,
                   classification=e.classification, checks_since=None, needed="", status_reason=e.reason)


def _checks_rerun(s: TaskState, e: TaskChecksRerun, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at,
                   status="merging" if s.status == "merging" else "checking",
                   reruns=e.rerun, flaky_reruns=s.flaky_reruns + (e.cause == "flaky"),
                   checks_since=e.occurred_at, needed="", status_reason=e.reason)


def _needs_human(s: TaskState, e: TaskNeedsHuman, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   needed=e.needed, status_reason=e.reason, checks_since=None)


def _fix_queued(s: TaskState, e: TaskFixQueued, status: str) -> TaskState:
    counts = {"ci_fixes": e.number, "max_ci_fixes": e.of or s.max_ci_fixes} if e.kind == "ci_fix" \
        else {"rebases": e.number}
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status, work=e.kind,
                   guidance=e.guidance, agent_id=None, assigned_why="", not_before=None,
                   status_reason=e.reason, cancel_requested=False, needed="", **counts)


def _conflicted(s: TaskState, e: TaskConflicted, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   conflict_files=e.files, checks_since=None, needed="",
                   status_reason=f"conflicts with {e.base_branch or 'the base'} in "
                                 f"{', '.join(e.files) or 'some files'}")


def _approved(s: TaskState, e: TaskApproved, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, approved=True, approved_by=e.by)


def _merge_queued(s: TaskState, e: TaskMergeQueued, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status, merge_queued_at=e.occurred_at)


def _merge_testing(s: TaskState, e: TaskMergeTesting, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status, queue_ref=e.queue_ref,
                   queue_sha=e.queue_sha, reruns=0, flaky_reruns=0, checks_since=e.occurred_at)


def _merge_dequeued(s: TaskState, e: TaskMergeDequeued, status: str) -> TaskState:
    ejected = bool(e.checks)
    return replace(s, version=e.version, updated_at=e.occurred_at,
                   status="checks_failed" if ejected else "review", queue_ref="", queue_sha="",
                   checks=e.checks if ejected else s.checks,
                   classification=e.classification or s.classification if ejected else s.classification,
                   checks_since=None, status_reason=e.reason)


def _merged(s: TaskState, e: TaskMerged, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status, merge_sha=e.merge_sha,
                   status_reason="merged by the merge queue", checks_since=None)


def _with_reason(s: TaskState, e: TaskCompleted | TaskCancelled, status: str) -> TaskState:
    return replace(s, version=e.version, updated_at=e.occurred_at, status=status,
                   status_reason=e.reason, checks_since=None, needed="")


def _failed(s: TaskState, e: TaskFailed, status: str) -> TaskState:
    return replace(
        s, version=e.version, updated_at=e.occurred_at, status=status,
        failure_reason=e.reason, failure_phase=e.phase, failure_retryable=e.retryable,
        status_reason=e.reason, checks_since=None, needed="",
    )


def _requeued(s: TaskState, e: TaskRequeued, status: str) -> TaskState:
    return replace(
        s, version=e.version, updated_at=e.occurred_at, status=status, attempt=e.attempt,
        agent_id=None, assigned_why="", not_before=e.not_before, cancel_requested=False,
        status_reason=e.reason, guidance=e.guidance or s.guidance,
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
    TaskChecksPassed: _checks_passed,
    TaskChecksFailed: _checks_failed,
    TaskChecksRerun: _checks_rerun,
    TaskNeedsHuman: _needs_human,
    TaskFixQueued: _fix_queued,
    TaskConflicted: _conflicted,
    TaskApproved: _approved,
    TaskMergeQueued: _merge_queued,
    TaskMergeTesting: _merge_testing,
    TaskMergeDequeued: _merge_dequeued,
    TaskMerged: _merged,
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
        analysed = {"analyser": command.analyser or "rules", "analysis": command.analysis} \
            if command.analysis is not None else {}
        return [_validated(TaskCreated(**_env(command, command.task_id, 1), issue=command.issue,
                                       max_attempts=command.max_attempts, **analysed))]
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
            event = TaskAssigned(**env, agent_id=command.agent_id, attempt=state.attempt, why=command.why)
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
        case RecordChecks() | ChecksTimedOut() | RequestRerun() | RecordConflict() | ApprovePullRequest() \
                | StartMergeTest() | DequeueMerge() | CompleteMerge():
            return _pull_request(state, command)
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


class _Chain:
    """Events decided one after another from one command, each applied before the next
    is decided (so the chain is legal by the transition table at every step)."""

    def __init__(self, state: TaskState, command: Command) -> None:
        self.state = state
        self.command = command
        self.events: list[TaskEvent] = []

    def add(self, cls: type, **fields) -> TaskState:
        env = _env(self.command, self.state.task_id, self.state.version + 1)
        event = _validated(cls(**env, **fields))
        self.state = evolve(self.state, event)
        self.events.append(event)
        return self.state


def _pull_request(state: TaskState, command: Command) -> list[TaskEvent]:
    """The commands about the open pull request: its checks, its base, its approval and
    the merge queue. Each may lead to a chain (checks failed -> a fix round)."""
    chain = _Chain(state, command)
    sha = state.queue_sha if state.status == "merging" else state.head_sha
    match command:
        case RecordChecks():
            _require_in(state, ("checking", "merging", "needs_human"), "record checks")
            if command.head_sha != sha:
                raise DomainError(f"task {state.task_id}: checks of {command.head_sha[:12] or '(no commit)'} "
                                  f"are stale; the task awaits those of {sha[:12] or '(no commit)'}")
            _after_checks(chain, command)
        case ChecksTimedOut():
            _require_in(state, AWAITING_CHECKS, "time out its checks")
            minutes = command.waited / 60
            reason = f"the checks of {sha[:12]} did not finish within {minutes:.0f} min"
            if state.status == "merging":
                chain.add(TaskMergeDequeued, reason=f"left the merge queue: {reason}")
            chain.add(TaskNeedsHuman, reason=reason,
                      needed="look at the CI: a check is stuck, waits for a runner, or never started")
        case RequestRerun():
            _require(state, "needs_human", "re-run its checks")
            chain.add(TaskChecksRerun, head_sha=state.head_sha, reason=command.reason, rerun=state.reruns + 1,
                      cause="requested")
        case RecordConflict():
            _require_in(state, ("checking", "checks_failed", "review", "needs_human", "merge_queued"),
                        "record a conflict")
            if state.status == "merge_queued":
                chain.add(TaskMergeDequeued, reason=f"left the merge queue: {command.base_branch} moved "
                                                    "and the pull request conflicts with it")
            chain.add(TaskConflicted, base_branch=command.base_branch, base_sha=command.base_sha,
                      files=command.files)
            if state.rebases < command.max_rebases:
                files = ", ".join(command.files) or "(not named)"
                chain.add(TaskFixQueued, kind="rebase", number=state.rebases + 1,
                          reason=f"rebase on {command.base_branch}: conflicts in {files}",
                          guidance=f"{command.base_branch} moved ({command.base_sha[:12]}) and this branch "
                                   f"conflicts with it in: {files}. Rebase the change on it, keeping "
                                   "both sides' intent.")
            else:
                chain.add(TaskNeedsHuman, reason=f"still conflicting after {state.rebases} rebase(s)",
                          needed=f"resolve the conflicts with {command.base_branch} by hand")
        case ApprovePullRequest():
            _require_in(state, PR_OPEN, "approve")
            if not state.approved or state.approved_by != command.by:
                chain.add(TaskApproved, by=command.by)
            if command.merge_queue and state.status == "review":
                chain.add(TaskMergeQueued)
        case StartMergeTest():
            _require(state, "merge_queued", "test for the merge queue")
            chain.add(TaskMergeTesting, queue_ref=command.queue_ref, queue_sha=command.queue_sha,
                      base_sha=command.base_sha)
        case DequeueMerge():
            _require_in(state, ("merge_queued", "merging"), "leave the merge queue")
            chain.add(TaskMergeDequeued, reason=command.reason)
        case CompleteMerge():
            _require(state, "merging", "merge")
            if state.checks_since is not None or failing(state.checks):
                raise DomainError(f"task {state.task_id}: the queued commit's checks have not passed")
            chain.add(TaskMerged, base_branch=command.base_branch, merge_sha=command.merge_sha)
    return chain.events


def _after_checks(chain: _Chain, c: RecordChecks) -> None:
    state = chain.state
    in_queue = state.status == "merging"
    if not failing(c.checks):
        chain.add(TaskChecksPassed, head_sha=c.head_sha, checks=c.checks)
        if not in_queue and c.merge_queue and state.approved:
            chain.add(TaskMergeQueued)
        return
    # an infrastructure re-run (or a person's) tells nothing about flakiness: only the
    # flaky re-runs count as "the check already had its second chance"
    verdict = classify(c.checks, base=c.base, files_changed=state.files_changed, reruns=state.flaky_reruns)
    kind = verdict.classification
    rerun = ((kind == "infrastructure" and state.reruns < c.max_infra_reruns)
             or (kind == "flaky" and state.flaky_reruns < MAX_FLAKY_RERUNS))
    names = tuple(sorted(ch.name for ch in failing(c.checks)))
    if in_queue:
        if rerun:
            chain.add(TaskChecksRerun, head_sha=c.head_sha, checks=names, reason=verdict.reason,
                      rerun=state.reruns + 1, cause=kind)
            return
        chain.add(TaskMergeDequeued, reason=f"ejected from the merge queue: {verdict.reason}",
                  checks=c.checks, classification=kind)
    else:
        chain.add(TaskChecksFailed, head_sha=c.head_sha, checks=c.checks, classification=kind,
                  reason=verdict.reason)
    if rerun:
        chain.add(TaskChecksRerun, head_sha=state.head_sha, checks=names, reason=verdict.reason,
                  rerun=state.reruns + 1, cause=kind)
    elif kind == "action_required":
        chain.add(TaskNeedsHuman, reason=verdict.reason,
                  needed="a maintainer approves the pending workflow run(s) on the pull request")
    elif kind == "base":
        chain.add(TaskNeedsHuman, reason=verdict.reason, needed="make the base branch green again")
    elif kind == "infrastructure":
        chain.add(TaskNeedsHuman, reason=f"{verdict.reason}; still failing after {state.reruns} re-run(s)",
                  needed="look at the CI runners")
    elif state.ci_fixes < c.max_ci_fixes:
        number = state.ci_fixes + 1
        chain.add(TaskFixQueued, kind="ci_fix", number=number, of=c.max_ci_fixes, reason=verdict.reason,
                  guidance=guidance_for(c.checks, verdict, number, c.max_ci_fixes)[:20000])
    else:
        chain.add(TaskFailed, reason=f"checks still failing after {state.ci_fixes} CI fix attempt(s): "
                                     f"{verdict.reason}"[:2000], phase="checks", retryable=False)


def _require_in(state: TaskState, statuses, action: str) -> None:
    if state.status not in statuses:
        raise IllegalTransition("task " + state.task_id, state.status, action)


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
