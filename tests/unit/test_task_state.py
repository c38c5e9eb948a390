"""Pure domain tests of the task state machine (no NATS).

Histories are produced by ``decide`` itself (tests/support/domain.py), so every state a
test starts from is one the real machine can reach; the two it only passes through
within one decision (checks_failed, conflicted) are reached by cutting that decision's
chain of events short. The transition matrices are generated from the ``TRANSITIONS``
table: a new transition or command without a case here fails. The way of a pull
request to green, chain by chain, is in test_pr_to_green.py.
"""

from __future__ import annotations

import typing
from datetime import timedelta
from itertools import product
from typing import NamedTuple

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import given as for_all
from hypothesis import strategies as st

from events import task_state as ts
from events.checks import Verdict, failing, guidance_for
from events.codec import MAX_EVENT_BYTES, decode_event, encode
from events.errors import BadEventError, DomainError, IllegalTransition, VersionMismatch
from events.retry import backoff
from events.task import (
    Analysis, TaskAnalysisStarted, TaskAnalyzed, TaskApproved, TaskAssigned, TaskCancellationRequested,
    TaskCancelled, TaskChecksFailed, TaskChecksPassed, TaskChecksRerun, TaskCompleted, TaskConflicted,
    TaskCreated, TaskEvent, TaskFailed, TaskFixQueued, TaskMerged, TaskMergeDequeued, TaskMergeQueued,
    TaskMergeTesting, TaskNeedsHuman, TaskPullRequestOpened, TaskRequeued, TaskStarted, TaskTestsStarted,
    Usage,
)
from events.task_state import (
    AWAITING_CHECKS, FINAL, PR_OPEN, TASK_STATUSES, TRANSITIONS, WITH_AGENT, ApprovePullRequest, AssignTask,
    CancelTask, ChecksTimedOut, Command, CompleteMerge, CompleteTask, CreateTask, DequeueMerge, FailTask,
    OpenPullRequest, RecordAnalysis, RecordChecks, RecordConflict, RequestRerun, RequeueTask, RetryTask,
    StartAnalysis, StartMergeTest, StartTask, StartTests, TaskState, decide, evolve, fold,
)
from tests.support.domain import (
    A1, A2, ACTOR, AT, B1, CHANGED, FLAKY, GREEN_BASE, H1, H2, HAPPY, INFRA, ISSUE, M1, PASS, PATHS, Q1, RED,
    TID, WAITING, checks, cmd, ev, history, run, task,
)

EVENT_TYPES: tuple[type, ...] = typing.get_args(TaskEvent)
COMMANDS: list[type] = Command.__subclasses__()


def test_every_status_is_reachable():
    assert set(PATHS) == set(TASK_STATUSES)
    for status in TASK_STATUSES:
        assert fold(history(status)).status == status


# -- every legal transition, through decide ------------------------------------------
USAGE = Usage(model="m", input_tokens=10, output_tokens=5, dollars=0.25)
R_CHANGE = "test failed (failure) and its log names src/calc.py, which the change touches"
R_FLAKY = ("test passed on the base commit and its log names nothing the change touches: "
           "possibly flaky, re-run once")
R_WAITING = ("test waits for a maintainer to approve the workflow run (first-time contributors' and "
             "bots' runs need approval)")
R_TIMEOUT = f"the checks of {H1[:12]} did not finish within 30 min"
NEEDED_CI = "look at the CI: a check is stuck, waits for a runner, or never started"
NEEDED_APPROVAL = "a maintainer approves the pending workflow run(s) on the pull request"
CONFLICT = dict(base_branch="main", base_sha=B1, files=CHANGED)
REBASE = dict(kind="rebase", number=1, reason="rebase on main: conflicts in src/calc.py",
              guidance=f"main moved ({B1[:12]}) and this branch conflicts with it in: src/calc.py. "
                       "Rebase the change on it, keeping both sides' intent.")
CI_FIX = dict(kind="ci_fix", number=1, of=2, reason=R_CHANGE,
              guidance=guidance_for(RED, Verdict(classification="change", reason=R_CHANGE), 1, 2))
MERGE_TEST = dict(queue_ref="ccc/queue/main", queue_sha=Q1, base_sha=B1)


class Case(NamedTuple):
    """``command``, decided on ``history(start or status)`` after ``setup``, leads to
    exactly ``chain`` (event types and payloads) and leaves the task ``after``; the
    event under test is applied in the status under test somewhere in that chain."""

    command: Command
    chain: list[tuple[type, dict]]
    after: str
    start: str | None = None
    setup: tuple = ()


