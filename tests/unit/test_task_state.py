"""Pure domain tests of the task state machine (no NATS).

Histories are produced by ``decide`` itself, so every state a test starts from is one
the real machine can reach. The transition matrices are generated from the
``TRANSITIONS`` table: a new transition or command without a case here fails.
"""

from __future__ import annotations

import typing
from datetime import timedelta
from itertools import product

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import given as for_all
from hypothesis import strategies as st

from tests.support.domain import AT, Given, given
from events import task_state as ts
from events.codec import MAX_EVENT_BYTES, decode_event, encode
from events.errors import BadEventError, DomainError, IllegalTransition, VersionMismatch
from events.retry import backoff
from events.task import (
    Analysis, IssueRef, TaskAnalysisStarted, TaskAnalyzed, TaskAssigned, TaskCancellationRequested,
    TaskCancelled, TaskCompleted, TaskCreated, TaskEvent, TaskFailed, TaskPullRequestOpened,
    TaskRequeued, TaskStarted, TaskTestsStarted, Usage,
)
from events.task_state import (
    FINAL, TASK_STATUSES, TRANSITIONS, WITH_AGENT, AssignTask, CancelTask, Command, CompleteTask,
    CreateTask, FailTask, OpenPullRequest, RecordAnalysis, RequeueTask, RetryTask, StartAnalysis,
    StartTask, StartTests, TaskState, decide, evolve, fold,
)

TID = "acme_repo-7"
A1, A2 = "agent-1", "agent-2"
ACTOR = "coordinator"
ISSUE = IssueRef(source="github", repo="acme/repo", number=7, title="Fix it", labels=("bug",))
EVENT_TYPES: tuple[type, ...] = typing.get_args(TaskEvent)
COMMANDS: list[type] = Command.__subclasses__()


def cmd(cls: type, **kw) -> Command:
    kw.setdefault("at", AT)
    kw.setdefault("actor", ACTOR)
    return cls(**kw)


def ev(cls: type, version: int, *, at=AT, actor=ACTOR, causation_id=None, **payload) -> TaskEvent:
    return cls(event_id=f"{TID}:{version}", task_id=TID, version=version, occurred_at=at,
               correlation_id=TID, causation_id=causation_id, actor=actor, **payload)


def task(log) -> Given:
    return given(log, machine=ts)


def run(commands, events=()) -> list[TaskEvent]:
    """Decide and apply each command in turn; the log they produce."""
    log, state = list(events), fold(events)
    for c in commands:
        new = decide(state, c)
        state = fold(new, state)
        log += new
    return log


_HAPPY = [
    cmd(StartAnalysis), cmd(RecordAnalysis, analysis=Analysis(specialty="backend")),
    cmd(AssignTask, agent_id=A1), cmd(StartTask, agent_id=A1), cmd(StartTests, agent_id=A1),
    cmd(OpenPullRequest, agent_id=A1, branch="ccc/7"), cmd(CompleteTask),
]
PATHS = {status: _HAPPY[:i] for i, status in enumerate(
    ["pending", "analyzing", "queued", "assigned", "in_progress", "testing", "review", "completed"])}
PATHS["failed"] = _HAPPY[:5] + [cmd(FailTask, reason="tests red", phase="testing", agent_id=A1)]
PATHS["cancelled"] = [cmd(CancelTask, reason="duplicate")]


def history(status: str, max_attempts: int = 3) -> list[TaskEvent]:
    return run([cmd(CreateTask, task_id=TID, issue=ISSUE, max_attempts=max_attempts), *PATHS[status]])


def test_every_status_is_reachable():
    assert set(PATHS) == set(TASK_STATUSES)
    for status in TASK_STATUSES:
        assert fold(history(status)).status == status


# -- every legal transition, through decide ------------------------------------------
USAGE = Usage(model="m", input_tokens=10, output_tokens=5, dollars=0.25)


def _legal_case(event_type: type, status: str) -> tuple[Command, dict]:
    """The command that causes ``event_type`` from ``status`` and the payload expected."""
    if event_type is TaskRequeued:
        if status == "failed":
            return cmd(RetryTask, backoff_base=10), dict(reason="retry", attempt=2, agent_id=A1,
                                                         not_before=AT + timedelta(seconds=10))
        return cmd(RequeueTask, reason="agent_lost", agent_id=A1), dict(reason="agent_lost", attempt=2,
                                                                        agent_id=A1)
    analysis = dict(specialty="frontend", requirements=("a11y",), complexity="medium",
                    priority="high", security_level="internal", dependencies=("acme_repo-1",),
                    reasons=("label",), plan="do it", usage=USAGE)
    pr = dict(agent_id=A1, branch="ccc/7", pr_url="https://x/pr/3", pr_number=3, draft=True,
              tests_passed=4, tests_failed=0)
    tests = dict(agent_id=A1, files_changed=("a.py",), diff_stat="+1", diff_ref="obj:1", usage=USAGE)
    cases = {
        TaskAnalysisStarted: (cmd(StartAnalysis, analyser="llm"), dict(analyser="llm")),
        TaskAnalyzed: (cmd(RecordAnalysis, analysis=Analysis(**analysis)), analysis),
        TaskAssigned: (cmd(AssignTask, agent_id=A2), dict(agent_id=A2, attempt=1)),
        TaskStarted: (cmd(StartTask, agent_id=A1, workspace="/w"), dict(agent_id=A1, workspace="/w")),
        TaskTestsStarted: (cmd(StartTests, **tests), tests),
        TaskPullRequestOpened: (cmd(OpenPullRequest, **pr), pr),
        TaskCompleted: (cmd(CompleteTask), dict(reason="pull request merged")),
        TaskFailed: (cmd(FailTask, reason="boom", phase=status, agent_id=A1, log_ref="obj:2"),
                     dict(reason="boom", phase=status, retryable=True, log_ref="obj:2")),
        TaskCancellationRequested: (cmd(CancelTask, reason="stop"),
                                    dict(reason="stop", requested_by=ACTOR)),
        TaskCancelled: (cmd(CancelTask, reason="stop", force=True), dict(reason="stop")),
    }
    return cases[event_type]


