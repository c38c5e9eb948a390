"""The agent state machine, pure.

    offline -> idle (registered)
    idle <-> busy <-> overloaded  by the count of active tasks vs capacity
              (busy: 1..capacity tasks; overloaded: more than capacity)
    idle/busy/overloaded/error -> maintenance -> (by load)
    idle/busy/overloaded/maintenance -> error -> (by load, recovered)
    any but offline -> offline (shutdown, heartbeat timeout, crash)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

import msgspec
from msgspec.structs import replace

from events.agent import (
    EVENT_OF_REPORT,
    AgentChangesPushed,
    AgentCodebaseAnalysed,
    AgentErrored,
    AgentEvent,
    AgentMaintenanceEnded,
    AgentMaintenanceStarted,
    AgentRecovered,
    AgentRegistered,
    AgentTaskReleased,
    AgentImplementationProduced,
    AgentPullRequestOpened,
    AgentTaskDeclined,
    AgentTaskStarted,
    AgentTestsRun,
    AgentWentOffline,
    AgentWorkFailed,
    AgentWorkspacePrepared,
    WorkReport,
)
from events.errors import DomainError, IllegalTransition, VersionMismatch
from events.fold import fold as fold_events
from events.subjects import check_id
from events.work_reports import WorkReportBody

AgentStatus = Literal["offline", "idle", "busy", "overloaded", "maintenance", "error"]
AGENT_STATUSES: tuple[str, ...] = ("offline", "idle", "busy", "overloaded", "maintenance", "error")
ONLINE: frozenset[str] = frozenset({"idle", "busy", "overloaded"})
ACCEPTING: frozenset[str] = frozenset({"idle", "busy"})
# statuses in which an agent can hold tasks (idle holds none by definition)
HOLDING: frozenset[str] = frozenset({"busy", "overloaded", "maintenance", "error"})

TRANSITIONS: dict[type, frozenset[str]] = {
    AgentRegistered: frozenset({"offline"}),
    AgentTaskStarted: ONLINE,
    AgentTaskReleased: HOLDING,
    AgentMaintenanceStarted: ONLINE | {"error"},
    AgentMaintenanceEnded: frozenset({"maintenance"}),
    AgentErrored: ONLINE | {"maintenance"},
    AgentRecovered: frozenset({"error"}),
    AgentWentOffline: frozenset(AGENT_STATUSES) - {"offline"},
    AgentTaskDeclined: frozenset(AGENT_STATUSES) - {"offline"},
}
REPORTS: tuple[type, ...] = (
    AgentWorkspacePrepared, AgentCodebaseAnalysed, AgentImplementationProduced, AgentTestsRun,
    AgentChangesPushed, AgentPullRequestOpened, AgentWorkFailed,
)
# a work report is about a task the agent holds; it never changes the agent's status
for _report in REPORTS:
    TRANSITIONS[_report] = HOLDING


class AgentState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    agent_id: str
    status: AgentStatus
    version: int
    specialties: tuple[str, ...] = ()
    capacity: int = 1
    clearance: str = "internal"
    host: str = ""
    coder: str = ""
    active_tasks: tuple[str, ...] = ()
    registered_at: datetime | None = None
    updated_at: datetime | None = None
    reason: str = ""
    tasks_done: int = 0
    tasks_failed: int = 0

    @property
    def load(self) -> float:
        return len(self.active_tasks) / self.capacity if self.capacity else 1.0

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - len(self.active_tasks))


def _by_load(active: int, capacity: int) -> AgentStatus:
    if active == 0:
        return "idle"
    return "overloaded" if active > capacity else "busy"


def evolve(state: AgentState | None, event: AgentEvent) -> AgentState:
    current = "offline" if state is None else state.status
    expected = 1 if state is None else state.version + 1
    if event.version != expected:
        raise VersionMismatch(f"agent {event.agent_id}: event version {event.version}, expected {expected}")
    if current not in TRANSITIONS[type(event)]:
        raise IllegalTransition("agent " + event.agent_id, current, event.__struct_config__.tag)
    if isinstance(event, AgentRegistered):
        prev = state or AgentState(agent_id=event.agent_id, status="offline", version=0)
        return replace(
            prev, status="idle", version=event.version, specialties=event.specialties,
            capacity=event.capacity, clearance=event.clearance, host=event.host,
            coder=event.coder, active_tasks=(), registered_at=event.occurred_at,
            updated_at=event.occurred_at, reason="",
        )
    assert state is not None
    base = {"version": event.version, "updated_at": event.occurred_at}
    if isinstance(event, WorkReport):
        if event.task_id not in state.active_tasks:
            raise IllegalTransition("agent " + state.agent_id, state.status,
                                    f"report on {event.task_id} it does not hold")
        return replace(state, **base)
    match event:
        case AgentTaskStarted():
            if event.task_id in state.active_tasks:
                raise IllegalTransition("agent " + state.agent_id, state.status, f"start {event.task_id} twice")
            active = state.active_tasks + (event.task_id,)
            return replace(state, **base, active_tasks=active, status=_by_load(len(active), state.capacity))
        case AgentTaskReleased():
            if event.task_id not in state.active_tasks:
                raise IllegalTransition("agent " + state.agent_id, state.status, f"release {event.task_id} it does not hold")
            active = tuple(t for t in state.active_tasks if t != event.task_id)
            status = state.status if state.status in ("maintenance", "error") else _by_load(len(active), state.capacity)
            return replace(
                state, **base, active_tasks=active, status=status,
                tasks_done=state.tasks_done + (event.outcome == "done"),
                tasks_failed=state.tasks_failed + (event.outcome == "failed"),
            )
        case AgentMaintenanceStarted():
            return replace(state, **base, status="maintenance", reason=event.reason)
        case AgentErrored():
            return replace(state, **base, status="error", reason=event.reason)
        case AgentMaintenanceEnded() | AgentRecovered():
            return replace(state, **base, status=_by_load(len(state.active_tasks), state.capacity), reason="")
        case AgentWentOffline():
            return replace(state, **base, status="offline", active_tasks=(), reason=event.reason)
        case AgentTaskDeclined():
            return replace(state, **base)
    raise IllegalTransition("agent " + state.agent_id, state.status, type(event).__name__)


def fold(events: Iterable[AgentEvent], state: AgentState | None = None) -> AgentState | None:
    """The agent's state after ``events`` (applied to ``state``, or from nothing)."""
    return fold_events(evolve, events, state)