def _legal_case(event_type: type, status: str) -> Case:
    """How ``event_type`` comes about from ``status``."""
    if event_type is TaskRequeued:
        if status == "failed":
            return Case(cmd(RetryTask, backoff_base=10), [(TaskRequeued, dict(
                reason="retry", attempt=2, agent_id=A1, not_before=AT + timedelta(seconds=10)))], "queued")
        return Case(cmd(RequeueTask, reason="agent_lost", agent_id=A1),
                    [(TaskRequeued, dict(reason="agent_lost", attempt=2, agent_id=A1))], "queued")
    analysis = dict(specialty="frontend", requirements=("a11y",), complexity="medium",
                    priority="high", security_level="internal", dependencies=("acme_repo-1",),
                    reasons=("label",), plan="do it", usage=USAGE, paths=("web/app.tsx",))
    pr = dict(agent_id=A1, branch="ccc/7", pr_url="https://x/pr/3", pr_number=3, draft=True,
              tests_passed=4, tests_failed=0, head_sha=H2, base_branch="main")
    tests = dict(agent_id=A1, files_changed=("a.py",), diff_stat="+1", diff_ref="obj:1", usage=USAGE)
    passed = (TaskChecksPassed, dict(head_sha=Q1 if status == "merging" else H1, checks=PASS))
    red = (TaskChecksFailed, dict(head_sha=H1, classification="change", reason=R_CHANGE, checks=RED))
    flaky = (TaskChecksFailed, dict(head_sha=H1, classification="flaky", reason=R_FLAKY, checks=FLAKY))
    waiting = (TaskChecksFailed, dict(head_sha=H1, classification="action_required", reason=R_WAITING,
                                      checks=WAITING))
    rerun = (TaskChecksRerun, dict(head_sha=H1, checks=("test",), reason=R_FLAKY, rerun=1, cause="flaky"))
    conflicted = (TaskConflicted, CONFLICT)
    cases = {
        TaskAnalysisStarted: Case(cmd(StartAnalysis, analyser="llm"),
                                  [(TaskAnalysisStarted, dict(analyser="llm"))], "analyzing"),
        TaskAnalyzed: Case(cmd(RecordAnalysis, analysis=Analysis(**analysis)), [(TaskAnalyzed, analysis)],
                           "queued"),
        TaskAssigned: Case(cmd(AssignTask, agent_id=A2), [(TaskAssigned, dict(agent_id=A2, attempt=1))],
                           "assigned"),
        TaskStarted: Case(cmd(StartTask, agent_id=A1, workspace="/w"),
                          [(TaskStarted, dict(agent_id=A1, workspace="/w"))], "in_progress"),
        TaskTestsStarted: Case(cmd(StartTests, **tests), [(TaskTestsStarted, tests)], "testing"),
        TaskPullRequestOpened: Case(cmd(OpenPullRequest, **pr), [(TaskPullRequestOpened, pr)], "checking"),
        TaskCompleted: Case(cmd(CompleteTask), [(TaskCompleted, dict(reason="pull request merged"))],
                            "completed"),
        TaskFailed: Case(cmd(FailTask, reason="boom", phase=status, agent_id=A1, log_ref="obj:2"),
                         [(TaskFailed, dict(reason="boom", phase=status, retryable=True, log_ref="obj:2"))],
                         "failed"),
        TaskCancellationRequested: Case(cmd(CancelTask, reason="stop"),
                                        [(TaskCancellationRequested,
                                          dict(reason="stop", requested_by=ACTOR))],
                                        status),
        TaskCancelled: Case(cmd(CancelTask, reason="stop", force=True),
                            [(TaskCancelled, dict(reason="stop"))], "cancelled"),
        # checking/needs_human -> review; merging stays merging (the merge follows)
        TaskChecksPassed: Case(checks(passed[1]["head_sha"]), [passed],
                               "merging" if status == "merging" else "review"),
        TaskChecksFailed: Case(checks(H1, RED), [red, (TaskFixQueued, CI_FIX)], "queued"),
        TaskChecksRerun: {
            "checks_failed": Case(checks(H1, FLAKY, base=GREEN_BASE), [flaky, rerun], "checking",
                                  start="checking"),
            "needs_human": Case(cmd(RequestRerun, reason="approved the run"), [(TaskChecksRerun, dict(
                head_sha=H1, reason="approved the run", rerun=1, cause="requested"))], "checking"),
            "merging": Case(checks(Q1, FLAKY, base=GREEN_BASE), [(TaskChecksRerun, dict(
                head_sha=Q1, checks=("test",), reason=R_FLAKY, rerun=1, cause="flaky"))], "merging"),
        }.get(status),
        TaskNeedsHuman: {
            "checking": Case(cmd(ChecksTimedOut, waited=1800), [(TaskNeedsHuman, dict(
                reason=R_TIMEOUT, needed=NEEDED_CI))], "needs_human"),
            "checks_failed": Case(checks(H1, WAITING), [waiting, (TaskNeedsHuman, dict(
                reason=R_WAITING, needed=NEEDED_APPROVAL))], "needs_human", start="checking"),
            "review": Case(cmd(ChecksTimedOut, waited=1800), [
                (TaskMergeDequeued, dict(reason=f"left the merge queue: the checks of {Q1[:12]} did not "
                                                "finish within 30 min")),
                (TaskNeedsHuman, dict(reason=f"the checks of {Q1[:12]} did not finish within 30 min",
                                      needed=NEEDED_CI))], "needs_human", start="merging"),
            "conflicted": Case(cmd(RecordConflict, max_rebases=0, **CONFLICT), [conflicted, (
                TaskNeedsHuman, dict(reason="still conflicting after 0 rebase(s)",
                                     needed="resolve the conflicts with main by hand"))],
                "needs_human", start="checking"),
        }.get(status),
        TaskFixQueued: {
            "checks_failed": Case(checks(H1, RED), [red, (TaskFixQueued, CI_FIX)], "queued",
                                  start="checking"),
            "conflicted": Case(cmd(RecordConflict, **CONFLICT), [conflicted, (TaskFixQueued, REBASE)],
                               "queued", start="checking"),
        }.get(status),
        TaskConflicted: Case(cmd(RecordConflict, **CONFLICT), [conflicted, (TaskFixQueued, REBASE)],
                             "queued"),
        TaskApproved: Case(cmd(ApprovePullRequest, by="alice"), [(TaskApproved, dict(by="alice"))], status),
        TaskMergeQueued: Case(cmd(ApprovePullRequest, by="alice", merge_queue=True),
                              [(TaskApproved, dict(by="alice")), (TaskMergeQueued, {})], "merge_queued"),
        TaskMergeTesting: Case(cmd(StartMergeTest, **MERGE_TEST), [(TaskMergeTesting, MERGE_TEST)],
                               "merging"),
        TaskMergeDequeued: Case(cmd(DequeueMerge, reason="approval withdrawn"),
                                [(TaskMergeDequeued, dict(reason="approval withdrawn"))], "review"),
        TaskMerged: Case(cmd(CompleteMerge, base_branch="main", merge_sha=M1),
                         [(TaskMerged, dict(base_branch="main", merge_sha=M1))], "completed",
                         setup=(checks(Q1),)),
    }
    case = cases[event_type]
    assert case is not None, f"no case for {event_type.__name__} from {status}"
    return case


