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

from .subjects import agent_subject
from .task import SecurityLevel


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


class AgentTaskReleased(AgentEventBase, tag="agent.task_released"):
    task_id: str
    outcome: Literal["done", "failed", "cancelled", "handed_back", "lost"] = "done"


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