# -- commands -----------------------------------------------------------------------
class Command(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    actor: str
    causation_id: str | None = None


class RegisterAgent(Command, frozen=True, kw_only=True):
    agent_id: str
    specialties: tuple[str, ...]
    capacity: int = 1
    clearance: str = "internal"
    host: str = ""
    coder: str = "scripted"
    sandbox: str = ""


class StartAgentTask(Command, frozen=True, kw_only=True):
    task_id: str
    attempt: int = 0


class DeclineTask(Command, frozen=True, kw_only=True):
    task_id: str
    attempt: int = 0
    reason: str = ""


class ReportWork(Command, frozen=True, kw_only=True):
    """A pipeline phase's report on a task the agent holds: ``report`` is typed
    (:mod:`events.work_reports`), so the event it becomes is known by its type."""

    task_id: str
    attempt: int
    report: WorkReportBody


class ReleaseAgentTask(Command, frozen=True, kw_only=True):
    task_id: str
    outcome: Literal["done", "failed", "cancelled", "handed_back", "lost"] = "done"
    attempt: int = 0


class EnterMaintenance(Command, frozen=True, kw_only=True):
    reason: str = ""


class LeaveMaintenance(Command, frozen=True, kw_only=True):
    pass


class ReportError(Command, frozen=True, kw_only=True):
    reason: str


class Recover(Command, frozen=True, kw_only=True):
    pass


class GoOffline(Command, frozen=True, kw_only=True):
    reason: Literal["shutdown", "heartbeat_timeout", "crashed"] = "shutdown"


def decide(state: AgentState | None, command: Command) -> list[AgentEvent]:
    if isinstance(command, RegisterAgent):
        check_id(command.agent_id, "agent id", error=DomainError)  # it becomes a subject token
        if state is not None and state.agent_id != command.agent_id:
            raise DomainError(f"state of {state.agent_id} given for {command.agent_id}")
        if command.capacity < 1:
            raise DomainError("capacity must be at least 1")
        if not command.specialties:
            raise DomainError("an agent needs at least one specialty")
        events: list[AgentEvent] = []
        version = state.version if state else 0
        if state is not None and state.status != "offline":
            # a restarted process: its previous incarnation crashed without saying so
            version += 1
            events.append(AgentWentOffline(**_env(command, command.agent_id, version), reason="crashed"))
        events.append(AgentRegistered(
            **_env(command, command.agent_id, version + 1), specialties=command.specialties,
            capacity=command.capacity, clearance=command.clearance, host=command.host,
            coder=command.coder, sandbox=command.sandbox,
        ))
        return _checked(state, events)
    if state is None:
        raise DomainError(f"agent not registered for {type(command).__name__}")
    env = _env(command, state.agent_id, state.version + 1)
    event: AgentEvent
    match command:
        case StartAgentTask():
            if state.status not in ONLINE:
                raise IllegalTransition("agent " + state.agent_id, state.status, "start a task")
            event = AgentTaskStarted(**env, task_id=command.task_id, attempt=command.attempt)
        case ReleaseAgentTask():
            event = AgentTaskReleased(**env, task_id=command.task_id, outcome=command.outcome,
                                      attempt=command.attempt)
        case DeclineTask():
            event = AgentTaskDeclined(**env, task_id=command.task_id, attempt=command.attempt,
                                      reason=command.reason)
        case ReportWork():
            cls = EVENT_OF_REPORT.get(type(command.report))
            if cls is None:
                raise DomainError(f"unknown work report {type(command.report).__name__}")
            event = cls(**env, task_id=command.task_id, attempt=command.attempt,
                        **msgspec.structs.asdict(command.report))
        case EnterMaintenance():
            event = AgentMaintenanceStarted(**env, reason=command.reason)
        case LeaveMaintenance():
            event = AgentMaintenanceEnded(**env)
        case ReportError():
            event = AgentErrored(**env, reason=command.reason)
        case Recover():
            event = AgentRecovered(**env)
        case GoOffline():
            event = AgentWentOffline(**env, reason=command.reason)
        case _:
            raise DomainError(f"unknown command {type(command).__name__}")
    return _checked(state, [event])


def _checked(state: AgentState | None, events: list[AgentEvent]) -> list[AgentEvent]:
    out = []
    for event in events:
        try:
            event = msgspec.json.decode(msgspec.json.encode(event), type=type(event))
        except msgspec.ValidationError as e:
            raise DomainError(f"invalid {event.__struct_config__.tag}: {e}") from None
        state = evolve(state, event)
        out.append(event)
    return out


def _env(command: Command, agent_id: str, version: int) -> dict:
    return {
        "event_id": f"{agent_id}:{version}",
        "agent_id": agent_id,
        "version": version,
        "occurred_at": command.at,
        "correlation_id": agent_id,
        "causation_id": command.causation_id,
        "actor": command.actor,
    }