LEGAL = [(t, s) for t, (froms, _) in TRANSITIONS.items() for s in sorted(froms)]


@pytest.mark.parametrize(("event_type", "status"), LEGAL, ids=[f"{t.__name__}-from-{s}" for t, s in LEGAL])
def test_legal_transition(event_type, status):
    case = _legal_case(event_type, status)
    past = run(case.setup, history(case.start or status))
    expected = [ev(t, len(past) + i, **payload) for i, (t, payload) in enumerate(case.chain, 1)]
    after = task(past).when(case.command).then(expected)
    assert after.status == case.after
    assert after.version == len(past) + len(expected) and after.updated_at == AT
    state, applied = fold(past), []
    for event in expected:  # each step leads where the table says
        applied.append((type(event), state.status))
        state = evolve(state, event)
        assert state.status == (TRANSITIONS[type(event)][1] or state.status)
    assert (event_type, status) in applied


def test_create_once():
    create = cmd(CreateTask, task_id=TID, issue=ISSUE, max_attempts=2)
    after = task([]).when(create).then([ev(TaskCreated, 1, issue=ISSUE, max_attempts=2)])
    assert (after.status, after.attempt, after.max_attempts, after.agent_id) == ("pending", 1, 2, None)
    task(history("pending")).when(create).then_raises(IllegalTransition, "create")
    task([]).when(msgspec.structs.replace(create, max_attempts=0)).then_raises(DomainError, "max_attempts")


