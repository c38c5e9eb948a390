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

from events.payload import flat
from events.subjects import agent_subject
from events.task import SecurityLevel
from events.work_reports import (
    ChangesPushed,
    CodebaseAnalysed,
    ImplementationProduced,
    PullRequestOpened,
    TestsRun,
    WorkFailed,
    WorkReportBody,
    WorkspacePrepared,
)


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
        return agent_subject(self.agent_id, self.__struct_config__.tag[6:])


class AgentRegistered(AgentEventBase, tag="agent.registered"):
    specialties: tuple[str, ...]
    capacity: int = 1
    clearance: SecurityLevel = "internal"
    host: str = ""
    coder: str = "scripted"
    # where its commands run: "bwrap", "podman", "docker" or "none" (the operator's
    # --sandbox none, on record); "" on events from before there was a sandbox
    sandbox: str = ""


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


class AgentWorkspacePrepared(flat(WorkReport, WorkspacePrepared), tag="agent.workspace_prepared"):
    """The clone is ready at ``path`` on ``base_commit``."""


class AgentCodebaseAnalysed(flat(WorkReport, CodebaseAnalysed), tag="agent.codebase_analysed"):
    """Languages found and the test command detected."""


class AgentImplementationProduced(flat(WorkReport, ImplementationProduced), tag="agent.implementation_produced"):
    """The coder changed files; the diff and transcript are artifacts."""


class AgentTestsRun(flat(WorkReport, TestsRun), tag="agent.tests_run"):
    """The repository's own tests ran (counts parsed from the runner's summary)."""


class AgentChangesPushed(flat(WorkReport, ChangesPushed), tag="agent.changes_pushed"):
    """The work is committed and pushed on ``branch``."""


class AgentPullRequestOpened(flat(WorkReport, PullRequestOpened), tag="agent.pr_opened"):
    """The pull request is open (a draft when tests failed or the budget ran out)."""


class AgentWorkFailed(flat(WorkReport, WorkFailed), tag="agent.work_failed"):
    """A phase failed; ``retryable`` says whether another attempt may help."""


EVENT_OF_REPORT: dict[type[WorkReportBody], type[WorkReport]] = {
    WorkspacePrepared: AgentWorkspacePrepared,
    CodebaseAnalysed: AgentCodebaseAnalysed,
    ImplementationProduced: AgentImplementationProduced,
    TestsRun: AgentTestsRun,
    ChangesPushed: AgentChangesPushed,
    PullRequestOpened: AgentPullRequestOpened,
    WorkFailed: AgentWorkFailed,
}


def report_name(report: WorkReportBody) -> str:
    """``tests_run``, ``work_failed``: the report's tag without the aggregate, which is
    how metrics and spans name the pipeline phase the report ends."""
    return EVENT_OF_REPORT[type(report)].__struct_config__.tag.removeprefix("agent.")


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


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    agent_id: str
    at: datetime
    active_tasks: tuple[str, ...] = ()
    seq: int = 0