LEGAL = [(t, s) for t, (froms, _) in TRANSITIONS.items() for s in sorted(froms)]


@pytest.mark.parametrize(("event_type", "status"), LEGAL, ids=[f"{t.__name__}-from-{s}" for t, s in LEGAL])
def test_legal_transition(event_type, status):
    past = history(status)
    command, payload = _legal_case(event_type, status)
    after = task(past).when(command).then([ev(event_type, len(past) + 1, **payload)])
    assert after.status == (TRANSITIONS[event_type][1] or status)
    assert after.version == len(past) + 1 and after.updated_at == AT


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
}
ALLOWED: dict[type, frozenset[str]] = {  # command -> statuses it is accepted in
    CreateTask: frozenset(), StartAnalysis: frozenset({"pending"}),
    RecordAnalysis: frozenset({"analyzing"}), AssignTask: frozenset({"queued"}),
    StartTask: frozenset({"assigned"}), StartTests: frozenset({"in_progress"}),
    OpenPullRequest: frozenset({"testing"}), CompleteTask: frozenset({"review"}),
    FailTask: TRANSITIONS[TaskFailed][0], RetryTask: frozenset({"failed"}),
    RequeueTask: WITH_AGENT, CancelTask: frozenset(TASK_STATUSES) - FINAL,
}
SAMPLE_COMMAND = {
    CreateTask: dict(task_id=TID, issue=ISSUE), StartAnalysis: {}, RecordAnalysis: {},
    AssignTask: dict(agent_id=A1), StartTask: dict(agent_id=A1), StartTests: dict(agent_id=A1),
    OpenPullRequest: dict(agent_id=A1, branch="b"), CompleteTask: {},
    FailTask: dict(reason="x", agent_id=A1), RetryTask: {},
    RequeueTask: dict(reason="agent_lost", agent_id=A1), CancelTask: {},
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
    when = task(past).when(cmd(command, **SAMPLE_COMMAND[command]))
    if status in ALLOWED[command] or (status, command) == ("absent", CreateTask):
        [event] = when.decide()
        after = when.then([event])  # and evolve accepts it
        to = TRANSITIONS[type(event)][1] if past else "pending"
        assert after.version == len(past) + 1 and after.status == (to or status)
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
ALL_EVENTS = history("pending") + [ev(t, 20, causation_id="x:1", **_legal_case(t, s)[1]) for t, s in LEGAL]


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
_any_command = st.one_of(
    st.builds(cmd, st.sampled_from([StartAnalysis, RecordAnalysis, CompleteTask, RetryTask])),
    st.builds(cmd, st.sampled_from([AssignTask, StartTask, StartTests]), agent_id=_agent,
              at=st.integers(0, 7200).map(lambda s: AT + timedelta(seconds=s))),
    st.builds(cmd, st.just(OpenPullRequest), agent_id=_agent, branch=st.just("b")),
    st.builds(cmd, st.just(FailTask), reason=st.just("x"), retryable=st.booleans(),
              agent_id=st.none() | _agent),
    st.builds(cmd, st.just(RequeueTask), reason=st.sampled_from(["agent_lost", "handed_back"]),
              agent_id=_agent),
    st.builds(cmd, st.just(CancelTask), force=st.booleans()),
    st.builds(cmd, st.just(CreateTask), task_id=st.just(TID), issue=st.just(ISSUE)),
)
_DETOURS = [cmd(FailTask, reason="x"), cmd(RetryTask), cmd(RequeueTask, reason="agent_lost", agent_id=A1)]


def _next_step(state, data):
    """Mostly a plausible next step, by the assignee, so that deep states are reached."""
    nxt = [c for c in _HAPPY * 4 + _DETOURS if state.status in ALLOWED[type(c)]]
    if not nxt or not data.draw(st.integers(0, 3)):
        return data.draw(_any_command)
    at = max(state.updated_at, state.not_before or AT) + timedelta(seconds=data.draw(st.integers(0, 60)))
    command = msgspec.structs.replace(data.draw(st.sampled_from(nxt)), at=at)
    if state.agent_id and hasattr(command, "agent_id"):
        command = msgspec.structs.replace(command, agent_id=state.agent_id)
    return command


def _check_invariants(state, log):
    assert 1 <= state.attempt <= state.max_attempts
    assert [e.version for e in log] == list(range(1, state.version + 1))
    if state.status in ("pending", "analyzing", "queued"):
        assert state.agent_id is None and not state.cancel_requested
    if state.status in WITH_AGENT | {"review", "failed", "completed"}:
        assert state.agent_id is not None
    if state.not_before is not None:
        assert state.status in ("queued", "cancelled")
    assigned = [e.attempt for e in log if isinstance(e, TaskAssigned)]  # one assignment per attempt
    assert assigned == sorted(set(assigned)) and len(assigned) <= state.max_attempts
    if state.cancel_requested and state.status == "failed":
        assert not state.can_retry  # a requested cancel is never undone by a retry


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@for_all(st.integers(1, 4), st.data())
def test_random_commands_keep_invariants(max_attempts, data):
    log = decide(None, cmd(CreateTask, task_id=TID, issue=ISSUE, max_attempts=max_attempts))
    state = fold(log)
    for _ in range(data.draw(st.integers(0, 60))):
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