# -- every illegal transition ----------------------------------------------------------
SAMPLE_PAYLOAD = {
    TaskCreated: dict(issue=ISSUE), TaskAnalysisStarted: {}, TaskAnalyzed: {},
    TaskAssigned: dict(agent_id=A1, attempt=1), TaskStarted: dict(agent_id=A1),
    TaskTestsStarted: dict(agent_id=A1), TaskPullRequestOpened: dict(agent_id=A1, branch="b"),
    TaskCompleted: {}, TaskFailed: dict(reason="x"), TaskRequeued: dict(reason="retry", attempt=2),
    TaskCancellationRequested: {}, TaskCancelled: {},
    TaskChecksPassed: dict(head_sha=H1),
    TaskChecksFailed: dict(head_sha=H1, classification="change", reason="x"),
    TaskChecksRerun: dict(head_sha=H1), TaskNeedsHuman: dict(reason="x"),
    TaskFixQueued: dict(kind="ci_fix", number=1), TaskConflicted: {}, TaskApproved: {}, TaskMergeQueued: {},
    TaskMergeTesting: dict(queue_ref="q", queue_sha=Q1), TaskMergeDequeued: dict(reason="x"), TaskMerged: {},
}
ALLOWED: dict[type, frozenset[str]] = {  # command -> statuses it is accepted in
    CreateTask: frozenset(), StartAnalysis: frozenset({"pending"}),
    RecordAnalysis: frozenset({"analyzing"}), AssignTask: frozenset({"queued"}),
    StartTask: frozenset({"assigned"}), StartTests: frozenset({"in_progress"}),
    OpenPullRequest: frozenset({"testing"}), CompleteTask: PR_OPEN,
    FailTask: TRANSITIONS[TaskFailed][0], RetryTask: frozenset({"failed"}),
    RequeueTask: WITH_AGENT, CancelTask: frozenset(TASK_STATUSES) - FINAL,
    RecordChecks: frozenset({"checking", "merging", "needs_human"}), ChecksTimedOut: AWAITING_CHECKS,
    RequestRerun: frozenset({"needs_human"}),
    RecordConflict: frozenset({"checking", "checks_failed", "review", "needs_human", "merge_queued"}),
    ApprovePullRequest: PR_OPEN, StartMergeTest: frozenset({"merge_queued"}),
    DequeueMerge: frozenset({"merge_queued", "merging"}), CompleteMerge: frozenset({"merging"}),
}
# accepted in the status, refused by a rule in the history's state
REFUSED: dict[tuple[type, str], str] = {(CompleteMerge, "merging"): "checks have not passed"}
SAMPLE_COMMAND = {  # a dict, or a function of the state the command is decided on
    CreateTask: dict(task_id=TID, issue=ISSUE), StartAnalysis: {}, RecordAnalysis: {},
    AssignTask: dict(agent_id=A1), StartTask: dict(agent_id=A1), StartTests: dict(agent_id=A1),
    OpenPullRequest: dict(agent_id=A1, branch="b"), CompleteTask: {},
    FailTask: dict(reason="x", agent_id=A1), RetryTask: {},
    RequeueTask: dict(reason="agent_lost", agent_id=A1), CancelTask: {},
    RecordChecks: lambda s: dict(checks=PASS, head_sha=H1 if s is None else
                                 s.queue_sha if s.status == "merging" else s.head_sha),
    ChecksTimedOut: dict(waited=600), RequestRerun: {}, RecordConflict: dict(base_branch="main"),
    ApprovePullRequest: dict(by="alice"), StartMergeTest: dict(queue_ref="q", queue_sha=Q1),
    DequeueMerge: dict(reason="x"), CompleteMerge: {},
}


def test_tables_cover_every_event_and_command():
    assert set(SAMPLE_PAYLOAD) == set(EVENT_TYPES) == set(TRANSITIONS) | {TaskCreated}
    assert set(ALLOWED) == set(SAMPLE_COMMAND) == set(COMMANDS)


ILLEGAL_EVENTS = [(t, s) for t, s in product(EVENT_TYPES, ("absent", *TASK_STATUSES))
                  if s not in TRANSITIONS.get(t, ({"absent"}, None))[0]]


@pytest.mark.parametrize(("event_type", "status"), ILLEGAL_EVENTS,
                         ids=[f"{t.__name__}-from-{s}" for t, s in ILLEGAL_EVENTS])
def test_evolve_refuses_illegal_transition(event_type, status):
    state = fold(history(status)) if status != "absent" else None
    with pytest.raises(IllegalTransition):
        evolve(state, ev(event_type, (state.version if state else 0) + 1, **SAMPLE_PAYLOAD[event_type]))


COMMAND_MATRIX = list(product(COMMANDS, ("absent", *TASK_STATUSES)))


@pytest.mark.parametrize(("command", "status"), COMMAND_MATRIX,
                         ids=[f"{c.__name__}-in-{s}" for c, s in COMMAND_MATRIX])
def test_command_in_status(command, status):
    past = history(status) if status != "absent" else []
    sample = SAMPLE_COMMAND[command]
    when = task(past).when(cmd(command, **(sample(fold(past)) if callable(sample) else sample)))
    if (command, status) in REFUSED:
        when.then_raises(DomainError, REFUSED[command, status])
    elif status in ALLOWED[command] or (status, command) == ("absent", CreateTask):
        events = when.decide()
        assert events, "an accepted command decided nothing"
        after = when.then(events)  # and evolve accepts every event of the chain
        assert after.version == len(past) + len(events)
        if not past:
            assert after.status == "pending"
    elif status == "absent":
        when.then_raises(DomainError, "no such task")
    else:
        when.then_raises(IllegalTransition)


# -- specific rules ------------------------------------------------------------------
def test_backoff_doubles_and_caps():
    assert [backoff(n, 5.0, 300.0) for n in (0, 1, 2, 3, 6, 7, 50)] == [5, 5, 10, 20, 160, 300, 300]


