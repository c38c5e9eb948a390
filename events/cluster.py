"""Cluster decisions: the autoscaler's record of why the fleet grew or shrank.

``<ns>.cluster.scaled_up`` / ``<ns>.cluster.scaled_down``, one event per decision, with
its reason, the specialty it was about, that specialty's queue depth and oldest wait,
and the number of agents before and after.

They live in a stream of their own, ``<NS>_CLUSTER``, not in ``<NS>_EVENTS``: the event
store reads ``<NS>_EVENTS`` as task and agent aggregates only (its whole-log replay
filters on ``task.>`` and ``agent.>`` and ends at the stream's last sequence, so a
message on any other subject as the stream's last one would keep that replay waiting),
and no task or agent state depends on a scaling decision. A separate stream also lets
operators keep these decisions for a bounded time (they are an audit trail, not the
database).

The events are frozen msgspec structs with a stable ``type`` tag, like every other
event; :func:`decode_cluster_event` checks the subject a payload came on, as
``events.codec`` does for the aggregates.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from events.codec import decode_checked, encode
from events.subjects import Namespace

Action = Literal["scaled_up", "scaled_down"]


class ClusterEventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False, omit_defaults=True):
    event_id: str
    occurred_at: datetime
    actor: str  # who decided: the autoscaler's name
    specialty: str  # the bottleneck (up) or least-needed (down) specialty
    reason: str  # one sentence: why
    queue_depth: int  # that specialty's queued tasks when it was decided
    oldest_wait: float  # seconds the oldest of them had waited
    agents_before: int  # agents the autoscaler runs, before and after
    agents_after: int
    agent_id: str  # the agent started or stopped
    outcome: str = "done"  # or "failed: <why>" when starting or stopping the agent failed

    @property
    def rel_subject(self) -> str:
        return f"cluster.{self.__struct_config__.tag.removeprefix('cluster.')}"


class ClusterScaledUp(ClusterEventBase, tag="cluster.scaled_up"):
    pass


class ClusterScaledDown(ClusterEventBase, tag="cluster.scaled_down"):
    pass


ClusterEvent = ClusterScaledUp | ClusterScaledDown

_decoder = msgspec.json.Decoder(ClusterEvent)


def cluster_stream(ns: Namespace) -> str:
    """``<NS>_CLUSTER``: where the cluster's decisions are kept."""
    return f"{ns.prefix.upper()}_CLUSTER"


def cluster_filter(ns: Namespace) -> str:
    return f"{ns.prefix}.cluster.>"


def encode_cluster_event(event: ClusterEventBase) -> bytes:
    return encode(event)


def decode_cluster_event(rel_subject: str, data: bytes) -> ClusterScaledUp | ClusterScaledDown:
    """Decode a message of ``<NS>_CLUSTER``; :class:`~events.errors.BadEventError` says why
    it is not one (checked as every event is: size, shape, the subject it came on)."""
    return decode_checked(_decoder, rel_subject, data)


__all__ = ["Action", "ClusterEvent", "ClusterEventBase", "ClusterScaledDown", "ClusterScaledUp", "cluster_filter",
           "cluster_stream", "decode_cluster_event", "encode_cluster_event"]
