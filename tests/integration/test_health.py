"""The health monitor against a real nats-server: liveness kept by the server (heartbeats
with a per-message TTL), a grace period that starts at each agent's registration, and a
mass loss declared within the timeout plus 2 s.

The agents here do what a real agent does on the bus and nothing else: append their
``agent.registered`` event, then heartbeat with ``Nats-TTL`` (:mod:`actors.agent`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.coordinator import Coordinator, CoordinatorConfig
from actors.health import TTL_HEADER, format_ttl
from events import agent_state as ag
from events.agent import Heartbeat
from events.codec import encode
from tests.conftest import eventually
from tests.integration.test_coordinator import now

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Fleet:
    """Agents that register and heartbeat, each on its own loop."""

    def __init__(self, nc, ns, store, *, interval: float, ttl: float | None) -> None:
        self.nc, self.ns, self.store, self.interval = nc, ns, store, interval
        self.headers = {TTL_HEADER: format_ttl(ttl)} if ttl is not None else None
        self.registered: dict[str, float] = {}
        self.last_sent: dict[str, float] = {}
        self.loops: dict[str, asyncio.Task] = {}

    async def register(self, ids: list[str]) -> None:
        async def one(aid: str) -> None:
            events = ag.decide(None, ag.RegisterAgent(at=now(), actor=aid, agent_id=aid, specialties=("backend",)))
            await self.store.append(events, expected_last_seq=0)
            self.registered[aid] = time.monotonic()

        await asyncio.gather(*(one(a) for a in ids))

    def beat(self, ids: list[str], first_after: float = 0.0) -> None:
        for aid in ids:
            self.loops[aid] = asyncio.create_task(self._loop(aid, first_after))

    async def _loop(self, aid: str, first_after: float) -> None:
        await asyncio.sleep(first_after)
        seq = 0
        while True:
            seq += 1
            await self.nc.publish(self.ns.heartbeat_subject(aid), encode(Heartbeat(agent_id=aid, at=now(), seq=seq)),
                                  headers=self.headers)
            self.last_sent[aid] = time.monotonic()
            await asyncio.sleep(self.interval)

    async def stop(self, ids: list[str] | None = None) -> None:
        loops = [self.loops.pop(a) for a in (list(self.loops) if ids is None else ids)]
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def offline_watch(nc, ns) -> tuple[dict[str, float], object]:
    """When each agent's ``agent.offline`` was appended (as heard by this process)."""
    seen: dict[str, float] = {}

    async def cb(msg) -> None:
        seen.setdefault(msg.subject.split(".")[-2], time.monotonic())

    sub = await nc.subscribe(f"{ns.prefix}.agent.*.offline", cb=cb)
    await nc.flush()
    return seen, sub


async def test_new_agents_are_not_lost_before_their_first_heartbeat(nc, ns, store) -> None:
    """The grace period starts at each agent's registration, not when the monitor started:
    200 agents registering long after the monitor's start, each heartbeating first a good
    while after its registration (within the timeout), are none of them declared lost; one
    that never heartbeats is, and not before a timeout has passed since it registered."""
    timeout = 1.0
    seen, sub = await offline_watch(nc, ns)
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=timeout))
    await c.start()
    fleet = Fleet(nc, ns, store, interval=0.3, ttl=1.0)
    try:
        await asyncio.sleep(1.5 * timeout)  # the monitor has been running longer than the timeout
        ids = [f"late-{i:03d}" for i in range(200)]
        await fleet.register([*ids, "mute"])
        fleet.beat(ids, first_after=0.6 * timeout)
        await eventually(lambda: "mute" in seen, timeout=10)
        assert seen["mute"] - fleet.registered["mute"] >= timeout
        await asyncio.sleep(1.5 * timeout)  # every one of them through a full timeout and more
        assert set(seen) == {"mute"}
        assert all(c.model.agents[a].status == "idle" for a in ids)
    finally:
        await fleet.stop()
        await c.stop()
        await sub.unsubscribe()


async def test_a_mass_loss_is_declared_within_the_timeout_plus_two_seconds(nc, ns, store) -> None:
    """200 agents stop heartbeating at once: every one is declared offline, none before a
    timeout of silence, none later than the timeout plus 2 s; the 20 that go on are not."""
    timeout = 3.0
    seen, sub = await offline_watch(nc, ns)
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=timeout))
    await c.start()
    fleet = Fleet(nc, ns, store, interval=0.5, ttl=1.0)
    doomed = [f"doomed-{i:03d}" for i in range(200)]
    survivors = [f"alive-{i:02d}" for i in range(20)]
    try:
        await fleet.register(doomed + survivors)
        fleet.beat(doomed + survivors)
        await eventually(lambda: c.health.fetches >= 220 and c.health.polls >= 4, timeout=15)
        assert not seen
        await fleet.stop(doomed)
        await eventually(lambda: all(a in seen for a in doomed), timeout=timeout + 10)
        silences = [seen[a] - fleet.last_sent[a] for a in doomed]
        assert min(silences) >= timeout, min(silences)
        assert max(silences) <= timeout + 2.0, max(silences)
        await asyncio.sleep(0.5)
        assert not [a for a in survivors if a in seen]
        assert all(c.model.agents[a].status == "offline" for a in doomed)
    finally:
        await fleet.stop()
        await c.stop()
        await sub.unsubscribe()


async def test_the_monitor_holds_no_consumer_and_reads_each_ttl_once(nc, ns, store) -> None:
    """The cost of a heartbeat to the coordinator is nil by design: nothing consumes the
    heartbeats stream; the monitor polls which subjects it holds and reads each agent's
    TTL once, however many heartbeats follow."""
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=2.0))
    await c.start()
    fleet = Fleet(nc, ns, store, interval=0.1, ttl=1.0)
    ids = [f"a-{i:02d}" for i in range(30)]
    try:
        await fleet.register(ids)
        fleet.beat(ids)
        await eventually(lambda: c.health.fetches >= len(ids), timeout=10)
        polls = c.health.polls
        await eventually(lambda: c.health.polls >= polls + 6, timeout=10)  # ~20 heartbeats each meanwhile
        assert c.health.fetches == len(ids)
        info = await nc.jetstream().stream_info(ns.heartbeats_stream)
        assert info.state.consumer_count == 0
        assert info.config.allow_msg_ttl and info.config.max_msgs_per_subject == 1
    finally:
        await fleet.stop()
        await c.stop()


async def test_heartbeats_without_a_ttl_are_followed_by_their_sequence(nc, ns, store) -> None:
    """An agent from before per-message TTLs (its heartbeats never expire by themselves) is
    alive while its heartbeat keeps changing, and declared lost a timeout after it stops."""
    timeout = 1.0
    seen, sub = await offline_watch(nc, ns)
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=timeout))
    await c.start()
    fleet = Fleet(nc, ns, store, interval=0.2, ttl=None)
    try:
        await fleet.register(["old"])
        fleet.beat(["old"])
        await asyncio.sleep(3 * timeout)
        assert not seen
        await fleet.stop()
        await eventually(lambda: "old" in seen, timeout=10)
        assert timeout <= seen["old"] - fleet.last_sent["old"] <= timeout + 2.0
    finally:
        await fleet.stop()
        await c.stop()
        await sub.unsubscribe()