def test_the_analysis_is_recorded_flat_and_kept_in_the_state():
    """One declaration (``Analysis``): the event carries its fields flat after the envelope
    (the JSON of ``task.analyzed`` never nests), and the state keeps them, same names and
    defaults, in the same order; its usage goes into the task's cost."""
    fields = msgspec.structs.fields
    analysis = {f.name: (f.type, f.default) for f in fields(Analysis)}
    event = {f.name: (f.type, f.default) for f in fields(TaskAnalyzed) if f.name in analysis}
    assert event == analysis and list(event) == list(analysis)
    kept = [f for f in fields(Analysis) if f.name != "usage"]
    state = {f.name: f.default for f in fields(TaskState) if f.name in analysis}
    assert state == {f.name: f.default for f in kept} and list(state) == [f.name for f in kept]

    full = Analysis(specialty="frontend", requirements=("a11y",), complexity="medium", priority="high",
                    security_level="internal", dependencies=("acme_repo-1",), reasons=("label",),
                    plan="do it", usage=USAGE)
    log = run([cmd(StartAnalysis), cmd(RecordAnalysis, analysis=full)], history("pending"))
    assert log[-1].analysis == full
    wire = msgspec.json.decode(encode(log[-1]))
    assert wire["type"] == "task.analyzed" and wire["specialty"] == "frontend" and "analysis" not in wire
    state = fold(log)
    assert {name: getattr(state, name) for name in ts.ANALYSIS_IN_STATE} == {
        name: getattr(full, name) for name in ts.ANALYSIS_IN_STATE}
    assert state.dollars == USAGE.dollars


def test_retry_increments_attempt_with_exponential_backoff():
    log = history("failed", max_attempts=4)
    for attempt in (1, 2, 3):
        retry = cmd(RetryTask, backoff_base=2.0, backoff_max=5.0)
        due = AT + timedelta(seconds=min(5.0, 2.0 * 2 ** (attempt - 1)))
        task(log).when(retry).then([ev(TaskRequeued, len(log) + 1, reason="retry", attempt=attempt + 1,
                                       not_before=due, agent_id=A1)])
        log = run([retry, cmd(AssignTask, agent_id=A1, at=due), cmd(StartTask, agent_id=A1),
                   cmd(FailTask, reason="red", agent_id=A1)], log)
    assert fold(log).attempt == 4 and not fold(log).can_retry
    task(log).when(cmd(RetryTask)).then_raises(DomainError, "attempts exhausted")


@pytest.mark.parametrize(("log", "why"), [
    (run([cmd(FailTask, reason="bad repo", retryable=False)], history("in_progress")), "not retryable"),
    (history("failed", max_attempts=1), "attempts exhausted"),
    (run([cmd(CancelTask, reason="stop"), cmd(FailTask, reason="red", agent_id=A1)], history("in_progress")),
     "cancellation requested"),
], ids=["not-retryable", "exhausted", "cancel-requested"])
def test_retry_refused(log, why):
    assert fold(log).status == "failed" and not fold(log).can_retry
    task(log).when(cmd(RetryTask)).then_raises(DomainError, why)
    task(log).when(cmd(CancelTask)).then([ev(TaskCancelled, len(log) + 1)])  # cancel still works


def test_assign_waits_for_backoff():
    log = run([cmd(RetryTask, backoff_base=30)], history("failed"))
    due = AT + timedelta(seconds=30)
    assert fold(log).not_before == due
    early = cmd(AssignTask, agent_id=A2, at=due - timedelta(microseconds=1))
    task(log).when(early).then_raises(DomainError, "backoff")
    after = task(log).when(cmd(AssignTask, agent_id=A2, at=due)).then(
        [ev(TaskAssigned, len(log) + 1, at=due, agent_id=A2, attempt=2)])
    assert after.not_before is None and after.agent_id == A2


@pytest.mark.parametrize("status", sorted(WITH_AGENT))
@pytest.mark.parametrize("reason", ["agent_lost", "handed_back"])
def test_requeue_only_by_the_holding_agent(status, reason):
    log = history(status)
    task(log).when(cmd(RequeueTask, reason=reason, agent_id=A2)).then_raises(IllegalTransition, A2)
    after = task(log).when(cmd(RequeueTask, reason=reason, agent_id=A1)).then(
        [ev(TaskRequeued, len(log) + 1, reason=reason, attempt=2, agent_id=A1)])
    assert (after.status, after.agent_id, after.attempt, after.not_before) == ("queued", None, 2, None)


def test_stale_agent_refused_after_reassignment():
    log = run([cmd(RequeueTask, reason="agent_lost", agent_id=A1), cmd(AssignTask, agent_id=A2)],
              history("in_progress"))
    task(log).when(cmd(RequeueTask, reason="agent_lost", agent_id=A1)).then_raises(IllegalTransition)
    task(log).when(cmd(StartTask, agent_id=A1)).then_raises(IllegalTransition, "assigned to agent-2")


