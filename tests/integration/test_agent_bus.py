"""What one agent holds on the bus, so that thousands fit: one consumer (its assignments),
plain subscriptions for the cancellation requests and for its own ``agent.offline``,
heartbeats that carry a TTL — and what its credentials allow for that, no more."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.js import api

from actors.agent import Agent, AgentConfig
from actors.coordinator import Coordinator, CoordinatorConfig
from actors.health import TTL_HEADER, format_ttl, heartbeat_ttl
from actors.pipeline import PipelineSettings
from events.issue import IssueCancelRequested
from events.subjects import Namespace
from infra.adapters.coders.scripted import ScriptedCoder
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from infra.adapters.git.workbench import GitWorkbench
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from infra.adapters.nats.permissions import inbox_prefix, permissions_for
from infra.adapters.nats.provisioning import provision, provision_agent
from tests.conftest import eventually
from tests.integration.test_coordinator import now, opened, publish_issue
from tests.integration.test_security import Secured

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CALC = "def add(a, b):\n    return a - b\n"
TEST = ("import unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
SLOW_FIX = {"attempts": [{"summary": "fix add", "steps": [
    {"run": {"command": "sleep 30"}}, {"edit": {"path": "calc.py", "old": "return a - b", "new": "return a + b"}}]}]}


@pytest.fixture
def forge(tmp_path) -> LocalForge:
    f = LocalForge(tmp_path / "forge")
    f.create_repo("acme/calc", {"calc.py": CALC, "tests/test_calc.py": TEST,
                                ".ccc/test-command": "python -m unittest discover -s tests -v\n",
                                ".ccc/scripts/1.json": json.dumps(SLOW_FIX)})
    return f


def agent(nc, ns, tmp_path, forge, agent_id: str, interval: float = 0.2) -> Agent:
    config = AgentConfig(agent_id=agent_id, specialties=("backend",), heartbeat_interval=interval,
                         shutdown_grace=0.2, pipeline=PipelineSettings(test_timeout=60))
    return Agent(nc, ns, config, workbench=GitWorkbench(tmp_path / "ws"), coder=ScriptedCoder(None),
                 forge=LocalForgeClient(forge.root), artifacts=ObjectStoreArtifacts(nc, ns.artifacts_bucket))


async def consumers(nc, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.consumer_count


async def test_an_agent_holds_one_consumer_and_heartbeats_with_a_ttl(nc, ns, store, tmp_path, forge) -> None:
    before = await consumers(nc, ns.events_stream)
    agents = [agent(nc, ns, tmp_path, forge, f"a{i}") for i in range(3)]
    for a in agents:
        await a.start()
    try:
        assert await consumers(nc, ns.events_stream) == before + 3  # one each: its assignments
        hb = await nc.jetstream().get_msg(ns.heartbeats_stream, subject=ns.heartbeat_subject("a0"), direct=True)
        assert hb.headers[TTL_HEADER] == format_ttl(heartbeat_ttl(0.2)) == "1s"
        info = await nc.jetstream().stream_info(ns.events_stream)
        assert info.config.max_consumers >= 5_000  # the ceiling is set, not nats-server's 1,000
    finally:
        for a in agents:
            await a.stop()


async def test_a_cancellation_reaches_the_agent_without_a_consumer(nc, ns, store, tmp_path, forge) -> None:
    """The cancel watch is a plain subscription: the request stops the running work."""
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=5))
    await c.start()
    a = agent(nc, ns, tmp_path, forge, "worker")
    await a.start()
    try:
        await publish_issue(nc, ns, opened(1, "The add function subtracts", labels=["backend"], repo="acme/calc"))
        await eventually(lambda: "acme_calc-1" in a.running, timeout=30)
        await publish_issue(nc, ns, IssueCancelRequested(event_id="cancel-1", repo="acme/calc", number=1,
                                                         occurred_at=now(), author="tester",
                                                         author_association="OWNER"))
        await eventually(lambda: c.model.tasks["acme_calc-1"].status == "cancelled", timeout=20)
        assert not a.running
    finally:
        await a.stop()
        await c.stop()


async def test_an_idle_agent_declared_offline_comes_back_when_told(nc, ns, store, tmp_path, forge) -> None:
    """The coordinator's ``agent.offline`` about an idle agent reaches it through its
    subscription: it registers again with its next heartbeat, not after the periodic look."""
    from events import agent_state as ag

    a = agent(nc, ns, tmp_path, forge, "napper", interval=0.2)
    await a.start()
    try:
        state, last = await store.load_agent("napper")
        events = ag.decide(state, ag.GoOffline(at=now(), actor="coordinator", reason="heartbeat_timeout"))
        await store.append(events, expected_last_seq=last)
        # well before the periodic look (every SUPERVISION_EVERY heartbeats: 3 s here)
        await eventually(lambda: a.state is not None and a.state.status == "idle" and a.last_seq > last + 1,
                         timeout=a.SUPERVISION_EVERY * 0.2 * 0.5)
    finally:
        await a.stop()


async def test_on_a_stream_without_ttls_the_agent_heartbeats_without_one(nc, ns, store, tmp_path, forge) -> None:
    """A heartbeats stream provisioned before per-message TTLs refuses them: the agent
    notices on its first heartbeat and goes on without a TTL; the monitor still sees it."""
    js = nc.jetstream()
    config = (await js.stream_info(ns.heartbeats_stream)).config
    await js.delete_stream(ns.heartbeats_stream)
    config.allow_msg_ttl, config.max_age = False, 0.0
    await js.add_stream(config)
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=1.0))
    await c.start()
    a = agent(nc, ns, tmp_path, forge, "old-stream")
    await a.start()
    try:
        hb = await js.get_msg(ns.heartbeats_stream, subject=ns.heartbeat_subject("old-stream"), direct=True)
        assert TTL_HEADER not in (hb.headers or {})
        await asyncio.sleep(3.0)  # three timeouts: followed by its heartbeats' sequence, alive
        assert c.model.agents["old-stream"].status == "idle"
    finally:
        await a.stop()
        await c.stop()
        await provision(nc, ns)  # (put the stream back as provisioning keeps it)


# -- permissions ---------------------------------------------------------------------------
def test_an_agent_subscribes_to_its_inbox_the_cancellations_and_its_own_offline_only() -> None:
    p = permissions_for("agent", Namespace("ccc"), "a1")
    assert p.subscribe_allow == (f"{inbox_prefix('agent', 'a1')}.>", "ccc.task.*.cancel_requested",
                                 "ccc.agent.a1.offline")
    creates = [s for s in p.publish_allow if s.startswith("$JS.API.CONSUMER.CREATE.CCC_EVENTS.")]
    assert creates == ["$JS.API.CONSUMER.CREATE.CCC_EVENTS.agent-a1.ccc.task.*.assigned.a1"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    s = Secured(tmp_path_factory.mktemp("secure-agent-bus"))
    s.url = s.server.start()
    yield s
    s.server.stop()


async def test_the_agent_role_may_hear_cancellations_and_its_own_offline_not_anothers(secured) -> None:
    s, p = secured, secured.ns.prefix
    admin = await s.as_("admin")
    await provision(admin, s.ns)
    await provision_agent(admin, s.ns, "a1")
    await admin.close()
    nc = await s.as_("agent", "a1")
    coord = await s.as_("coordinator")
    heard: list[str] = []

    async def cb(msg) -> None:
        heard.append(msg.subject)

    try:
        await nc.subscribe(f"{p}.task.*.cancel_requested", cb=cb)
        await nc.subscribe(f"{p}.agent.a1.offline", cb=cb)
        before = len(s.errors)
        await nc.subscribe(f"{p}.agent.a2.offline", cb=cb)  # another agent's: refused
        await nc.subscribe(f"{p}.task.>", cb=cb)  # every task event live: refused
        await eventually(lambda: sum("ermissions violation for subscription" in e for e in s.errors[before:]) >= 2,
                         timeout=5)
        await nc.flush()
        cjs = coord.jetstream(timeout=2)
        for subject in (f"{p}.task.acme_app-1.cancel_requested", f"{p}.agent.a1.offline", f"{p}.agent.a2.offline",
                        f"{p}.task.acme_app-1.created"):
            await cjs.publish(subject, b"{}")
        await eventually(lambda: len(heard) >= 2, timeout=5)
        await asyncio.sleep(0.2)
        assert sorted(heard) == [f"{p}.agent.a1.offline", f"{p}.task.acme_app-1.cancel_requested"]
        # ... and it still creates exactly one consumer: its own, on its own assignments
        js = nc.jetstream(timeout=1)
        await js.add_consumer(s.ns.events_stream, api.ConsumerConfig(
            name="agent-a1", durable_name="agent-a1", filter_subject=s.ns.assignments_filter("a1")))
    finally:
        await nc.close()
        await coord.close()
