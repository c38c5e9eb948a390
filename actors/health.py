"""Agent health: heartbeats in, ``agent.offline`` out.

Heartbeats (``<ns>.hb.<agent>``, latest per agent) are watched with an ordered
consumer; an agent that is not offline in the model and has been silent for longer
than the timeout gets ``agent.offline`` (reason ``heartbeat_timeout``) appended to its
aggregate with the usual concurrency check. Taking its tasks back is not done here:
the coordinator's report handler reacts to ``agent.offline`` whoever wrote it, so a
clean shutdown and a lost agent take the same path.

Silence is measured with this process's monotonic clock (when a heartbeat arrived),
never by comparing clocks of different hosts. An agent never heard from since this
monitor started gets one full timeout of grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timezone

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from events import agent_state as ag
from events.errors import ConcurrencyConflict
from events.store import EventStore
from events.subjects import Namespace
from events.aio import cancel_and_wait, within
from projections.read_model import ReadModel

log = structlog.get_logger("ccc.health")


class HealthMonitor:
    def __init__(self, nc: Client, ns: Namespace, store: EventStore, model: ReadModel, *,
                 name: str, timeout: float) -> None:
        self.nc = nc
        self.ns = ns
        self.store = store
        self.model = model
        self.name = name
        self.timeout = timeout
        self.last_seen: dict[str, float] = {}
        self._started = time.monotonic()
        self._forgiven_at = float("-inf")
        self._reconnects = nc.stats.get("reconnects", 0)
        self._sub = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._started = time.monotonic()

        async def on_heartbeat(msg: Msg) -> None:
            self.last_seen[msg.subject.rsplit(".", 1)[1]] = time.monotonic()

        self._sub = await self.nc.jetstream().subscribe(
            f"{self.ns.prefix}.hb.*", stream=self.ns.heartbeats_stream, cb=on_heartbeat,
            ordered_consumer=True, deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=1.0,  # notice a restarted server within a second or two
        )
        self._task = asyncio.create_task(self._loop(), name="health")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await within(self._sub.unsubscribe(), 5.0)

    async def _loop(self) -> None:
        interval = max(0.05, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001 - the monitor must survive
                log.warning("health.check_failed", error=f"{type(e).__name__}: {e}")

    async def check(self) -> list[str]:
        """Declare silent agents offline; returns their ids."""
        now = time.monotonic()
        lost: list[str] = []
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            # we were cut off: what we did not hear says nothing about the agents
            self._reconnects = reconnects
            self._started = now
            self.last_seen.clear()
            return lost
        online = [a for a in self.model.agents.values() if a.status != "offline"]
        heard = max(self.last_seen.values(), default=self._started)
        if len(online) > 1 and now - max(heard, self._started) > self.timeout \
                and now - self._forgiven_at > 3 * self.timeout:
            # silence from *every* agent at once says more about us (a reconnect, a
            # leader election) than about them: give them one more grace period (once;
            # if they stay silent through it, they really are gone)
            log.warning("health.no_heartbeats_at_all", silent_for=round(now - heard, 1))
            self._started = self._forgiven_at = now
            self.last_seen.clear()
            return lost
        for agent in online:
            seen = self.last_seen.get(agent.agent_id, self._started)
            if now - seen <= self.timeout:
                continue
            events = ag.decide(agent, ag.GoOffline(at=datetime.now(timezone.utc), actor=self.name,
                                                   reason="heartbeat_timeout"))
            try:
                await self.store.append(events, expected_last_seq=self.model.agent_seq[agent.agent_id])
            except ConcurrencyConflict:
                continue  # it just wrote something: alive, or another coordinator acted
            log.warning("agent.lost", agent_id=agent.agent_id, silent_for=round(now - seen, 1))
            lost.append(agent.agent_id)
        return lost