@pytest.mark.parametrize("status", sorted(WITH_AGENT))
def test_requeue_with_attempts_exhausted_fails_for_good(status):
    log = history(status, max_attempts=1)
    after = task(log).when(cmd(RequeueTask, reason="agent_lost", agent_id=A1)).then(
        [ev(TaskFailed, len(log) + 1, reason=f"agent {A1} lost; attempts exhausted", phase=status,
            retryable=False)])
    assert after.status == "failed" and not after.can_retry


@pytest.mark.parametrize("status", sorted(WITH_AGENT))
def test_cancel_with_agent_asks_first_then_forces(status):
    log = history(status)
    asked = run([cmd(CancelTask, reason="stop")], log)
    assert asked[-1] == ev(TaskCancellationRequested, len(log) + 1, reason="stop", requested_by=ACTOR)
    assert fold(asked).status == status and fold(asked).cancel_requested
    task(asked).when(cmd(CancelTask, reason="again")).then([])  # idempotent
    after = task(asked).when(cmd(CancelTask, reason="ack", force=True)).then(
        [ev(TaskCancelled, len(asked) + 1, reason="ack")])
    assert after.status == "cancelled" and after.final


@pytest.mark.parametrize(("reason", "text"), [("agent_lost", "lost"), ("handed_back", "handed it back")])
def test_cancel_requested_then_agent_gone_cancels_instead_of_requeueing(reason, text):
    asked = run([cmd(CancelTask, reason="stop")], history("in_progress", max_attempts=1))
    after = task(asked).when(cmd(RequeueTask, reason=reason, agent_id=A1)).then(
        [ev(TaskCancelled, len(asked) + 1, reason=f"cancellation requested; agent {A1} {text}")])
    assert after.status == "cancelled"


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - FINAL - WITH_AGENT))
def test_cancel_without_agent_at_work_is_immediate(status):
    log = history(status)
    task(log).when(cmd(CancelTask, reason="dup")).then([ev(TaskCancelled, len(log) + 1, reason="dup")])


@pytest.mark.parametrize(("status", "force"), list(product(sorted(FINAL), [False, True])))
def test_cancel_of_final_task_is_illegal(status, force):
    task(history(status)).when(cmd(CancelTask, force=force)).then_raises(IllegalTransition, "cancel")


NON_ASSIGNEE = [("assigned", StartTask, {}), ("in_progress", StartTests, {}),
                ("testing", OpenPullRequest, dict(branch="b"))] + [
    (s, FailTask, dict(reason="x")) for s in sorted(TRANSITIONS[TaskFailed][0])]


@pytest.mark.parametrize(("status", "command", "kw"), NON_ASSIGNEE)
def test_non_assignee_is_refused(status, command, kw):
    log = history(status)
    assert fold(log).agent_id == A1
    task(log).when(cmd(command, agent_id=A2, **kw)).then_raises(IllegalTransition, "assigned to agent-1")


def test_fail_without_agent_is_the_coordinator():
    log = history("review")
    after = task(log).when(cmd(FailTask, reason="PR closed", phase="review")).then(
        [ev(TaskFailed, len(log) + 1, reason="PR closed", phase="review")])
    assert (after.failure_reason, after.failure_phase, after.can_retry) == ("PR closed", "review", True)


@pytest.mark.parametrize("field", [dict(specialty="cooking"), dict(complexity="epic"), dict(priority="p0"),
                                   dict(security_level="secret"), dict(requirements=("ok", 3)),
                                   dict(usage="junk"), dict(usage={"dollars": "free"})])
def test_analysis_with_invalid_value_is_refused(field):
    task(history("analyzing")).when(cmd(RecordAnalysis, analysis=Analysis(**field))).then_raises(
        DomainError, "invalid task.analyzed")
    task(history("in_progress")).when(cmd(StartTests, agent_id=A1, usage=field.get("usage", 1))).then_raises(
        DomainError, "invalid task.testing")


def test_usage_accumulates():
    log = run([cmd(StartAnalysis), cmd(RecordAnalysis, analysis=Analysis(usage=USAGE)),
               cmd(AssignTask, agent_id=A1), cmd(StartTask, agent_id=A1),
               cmd(StartTests, agent_id=A1, usage=USAGE)], history("pending"))
    state = fold(log)
    assert (state.dollars, state.input_tokens, state.output_tokens) == (0.5, 20, 10)


def test_version_gap_duplicate_and_bad_first_version():
    log = history("queued")
    state = fold(log)
    for bad, first in [(ev(TaskAssigned, 5, agent_id=A1, attempt=1), state), (log[-1], state),
                       (ev(TaskCreated, 2, issue=ISSUE), None)]:
        with pytest.raises(VersionMismatch):
            evolve(first, bad)


