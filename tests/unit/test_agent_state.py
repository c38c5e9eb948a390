"""Pure domain tests of the agent state machine (no NATS).

Every starting state is reached through ``decide``; the transition matrices are
generated from ``TRANSITIONS`` and the command list, so an uncovered addition fails.
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
from events import agent_state as ag
from events.agent import (
    EVENT_OF_REPORT,
    AgentChangesPushed, AgentCodebaseAnalysed, AgentErrored, AgentEvent, AgentImplementationProduced,
    AgentMaintenanceEnded, AgentMaintenanceStarted, AgentPullRequestOpened, AgentRecovered,
    AgentRegistered, AgentTaskDeclined, AgentTaskReleased, AgentTaskStarted, AgentTestsRun,
    AgentWentOffline, AgentWorkFailed, AgentWorkspacePrepared, Heartbeat, WorkReport,
)
from events.codec import decode_event, encode
from events.work_reports import ChangesPushed, TestsRun, WorkReportBody
from events.errors import BadEventError, DomainError, IllegalTransition, VersionMismatch
from events.agent_state import (
    AGENT_STATUSES, HOLDING, ONLINE, REPORTS, TRANSITIONS, Command, DeclineTask, EnterMaintenance,
    GoOffline, LeaveMaintenance, Recover, RegisterAgent, ReleaseAgentTask, ReportError, ReportWork,
    StartAgentTask, decide, evolve, fold,
)

AG = "agent-1"
ACTOR = AG
EVENT_TYPES: tuple[type, ...] = typing.get_args(AgentEvent)
COMMANDS: list[type] = Command.__subclasses__()


def cmd(cls: type, **kw) -> Command:
    kw.setdefault("at", AT)
    kw.setdefault("actor", ACTOR)
    return cls(**kw)


def ev(cls: type, version: int, *, at=AT, actor=ACTOR, causation_id=None, **payload) -> AgentEvent:
    return cls(event_id=f"{AG}:{version}", agent_id=AG, version=version, occurred_at=at,
               correlation_id=AG, causation_id=causation_id, actor=actor, **payload)


def agent(log) -> Given:
    return given(log, machine=ag)


def run(commands, events=()) -> list[AgentEvent]:
    log, state = list(events), fold(events)
    for c in commands:
        new = decide(state, c)
        state = fold(new, state)
        log += new
    return log


def register(capacity: int = 2, **kw) -> RegisterAgent:
    return cmd(RegisterAgent, agent_id=AG, specialties=("backend", "testing"), capacity=capacity, **kw)


def start(*tasks: str) -> list[Command]:
    return [cmd(StartAgentTask, task_id=t) for t in tasks]


PATHS = {  # capacity 2 throughout
    "offline": [register(), cmd(GoOffline)], "idle": [register()], "busy": [register(), *start("t1")],
    "overloaded": [register(), *start("t1", "t2", "t3")],
    "maintenance": [register(), *start("t1"), cmd(EnterMaintenance, reason="upgrade")],
    "error": [register(), *start("t1"), cmd(ReportError, reason="disk full")],
}


def history(status: str) -> list[AgentEvent]:
    return run(PATHS[status]) if status != "absent" else []


def test_every_status_is_reachable():
    assert set(PATHS) == set(AGENT_STATUSES)
    for status in AGENT_STATUSES:
        assert fold(history(status)).status == status


# -- every legal transition --------------------------------------------------------------
LEGAL_CASES = {  # event type -> command, payload
    AgentRegistered: (register(capacity=3, clearance="confidential", host="h1", coder="claude"),
                      dict(specialties=("backend", "testing"), capacity=3, clearance="confidential",
                           host="h1", coder="claude")),
    AgentTaskStarted: (cmd(StartAgentTask, task_id="t9"), dict(task_id="t9")),
    AgentTaskReleased: (cmd(ReleaseAgentTask, task_id="t1", outcome="failed"),
                        dict(task_id="t1", outcome="failed")),
    AgentMaintenanceStarted: (cmd(EnterMaintenance, reason="upgrade"), dict(reason="upgrade")),
    AgentMaintenanceEnded: (cmd(LeaveMaintenance), {}),
    AgentErrored: (cmd(ReportError, reason="oom"), dict(reason="oom")),
    AgentRecovered: (cmd(Recover), {}),
    AgentWentOffline: (cmd(GoOffline, reason="heartbeat_timeout"), dict(reason="heartbeat_timeout")),
    AgentTaskDeclined: (cmd(DeclineTask, task_id="t9", attempt=2, reason="no free slot"),
                        dict(task_id="t9", attempt=2, reason="no free slot")),
}
REPORT_FIELDS = {  # a realistic payload for each work report about the held task t1
    AgentWorkspacePrepared: dict(path="/ws/agent-1/tasks/task-t1/repo", base_commit="abc123"),
    AgentCodebaseAnalysed: dict(languages={"python": 3}, test_command=("python", "-m", "pytest")),
    AgentImplementationProduced: dict(coder="scripted", files_changed=("app.py",), diff_stat="1 file changed",
                                      diff_ref="ccc_artifacts diffs/t1/1.diff", turns=2),
    AgentTestsRun: dict(command=("make", "test"), exit_code=0, passed=4, duration=1.5),
    AgentChangesPushed: dict(branch="ccc/task-t1-fix", commit="def456"),
    AgentPullRequestOpened: dict(branch="ccc/task-t1-fix", pr_url="file:///pr/1", pr_number=1, tests_passed=4),
    AgentWorkFailed: dict(phase="testing", reason="2 tests failed", retryable=True),
}
BODY_OF_EVENT = {event: body for body, event in EVENT_OF_REPORT.items()}
for _r in REPORTS:
    LEGAL_CASES[_r] = (
        cmd(ReportWork, task_id="t1", attempt=1, report=BODY_OF_EVENT[_r](**REPORT_FIELDS[_r])),
        dict(task_id="t1", attempt=1, **REPORT_FIELDS[_r]),
    )


def expected_status(event_type: type, status: str) -> str:
    fixed = {AgentRegistered: "idle", AgentMaintenanceStarted: "maintenance", AgentErrored: "error",
             AgentWentOffline: "offline", AgentMaintenanceEnded: "busy", AgentRecovered: "busy"}
    if event_type is AgentTaskStarted:  # 1 -> 2 tasks stays busy at capacity 2; 3 -> 4 overloaded
        return {"idle": "busy", "busy": "busy", "overloaded": "overloaded"}[status]
    if event_type is AgentTaskReleased:
        return {"busy": "idle", "overloaded": "busy"}.get(status, status)
    if event_type is AgentTaskDeclined or event_type in REPORTS:
        return status  # reports and declines never change the agent's status
    return fixed[event_type]


LEGAL = [(t, s) for t, froms in TRANSITIONS.items() for s in sorted(froms)]


@pytest.mark.parametrize(("event_type", "status"), LEGAL, ids=[f"{t.__name__}-from-{s}" for t, s in LEGAL])
def test_legal_transition(event_type, status):
    past = history(status)
    command, payload = LEGAL_CASES[event_type]
    if (event_type, status) == (AgentTaskReleased, "idle"):
        # the table allows it, but an idle agent holds no task, so there is nothing to release
        assert fold(past).active_tasks == ()
        agent(past).when(command).then_raises(IllegalTransition, "does not hold")
        return
    after = agent(past).when(command).then([ev(event_type, len(past) + 1, **payload)])
    assert after.status == expected_status(event_type, status)
    assert after.version == len(past) + 1 and after.updated_at == AT


# -- every illegal transition ----------------------------------------------------------
SAMPLE_PAYLOAD = {
    AgentRegistered: dict(specialties=("backend",)), AgentTaskStarted: dict(task_id="t9"),
    AgentTaskReleased: dict(task_id="t1"), AgentMaintenanceStarted: {}, AgentMaintenanceEnded: {},
    AgentErrored: dict(reason="x"), AgentRecovered: {}, AgentWentOffline: {},
    AgentTaskDeclined: dict(task_id="t9"),
    **{r: dict(task_id="t1", attempt=1, **REPORT_FIELDS[r]) for r in REPORTS},
}
ALLOWED = {  # command -> statuses it is accepted in ("absent": never registered)
    RegisterAgent: {"absent", *AGENT_STATUSES}, StartAgentTask: ONLINE,
    ReleaseAgentTask: {"busy", "overloaded", "maintenance", "error"},  # those holding t1
    EnterMaintenance: ONLINE | {"error"}, LeaveMaintenance: {"maintenance"},
    ReportError: ONLINE | {"maintenance"}, Recover: {"error"}, GoOffline: set(AGENT_STATUSES) - {"offline"},
    DeclineTask: set(AGENT_STATUSES) - {"offline"}, ReportWork: HOLDING,
}
SAMPLE_COMMAND = {
    RegisterAgent: dict(agent_id=AG, specialties=("backend",)), StartAgentTask: dict(task_id="t9"),
    ReleaseAgentTask: dict(task_id="t1"), EnterMaintenance: {}, LeaveMaintenance: {},
    ReportError: dict(reason="x"), Recover: {}, GoOffline: {},
    DeclineTask: dict(task_id="t9"),
    ReportWork: dict(task_id="t1", attempt=1, report=TestsRun(exit_code=1, failed=2)),
}


def test_tables_cover_every_event_and_command():
    assert set(SAMPLE_PAYLOAD) == set(LEGAL_CASES) == set(EVENT_TYPES) == set(TRANSITIONS)
    assert set(ALLOWED) == set(SAMPLE_COMMAND) == set(COMMANDS)


ILLEGAL_EVENTS = [(t, s) for t, s in product(EVENT_TYPES, ("absent", *AGENT_STATUSES))
                  if s not in TRANSITIONS[t] and not (s == "absent" and t is AgentRegistered)]


@pytest.mark.parametrize(("event_type", "status"), ILLEGAL_EVENTS,
                         ids=[f"{t.__name__}-from-{s}" for t, s in ILLEGAL_EVENTS])
def test_evolve_refuses_illegal_transition(event_type, status):
    past = history(status)
    with pytest.raises(IllegalTransition):
        evolve(fold(past), ev(event_type, len(past) + 1, **SAMPLE_PAYLOAD[event_type]))


COMMAND_MATRIX = list(product(COMMANDS, ("absent", *AGENT_STATUSES)))


@pytest.mark.parametrize(("command", "status"), COMMAND_MATRIX,
                         ids=[f"{c.__name__}-in-{s}" for c, s in COMMAND_MATRIX])
def test_command_in_status(command, status):
    past = history(status)
    when = agent(past).when(cmd(command, **SAMPLE_COMMAND[command]))
    if status in ALLOWED[command]:
        events = when.decide()
        after = when.then(events)  # and evolve accepts them
        assert after.version == len(past) + len(events) and events[-1].version == after.version
    elif status == "absent":
        when.then_raises(DomainError, "not registered")
    else:
        when.then_raises(IllegalTransition)


# -- registration -----------------------------------------------------------------------
def test_register_new_agent():
    after = agent([]).when(register(capacity=3)).then(
        [ev(AgentRegistered, 1, specialties=("backend", "testing"), capacity=3)])
    assert (after.status, after.capacity, after.free_slots, after.registered_at) == ("idle", 3, 3, AT)


def test_register_again_after_going_offline_keeps_history():
    log = run([cmd(ReleaseAgentTask, task_id="t1"), cmd(GoOffline)], history("busy"))
    later = AT + timedelta(hours=1)
    after = agent(log).when(register(at=later)).then(
        [ev(AgentRegistered, len(log) + 1, at=later, specialties=("backend", "testing"), capacity=2)])
    assert (after.status, after.version, after.tasks_done, after.registered_at) == ("idle", 5, 1, later)


@pytest.mark.parametrize("status", sorted(set(AGENT_STATUSES) - {"offline"}))
def test_register_while_online_records_the_crash_first(status):
    log = history(status)
    n = len(log)
    after = agent(log).when(register(capacity=1)).then([
        ev(AgentWentOffline, n + 1, reason="crashed"),
        ev(AgentRegistered, n + 2, specialties=("backend", "testing"), capacity=1)])
    assert (after.status, after.active_tasks, after.reason, after.capacity) == ("idle", (), "", 1)


@pytest.mark.parametrize(("kw", "why"), [
    (dict(capacity=0), "capacity"), (dict(specialties=()), "specialty"),
    (dict(clearance="top-secret"), "invalid agent.registered"),
])
def test_register_refuses_bad_input(kw, why):
    command = msgspec.structs.replace(register(), **kw)
    agent([]).when(command).then_raises(DomainError, why)


# -- load, maintenance, error, offline -------------------------------------------------
def _by_load(n: int, capacity: int) -> str:
    return "idle" if n == 0 else "busy" if n <= capacity else "overloaded"


@pytest.mark.parametrize(("capacity", "n"), [(c, n) for c in (1, 2, 3) for n in range(c + 3)])
def test_status_follows_active_tasks_vs_capacity(capacity, n):
    tasks = [f"t{i}" for i in range(n)]
    state = fold(run([register(capacity), *start(*tasks)]))
    assert (state.status, state.active_tasks, state.free_slots) == (
        _by_load(n, capacity), tuple(tasks), max(0, capacity - n))
    assert state.load == n / capacity
    for i, t in enumerate(tasks):  # and back down, one release at a time
        state = fold(decide(state, cmd(ReleaseAgentTask, task_id=t)), state)
        assert state.status == _by_load(n - i - 1, capacity)


@pytest.mark.parametrize("status", ["maintenance", "error"])
def test_maintenance_and_error_keep_their_status_when_tasks_are_released(status):
    log = run([cmd(ReleaseAgentTask, task_id="t1", outcome="cancelled")], history(status))
    state = fold(log)
    assert (state.status, state.active_tasks, state.tasks_done, state.tasks_failed) == (status, (), 0, 0)
    leave = LeaveMaintenance if status == "maintenance" else Recover
    assert fold(run([cmd(leave)], log)).status == "idle"


@pytest.mark.parametrize(("leave", "into"), [(LeaveMaintenance, EnterMaintenance), (Recover, ReportError)])
def test_leaving_maintenance_or_error_goes_by_load(leave, into):
    log = run([register(capacity=1), *start("t1", "t2"), cmd(into, reason="x")])
    after = agent(log).when(cmd(leave)).then([ev(AgentMaintenanceEnded if leave is LeaveMaintenance
                                                 else AgentRecovered, len(log) + 1)])
    assert (after.status, after.reason) == ("overloaded", "")


def test_maintenance_from_error_then_back_online():
    log = run([cmd(EnterMaintenance, reason="fix"), cmd(LeaveMaintenance)], history("error"))
    assert [fold(log[:i]).status for i in (-2, -1, None)] == ["error", "maintenance", "busy"]


@pytest.mark.parametrize("status", sorted(set(AGENT_STATUSES) - {"offline"}))
def test_going_offline_clears_active_tasks(status):
    after = agent(history(status)).when(cmd(GoOffline, reason="heartbeat_timeout")).then(
        [ev(AgentWentOffline, len(history(status)) + 1, reason="heartbeat_timeout")])
    assert (after.status, after.active_tasks, after.free_slots, after.reason) == (
        "offline", (), 2, "heartbeat_timeout")


def test_start_twice_and_release_unheld_are_refused():
    log = history("busy")
    agent(log).when(cmd(StartAgentTask, task_id="t1")).then_raises(IllegalTransition, "start t1 twice")
    agent(log).when(cmd(ReleaseAgentTask, task_id="t2")).then_raises(IllegalTransition, "does not hold")


def test_outcomes_are_counted():
    outcomes = ["done", "failed", "cancelled", "handed_back", "lost", "done"]
    tasks = [f"t{i}" for i in range(len(outcomes))]
    log = run([register(capacity=9), *start(*tasks)] + [
        cmd(ReleaseAgentTask, task_id=t, outcome=o) for t, o in zip(tasks, outcomes)])
    state = fold(log)
    assert (state.tasks_done, state.tasks_failed, state.status) == (2, 1, "idle")


def test_version_gap_duplicate_and_bad_first_version():
    log = history("busy")
    state = fold(log)
    for bad, first in [(ev(AgentTaskStarted, 4, task_id="t2"), state), (log[-1], state),
                       (ev(AgentRegistered, 2, specialties=("x",)), None)]:
        with pytest.raises(VersionMismatch):
            evolve(first, bad)


def test_envelope_comes_from_the_command():
    at = AT + timedelta(minutes=5)
    state = fold(history("idle"))
    [event] = decide(state, StartAgentTask(at=at, actor="worker", causation_id="acme-7:4", task_id="acme-7"))
    assert (event.event_id, event.version, event.occurred_at) == (f"{AG}:2", 2, at)
    assert (event.actor, event.correlation_id, event.causation_id) == ("worker", AG, "acme-7:4")
    assert state.active_tasks == () and fold([event], state).updated_at == at


# -- codec -------------------------------------------------------------------------------
ALL_EVENTS = [ev(t, 7, causation_id="c:1", **payload) for t, (_, payload) in LEGAL_CASES.items()]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: e.__struct_config__.tag)
def test_codec_round_trip(event):
    assert decode_event(event.rel_subject, encode(event)) == event
    with pytest.raises(BadEventError, match="subject mismatch"):  # not on another agent's subject
        decode_event(event.rel_subject.replace(AG, "agent-2"), encode(event))


def test_codec_rejects_agent_event_with_wrong_types():
    data = encode(ev(AgentRegistered, 1, specialties=("backend",), capacity=2))
    for bad in (data.replace(b'"capacity":2', b'"capacity":"2"'), data.replace(b'"backend"]', b'7]'),
                data.replace(b'"agent.registered"', b'"agent.x"'), data[:-1]):
        with pytest.raises(BadEventError):
            decode_event(f"agent.{AG}.registered", bad)


def test_heartbeat_round_trip():
    hb = Heartbeat(agent_id=AG, at=AT, active_tasks=("t1",), seq=3)
    assert msgspec.json.decode(encode(hb), type=Heartbeat) == hb


# -- property: random command sequences keep the invariants ------------------------------
_task = st.sampled_from(["t1", "t2", "t3", "t4"])
_KINDS = {  # weights: load changes most often; a reset (register, offline) rarely
    "start": 8, "release": 4, "leave": 2, "maintenance": 1, "error": 1, "offline": 1, "register": 1}
_BUILD = {
    "start": st.builds(cmd, st.just(StartAgentTask), task_id=_task),
    "release": st.builds(cmd, st.just(ReleaseAgentTask), task_id=_task,
                         outcome=st.sampled_from(["done", "failed", "cancelled", "handed_back", "lost"])),
    "leave": st.builds(cmd, st.sampled_from([LeaveMaintenance, Recover])),
    "maintenance": st.builds(cmd, st.just(EnterMaintenance)),
    "error": st.builds(cmd, st.just(ReportError), reason=st.just("boom")),
    "offline": st.builds(cmd, st.just(GoOffline)),
    "register": st.builds(register, capacity=st.integers(1, 2)),
}
_command = st.sampled_from([k for k, n in _KINDS.items() for _ in range(n)]).flatmap(_BUILD.__getitem__)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@for_all(st.integers(1, 3), st.lists(_command, max_size=60))
def test_random_commands_keep_invariants(capacity, commands):
    state, log, started = None, [], 0
    for command in [register(capacity), *commands]:
        try:
            new = decide(state, command)
        except DomainError:
            continue  # anything else fails the test
        assert all(decode_event(e.rel_subject, encode(e)) == e for e in new)
        state = fold(new, state)
        log += new
        started += sum(isinstance(e, AgentTaskStarted) for e in new)
        assert [e.version for e in log] == list(range(1, state.version + 1))
        assert len(set(state.active_tasks)) == len(state.active_tasks)
        if state.status == "offline":
            assert state.active_tasks == ()
        if state.status in ONLINE:
            assert state.status == _by_load(len(state.active_tasks), state.capacity)
        assert state.tasks_done + state.tasks_failed <= started
    assert fold(log) == state  # replaying the log gives the same state
    for reached in sorted({fold(log[:i]).status for i in range(1, len(log) + 1)}):
        note_event(f"reached {reached}")  # see --hypothesis-show-statistics


# -- work reports --------------------------------------------------------------------
def test_report_on_a_task_not_held_is_refused():
    agent(history("busy")).when(cmd(ReportWork, task_id="t7", attempt=1, report=TestsRun())).then_raises(
        IllegalTransition, "does not hold")


class Exploded(WorkReportBody):
    pass


@pytest.mark.parametrize(("report", "why"), [
    (Exploded(), "unknown work report Exploded"),
    (TestsRun(passed="many"), "invalid agent.tests_run"),  # msgspec checks types on encoding
])
def test_malformed_report_is_a_domain_error(report, why):
    agent(history("busy")).when(cmd(ReportWork, task_id="t1", attempt=1, report=report)).then_raises(
        DomainError, why)


@pytest.mark.parametrize(("body", "fields"), [
    (TestsRun, {"no_such_field": 1}),
    (ChangesPushed, {"branch": "b"}),  # commit missing
])
def test_a_misspelled_or_missing_report_field_fails_where_the_report_is_built(body, fields):
    with pytest.raises(TypeError):
        body(**fields)


@pytest.mark.parametrize("body", list(EVENT_OF_REPORT), ids=lambda b: b.__name__)
def test_each_report_body_has_exactly_its_events_payload(body):
    """The event is the envelope, the task/attempt the agent adds, then the body's fields
    (same names, types, defaults and order): what the pipeline builds is what goes out."""
    added_by_the_agent = set(WorkReport.__struct_fields__)  # the envelope, task_id, attempt
    payload = [f for f in msgspec.inspect.type_info(EVENT_OF_REPORT[body]).fields
               if f.name not in added_by_the_agent]
    assert [(f.name, f.type, f.default, f.default_factory) for f in msgspec.inspect.type_info(body).fields] \
        == [(f.name, f.type, f.default, f.default_factory) for f in payload]
