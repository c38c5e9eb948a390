"""Agent aggregate events and heartbeats.

Agents write their own events (``ccc.agent.<id>.*``); the coordinator writes only the
supervision events (:class:`AgentWentOffline` with reason ``heartbeat_timeout``).
Heartbeats are not state transitions: they go to ``CCC_HEARTBEATS`` which keeps one
message per agent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from events.task import SecurityLevel, Usage


class AgentEventBase(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False, omit_defaults=True
):
    event_id: str
    agent_id: str
    version: int
    occurred_at: datetime
    correlation_id: str
    causation_id: str | None = None
    actor: str

    @property
    def rel_subject(self) -> str:
        return f"agent.{self.agent_id}.{self.__struct_config__.tag[6:]}"


class AgentRegistered(AgentEventBase, tag="agent.registered"):
    specialties: tuple[str, ...]
    capacity: int = 1
    clearance: SecurityLevel = "internal"
    host: str = ""
    coder: str = "scripted"


class AgentTaskStarted(AgentEventBase, tag="agent.task_started"):
    task_id: str
    attempt: int = 0


class AgentTaskReleased(AgentEventBase, tag="agent.task_released"):
    task_id: str
    outcome: Literal["done", "failed", "cancelled", "handed_back", "lost"] = "done"
    attempt: int = 0


class AgentTaskDeclined(AgentEventBase, tag="agent.task_declined"):
    """An assignment the agent will not start (no free slot, shutting down)."""

    task_id: str
    attempt: int = 0
    reason: str = ""


# -- work reports: one per pipeline phase, about a task the agent holds ---------------
class WorkReport(AgentEventBase):
    task_id: str
    attempt: int


class AgentWorkspacePrepared(WorkReport, tag="agent.workspace_prepared"):
    path: str
    base_commit: str = ""


class AgentCodebaseAnalysed(WorkReport, tag="agent.codebase_analysed"):
    languages: dict[str, int] = {}
    test_command: tuple[str, ...] = ()


class AgentImplementationProduced(WorkReport, tag="agent.implementation_produced"):
    coder: str = ""
    summary: str = ""
    files_changed: tuple[str, ...] = ()
    diff_stat: str = ""
    diff_ref: str = ""  # object store name; the diff itself is never in an event
    diff_digest: str = ""  # sha256 of the diff
    turns: int = 0
    usage: Usage | None = None
    transcript_ref: str = ""


class AgentTestsRun(WorkReport, tag="agent.tests_run"):
    command: tuple[str, ...] = ()
    exit_code: int | None = None
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    duration: float = 0.0
    timed_out: bool = False
    log_ref: str = ""


class AgentChangesPushed(WorkReport, tag="agent.changes_pushed"):
    branch: str
    commit: str


class AgentPullRequestOpened(WorkReport, tag="agent.pr_opened"):
    branch: str
    pr_url: str = ""
    pr_number: int | None = None
    draft: bool = False
    tests_passed: int = 0
    tests_failed: int = 0


class AgentWorkFailed(WorkReport, tag="agent.work_failed"):
    phase: str
    reason: str
    retryable: bool = True
    log_ref: str = ""


class AgentMaintenanceStarted(AgentEventBase, tag="agent.maintenance_started"):
    reason: str = ""


class AgentMaintenanceEnded(AgentEventBase, tag="agent.maintenance_ended"):
    pass


class AgentErrored(AgentEventBase, tag="agent.errored"):
    reason: str


class AgentRecovered(AgentEventBase, tag="agent.recovered"):
    pass


class AgentWentOffline(AgentEventBase, tag="agent.offline"):
    reason: Literal["shutdown", "heartbeat_timeout", "crashed"] = "shutdown"


AgentEvent = (
    AgentRegistered
    | AgentTaskStarted
    | AgentTaskReleased
    | AgentTaskDeclined
    | AgentWorkspacePrepared
    | AgentCodebaseAnalysed
    | AgentImplementationProduced
    | AgentTestsRun
    | AgentChangesPushed
    | AgentPullRequestOpened
    | AgentWorkFailed
    | AgentMaintenanceStarted
    | AgentMaintenanceEnded
    | AgentErrored
    | AgentRecovered
    | AgentWentOffline
)

agent_decoder = msgspec.json.Decoder(AgentEvent)


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    agent_id: str
    at: datetime
    active_tasks: tuple[str, ...] = ()
    seq: int = 0


heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