def test_envelope_comes_from_the_command():
    at = AT + timedelta(days=3, microseconds=7)
    state = fold(history("queued"))
    [event] = decide(state, AssignTask(at=at, actor="scheduler", causation_id="agent-9:4", agent_id=A1))
    assert (event.event_id, event.task_id, event.version) == (f"{TID}:4", TID, 4)
    assert (event.occurred_at, event.actor, event.correlation_id, event.causation_id) == (
        at, "scheduler", TID, "agent-9:4")
    assert fold([event], state).updated_at == at and state.status == "queued"  # decide mutated nothing


# -- codec round trip -----------------------------------------------------------------
ALL_EVENTS = history("pending") + [ev(t, 20, causation_id="x:1", **payload) for event_type, status in LEGAL
                                   for t, payload in _legal_case(event_type, status).chain]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: e.__struct_config__.tag)
def test_codec_round_trip(event):
    assert {type(e) for e in ALL_EVENTS} == set(EVENT_TYPES)
    assert decode_event(event.rel_subject, encode(event)) == event


ASSIGNED = ev(TaskAssigned, 4, agent_id=A1, attempt=1)
GOOD = encode(ASSIGNED)
BAD = {  # (subject, payload) pairs decode_event must refuse
    "other-agent": (f"task.{TID}.assigned.{A2}", GOOD),  # smuggled onto another agent's subject
    "no-agent": (f"task.{TID}.assigned", GOOD), "other-task": (f"task.x-1.assigned.{A1}", GOOD),
    "non-json": (None, b"{not json"), "empty": (None, b""), "array": (None, b"[1, 2]"),
    "unknown-type": (None, GOOD.replace(b"task.assigned", b"task.exploded")),
    "version-str": (None, GOOD.replace(b'"version":4', b'"version":"4"')),
    "attempt-null": (None, GOOD.replace(b'"attempt":1', b'"attempt":null')),
    "missing-fields": (None, msgspec.json.encode({"type": "task.assigned", "task_id": TID})),
    "oversize": (None, b" " * (MAX_EVENT_BYTES + 1)),
}


@pytest.mark.parametrize(("subject", "data"), BAD.values(), ids=BAD.keys())
def test_decode_rejects(subject, data):
    assert decode_event(ASSIGNED.rel_subject, GOOD) == ASSIGNED
    with pytest.raises(BadEventError):
        decode_event(subject or ASSIGNED.rel_subject, data)


# -- property: random command sequences keep the invariants ------------------------------
_agent = st.sampled_from([A1, A2])
_head = st.sampled_from([H1, H2, Q1])
_runs = st.sampled_from([PASS, RED, FLAKY, INFRA, WAITING])
_any_command = st.one_of(
    st.builds(cmd, st.sampled_from([StartAnalysis, RecordAnalysis, CompleteTask, RetryTask, RequestRerun,
                                    ApprovePullRequest, CompleteMerge])),
    st.builds(cmd, st.sampled_from([AssignTask, StartTask, StartTests]), agent_id=_agent,
              at=st.integers(0, 7200).map(lambda s: AT + timedelta(seconds=s))),
    st.builds(cmd, st.just(OpenPullRequest), agent_id=_agent, branch=st.just("b"), head_sha=_head),
    st.builds(cmd, st.just(FailTask), reason=st.just("x"), retryable=st.booleans(),
              agent_id=st.none() | _agent),
    st.builds(cmd, st.just(RequeueTask), reason=st.sampled_from(["agent_lost", "handed_back"]),
              agent_id=_agent),
    st.builds(cmd, st.just(CancelTask), force=st.booleans()),
    st.builds(cmd, st.just(CreateTask), task_id=st.just(TID), issue=st.just(ISSUE)),
    st.builds(cmd, st.just(RecordChecks), head_sha=_head, checks=_runs,
              base=st.sampled_from([{}, GREEN_BASE]), merge_queue=st.booleans()),
    st.builds(cmd, st.just(ChecksTimedOut), waited=st.floats(0, 1e5)),
    st.builds(cmd, st.just(RecordConflict), base_branch=st.just("main"), max_rebases=st.integers(0, 2)),
    st.builds(cmd, st.just(ApprovePullRequest), by=st.sampled_from(["", "alice"]), merge_queue=st.booleans()),
    st.builds(cmd, st.just(StartMergeTest), queue_ref=st.just("q"), queue_sha=_head),
    st.builds(cmd, st.just(DequeueMerge), reason=st.just("x")),
)
_DETOURS = [cmd(FailTask, reason="x"), cmd(RetryTask), cmd(RequeueTask, reason="agent_lost", agent_id=A1),
            cmd(CompleteTask)]  # (a person merges the pull request)
_ON_THE_PR = [checks(H1, runs) for runs in (PASS, PASS, RED, RED, FLAKY, INFRA, WAITING)] + [
    cmd(ChecksTimedOut, waited=3600), cmd(RequestRerun),
    cmd(RecordConflict, base_branch="main", files=CHANGED),
    cmd(ApprovePullRequest, by="alice", merge_queue=True), cmd(StartMergeTest, **MERGE_TEST),
    cmd(DequeueMerge, reason="x"), cmd(CompleteMerge, merge_sha=M1)]
_PUSHES = [H1, H2, "4" * 40, "5" * 40, "6" * 40]


def _next_step(state, data):
    """Mostly a plausible next step, by the assignee, on the awaited commit, so that deep
    states (fix rounds, the merge queue) are reached."""
    nxt = [c for c in HAPPY[:-1] * 4 + _DETOURS + _ON_THE_PR * 2 if state.status in ALLOWED[type(c)]]
    if not nxt or not data.draw(st.integers(0, 3)):
        return data.draw(_any_command)
    at = max(state.updated_at, state.not_before or AT) + timedelta(seconds=data.draw(st.integers(0, 60)))
    command = msgspec.structs.replace(data.draw(st.sampled_from(nxt)), at=at)
    if state.agent_id and hasattr(command, "agent_id"):
        command = msgspec.structs.replace(command, agent_id=state.agent_id)
    if isinstance(command, RecordChecks):  # the checks of the commit awaited
        command = msgspec.structs.replace(
            command, head_sha=state.queue_sha if state.status == "merging" else state.head_sha)
    if isinstance(command, OpenPullRequest):  # every push a new commit
        command = msgspec.structs.replace(command, head_sha=data.draw(st.sampled_from(_PUSHES)))
    return command


def _check_invariants(state: TaskState, log):
    assert 1 <= state.attempt <= state.max_attempts
    assert state.attempt == 1 + sum(isinstance(e, TaskRequeued) for e in log)
    assert [e.version for e in log] == list(range(1, state.version + 1))
    if state.status in ("pending", "analyzing", "queued"):
        assert state.agent_id is None and not state.cancel_requested
    if state.status in WITH_AGENT | PR_OPEN | {"failed", "completed"}:
        assert state.agent_id is not None
    if state.not_before is not None:
        assert state.status in ("queued", "cancelled")
    # attempts only grow; besides its first one, an attempt's assignments are fix/rebase rounds
    assigned = [e.attempt for e in log if isinstance(e, TaskAssigned)]
    assert assigned == sorted(assigned) and len(set(assigned)) <= state.max_attempts
    assert len(assigned) <= sum(isinstance(e, (TaskAnalyzed, TaskRequeued, TaskFixQueued)) for e in log)
    # CI fixes are counted apart from the attempts, and bounded (RecordChecks' default: 2)
    fixes = [e.number for e in log if isinstance(e, TaskFixQueued) and e.kind == "ci_fix"]
    assert fixes == list(range(1, state.ci_fixes + 1)) and state.ci_fixes <= 2
    if state.cancel_requested and state.status == "failed":
        assert not state.can_retry  # a requested cancel is never undone by a retry
    if state.status == "failed" and state.failure_phase == "checks":
        assert not state.can_retry  # CI fixes exhausted: a retry would not help
    # the pull request's way to green
    if state.checks_since is not None:
        assert state.status in AWAITING_CHECKS
    if state.status == "checking":
        assert state.checks_since is not None and state.head_sha == log_last_push(log)
    assert bool(state.needed) == (state.status == "needs_human")
    if state.status in ("merge_queued", "merging"):
        assert state.approved
    if state.status == "merging":
        assert state.queue_sha
    if state.status == "completed" and isinstance(log[-1], TaskMerged):
        assert not state.checks_since and not failing(state.checks)  # merged green only
    if state.status in ("checks_failed", "conflicted"):
        raise AssertionError(f"a decision rested in {state.status}, which a chain only passes through")


def log_last_push(log) -> str:
    return next(e.head_sha for e in reversed(log) if isinstance(e, TaskPullRequestOpened))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@for_all(st.integers(1, 4), st.data())
def test_random_commands_keep_invariants(max_attempts, data):
    log = decide(None, cmd(CreateTask, task_id=TID, issue=ISSUE, max_attempts=max_attempts))
    state = fold(log)
    for _ in range(data.draw(st.integers(0, 80))):
        try:
            new = decide(state, _next_step(state, data))
        except DomainError:
            continue  # anything else (TypeError, ValidationError...) fails the test
        assert not state.final, "a final task accepted a command"
        assert all(decode_event(e.rel_subject, encode(e)) == e for e in new)
        state = fold(new, state)
        log += new
        _check_invariants(state, log)
    assert fold(log) == state  # replaying the log gives the same state
    for reached in sorted({fold(log[:i]).status for i in range(1, len(log) + 1)}):
        note_event(f"reached {reached}")  # see --hypothesis-show-statistics
