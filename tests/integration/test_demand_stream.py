"""The demand board on a real nats-server (secure, as every embedded server is, and with its
HTTP monitoring port): the real coordinator queues tasks, the demand actor keeps
``<NS>_DEMAND`` equal to its read model with the coordinator's own credentials, and each
specialty's number is read the way KEDA's ``nats-jetstream`` scaler reads it — over HTTP,
``/jsz?acc=$G&consumers=true&config=true``, the named consumer's ``num_pending +
num_ack_pending`` in the named stream (kedacore/keda pkg/scalers/nats_jetstream_scaler.go).

A task counts while it waits for an agent or holds one (under its holder's specialty):
an agent taking it keeps the count (its pod is busy), its pull request opening or its
cancellation takes it off; a retry backoff puts it back when it ends, with no event; a
restarted actor finds a stale board and puts it right; and the permissions: the
coordinator may purge the demand stream and nothing else, an agent not even that."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime

import msgspec
import nats.errors
import pytest
import pytest_asyncio

from actors.coordinator import Coordinator, CoordinatorConfig
from actors.demand import DemandActor
from events import agent_state as ag
from events.issue import IssueCancelRequested
from events.store import EventStore
from events.subjects import Namespace
from events.task import SPECIALTIES
from events.work_reports import ImplementationProduced, PullRequestOpened, WorkFailed
from infra.adapters.nats.connection import connect_when_admitted
from infra.adapters.nats.demand import NatsDemandBoard
from infra.adapters.nats.provisioning import demand_consumer, provision
from infra.adapters.nats.secure import SecureDir
from infra.adapters.nats.server import EmbeddedServer
from projections.demand import Demand, counts, demand
from tests.conftest import eventually
from tests.integration.test_coordinator import FakeAgent, opened, publish_issue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ACCOUNT = "$G"  # no accounts configured: every user is in the global account (keda.yaml says so too)
DENIED = (asyncio.TimeoutError, nats.errors.TimeoutError)  # a refused publish never gets a reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bus:
    """A secure nats-server with monitoring on; each test gets a namespace of its own,
    with its users (coordinator, an agent) added to the running server."""

    def __init__(self, root) -> None:
        self.secure = SecureDir(root / "secure")
        self.secure.init(Namespace())
        self.http_port = free_port()
        self.server = EmbeddedServer(root, secure=self.secure, js_key=self.secure.js_key(), http_port=self.http_port)
        self.url = ""

    def namespace(self) -> Namespace:
        ns = Namespace("d" + uuid.uuid4().hex[:10])
        self.secure.init(ns)
        self.secure.add_agent(ns, "a1")
        self.server.reload()
        return ns

    async def as_(self, role, ns: Namespace, agent_id: str | None = None):
        kit = self.secure.kit(role, None if role == "admin" else ns, agent_id)
        return await connect_when_admitted(self.url, name=f"test-{kit.kit.user}", kit=kit, reconnect=False,
                                           quiet=True)

    def keda_lag(self, ns: Namespace, specialty: str) -> int:
        """What KEDA's scaler computes for a ScaledObject naming ``demand-<specialty>`` on
        ``<NS>_DEMAND``: the same request (its URL built as the scaler builds it) and the
        same fields, including its fallback when the consumer is missing (the stream's
        last sequence: a number that only grows, so a missing consumer is a fault)."""
        query = urllib.parse.urlencode({"acc": ACCOUNT, "config": "true", "consumers": "true"})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz?{query}", timeout=5) as r:
            jsz = json.load(r)
        for account in jsz.get("account_details") or []:
            if account.get("name") != ACCOUNT and account.get("id") != ACCOUNT:
                continue
            for stream in account.get("stream_detail") or []:
                if stream["name"] != ns.demand_stream:
                    continue
                for consumer in stream.get("consumer_detail") or []:
                    if consumer["name"] == demand_consumer(specialty):
                        return consumer["num_pending"] + consumer["num_ack_pending"]
                return stream["state"]["last_seq"]
        raise AssertionError(f"stream {ns.demand_stream} not in /jsz: KEDA would report 'stream not found'")

    async def lags(self, ns: Namespace) -> dict[str, int]:
        return {sp: n for sp in SPECIALTIES if (n := await asyncio.to_thread(self.keda_lag, ns, sp))}


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    b = Bus(tmp_path_factory.mktemp("demand"))
    b.url = b.server.start()
    yield b
    b.server.stop()


class World:
    def __init__(self, bus: Bus, ns: Namespace) -> None:
        self.bus, self.ns = bus, ns
        self.admin = self.coordinator_nc = None
        self.coordinator: Coordinator | None = None
        self.actors: list[DemandActor] = []

    async def start_coordinator(self, **config) -> Coordinator:
        self.coordinator = Coordinator(self.coordinator_nc, self.ns,
                                       CoordinatorConfig(heartbeat_timeout=60, **config))
        await self.coordinator.start()
        return self.coordinator

    async def start_demand(self) -> DemandActor:
        """As ``ccc up`` wires it: the coordinator's credentials and its live read model."""
        actor = DemandActor(NatsDemandBoard(self.coordinator_nc, self.ns), self.coordinator.live, resync=600)
        await actor.start()
        self.actors.append(actor)
        return actor

    async def stop_demand(self, actor: DemandActor) -> None:
        await actor.stop()
        self.actors.remove(actor)

    def wanted(self) -> dict[str, int]:
        model = self.coordinator.model
        board = demand(model.tasks, model.agents, datetime.now(UTC), queued=model.queued, holder=model.holder)
        return {sp: n for sp, n in counts(board).items() if n}

    def status(self, n: int) -> str | None:
        t = self.coordinator.model.tasks.get(f"acme_app-{n}")
        return t.status if t else None


@pytest_asyncio.fixture
async def world(bus):
    ns = bus.namespace()
    w = World(bus, ns)
    w.admin = await bus.as_("admin", ns)
    await provision(w.admin, ns)
    w.coordinator_nc = await bus.as_("coordinator", ns)
    yield w
    for actor in list(w.actors):
        await actor.stop()
    if w.coordinator is not None:
        await w.coordinator.stop()
    await w.coordinator_nc.close()
    await w.admin.close()


async def lags_are(w: World, expected: dict[str, int], timeout: float = 15.0) -> None:
    last: dict = {}

    async def check() -> bool:
        nonlocal last
        last = await w.bus.lags(w.ns)
        return last == expected

    try:
        await eventually(check, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"KEDA would read {last}, expected {expected}") from None


# -- what KEDA reads -----------------------------------------------------------------------
async def test_each_specialtys_pending_count_is_its_waiting_tasks_as_keda_reads_it(world):
    w = world
    c = await w.start_coordinator()
    actor = await w.start_demand()
    await lags_are(w, {})  # every consumer there (provisioned), nothing pending
    issues = [(1, "backend"), (2, "backend"), (3, "backend"), (4, "frontend"), (5, "frontend"),
              (6, "documentation")]
    for n, label in issues:
        await publish_issue(w.admin, w.ns, opened(n, f"issue {n}", labels=[label]))
    await publish_issue(w.admin, w.ns, opened(7, "depends on another", body="depends on #1", labels=["backend"]))
    await eventually(lambda: all(w.status(n) == "queued" for n in range(1, 8)))
    await lags_are(w, {"backend": 3, "frontend": 2, "documentation": 1})  # #7 waits for #1, not for an agent
    assert w.wanted() == {"backend": 3, "frontend": 2, "documentation": 1}

    # the message: the task, its specialty, since when it waits
    msg = await w.admin.jetstream().get_last_msg(w.ns.demand_stream, w.ns.demand_subject("frontend", "acme_app-4"))
    body = msgspec.json.decode(msg.data, type=Demand)
    assert (body.task_id, body.specialty, body.since) == ("acme_app-4", "frontend",
                                                           c.model.tasks["acme_app-4"].updated_at)

    # a backend agent takes two: they no longer wait, but its pod is busy with them, so the
    # count stays (a count of the waiting alone would tell KEDA to scale the busy pod away)
    store = EventStore(w.admin, w.ns)
    backend = FakeAgent(store, "a1", ("backend",), capacity=2)
    await backend.register()
    await eventually(lambda: sum(w.status(n) == "assigned" for n in (1, 2, 3)) == 2)
    taken = sorted(n for n in (1, 2, 3) if w.status(n) == "assigned")
    assert c.model.queued >= {f"acme_app-{n}" for n in {1, 2, 3} - set(taken)}
    await lags_are(w, {"backend": 3, "frontend": 2, "documentation": 1})
    # its pull request opens: the task needs no agent any more
    tid = f"acme_app-{taken[0]}"
    await backend.start(tid)
    await eventually(lambda: w.status(taken[0]) == "in_progress")
    await backend.report(tid, ImplementationProduced())
    await eventually(lambda: w.status(taken[0]) == "testing")
    await backend.report(tid, PullRequestOpened(branch="b"))
    await backend.release(tid)
    await eventually(lambda: w.status(taken[0]) == "checking")
    await lags_are(w, {"backend": 2, "frontend": 2, "documentation": 1})
    # a cancelled one neither
    await publish_issue(w.admin, w.ns, IssueCancelRequested(
        event_id="cancel-5", repo="acme/app", number=5, occurred_at=datetime.now(UTC), author="tester",
        author_association="OWNER"))
    await eventually(lambda: w.status(5) == "cancelled")
    await lags_are(w, {"backend": 2, "frontend": 1, "documentation": 1})
    # a general agent takes one of them: the slot it needs is a general pod's now
    general = FakeAgent(store, "g1", ("general",))
    await general.register()
    await eventually(lambda: "g1" in c.model.holder.values())
    (moved,) = [t for t, a in c.model.holder.items() if a == "g1"]
    was = c.model.tasks[moved].specialty
    expected = {"backend": 2, "frontend": 1, "documentation": 1}
    expected[was] -= 1
    expected = {sp: n for sp, n in {**expected, "general": 1}.items() if n}
    await lags_are(w, expected)
    assert w.wanted() == expected
    assert (actor.puts, actor.removals) == (7, 3)  # 6 tasks queued, 1 moved; 1 done, 1 cancelled, 1 moved
    assert await NatsDemandBoard(w.admin, w.ns).current() == actor.held


async def test_a_task_waits_again_when_its_retry_backoff_ends_with_no_event(world):
    w = world
    c = await w.start_coordinator(retry_base=2.0, retry_max=2.0)
    await w.start_demand()
    agent = FakeAgent(EventStore(w.admin, w.ns), "a1", ("backend",))
    await agent.register()
    await publish_issue(w.admin, w.ns, opened(1, "server bug", labels=["backend"]))
    await eventually(lambda: w.status(1) == "assigned")
    await agent.start("acme_app-1")
    await eventually(lambda: w.status(1) == "in_progress")
    await lags_are(w, {"backend": 1})  # held by its agent
    await agent.report("acme_app-1", WorkFailed(phase="implementing", reason="the coder gave up"))
    await agent.release("acme_app-1", "failed")
    await agent.do(ag.EnterMaintenance(at=datetime.now(UTC), actor="a1", reason="test"))  # takes nothing more
    await eventually(lambda: w.status(1) == "queued" and c.model.tasks["acme_app-1"].attempt == 2
                     and c.model.agents["a1"].status == "maintenance")
    log = EventStore(w.admin, w.ns)
    last = await log.last_seq()
    not_before = c.model.tasks["acme_app-1"].not_before
    assert not_before is not None and not_before > datetime.now(UTC)
    await lags_are(w, {}, timeout=1.0)  # queued, but in its backoff: no agent would hurry it
    assert datetime.now(UTC) < not_before
    await lags_are(w, {"backend": 1})
    assert datetime.now(UTC) >= not_before  # on the board only once the backoff was over,
    assert await log.last_seq() == last  # and with no event since: the actor's own timer
    assert w.status(1) == "queued"


async def test_a_restarted_actor_puts_a_stale_board_right(world):
    w = world
    await w.start_coordinator()
    actor = await w.start_demand()
    for n, label in ((1, "backend"), (2, "backend"), (3, "testing")):
        await publish_issue(w.admin, w.ns, opened(n, f"issue {n}", labels=[label]))
    await lags_are(w, {"backend": 2, "testing": 1})
    await w.stop_demand(actor)

    # while no actor runs: the board loses an entry, gains stale ones, and a task is queued
    admin = NatsDemandBoard(w.admin, w.ns)
    await admin.remove("backend", "acme_app-2")
    await admin.put("frontend", "acme_app-99", b"{}")  # no such task
    await admin.put("testing", "acme_app-1", b"{}")  # a real task, under the wrong specialty
    await admin.put("quantum", "acme_app-1", b"{}")  # a specialty no consumer counts
    await publish_issue(w.admin, w.ns, opened(4, "issue 4", labels=["devops"]))
    await eventually(lambda: w.status(4) == "queued")
    await lags_are(w, {"backend": 1, "testing": 2, "frontend": 1})

    restarted = await w.start_demand()
    await lags_are(w, {"backend": 2, "testing": 1, "devops": 1})
    assert await admin.current() == {("backend", "acme_app-1"), ("backend", "acme_app-2"),
                                     ("testing", "acme_app-3"), ("devops", "acme_app-4")} == restarted.held
    assert (restarted.puts, restarted.removals) == (2, 3)  # the difference, not a rewrite
    # idempotent: reconciling again, or a second coordinator's actor on the same board, changes nothing
    assert await restarted.reconcile() == (0, 0)
    second = await w.start_demand()
    assert (second.puts, second.removals) == (0, 0) and second.held == restarted.held
    await lags_are(w, {"backend": 2, "testing": 1, "devops": 1})


# -- who may touch the board ---------------------------------------------------------------
async def test_the_coordinator_may_purge_the_demand_stream_and_nothing_else_an_agent_not_even_that(world):
    w = world
    ns = w.ns
    coordinator = w.coordinator_nc
    await w.admin.jetstream().publish(ns.heartbeat_subject("a1"), b"{}")
    await w.admin.jetstream().publish(f"$KV.{ns.tasks_bucket}.acme_app-1", b"{}")

    # the coordinator: puts and takes down entries on the board
    board = NatsDemandBoard(coordinator, ns)
    await board.put("backend", "acme_app-1", b"{}")
    await board.put("backend", "acme_app-2", b"{}")
    assert await coordinator.jetstream(timeout=2).purge_stream(ns.demand_stream, subject=ns.demand_subject(
        "backend", "acme_app-1"))
    assert await board.current() == {("backend", "acme_app-2")}
    # ... and purges nothing else: neither the log's streams (denied by name) nor any other
    cjs = coordinator.jetstream(timeout=0.5)
    for stream in (ns.heartbeats_stream, ns.events_stream, ns.issues_stream, f"KV_{ns.tasks_bucket}"):
        with pytest.raises(DENIED):
            await cjs.purge_stream(stream)
    with pytest.raises(DENIED):
        await cjs.delete_stream(ns.demand_stream)
    ajs = w.admin.jetstream()
    assert (await ajs.stream_info(ns.heartbeats_stream)).state.messages == 1
    assert (await ajs.stream_info(f"KV_{ns.tasks_bucket}")).state.messages == 1

    # an agent: may neither post demand nor take it down
    agent = await w.bus.as_("agent", ns, "a1")
    try:
        gjs = agent.jetstream(timeout=0.5)
        with pytest.raises(DENIED):
            await gjs.publish(ns.demand_subject("backend", "acme_app-3"), b"{}")
        with pytest.raises(DENIED):
            await gjs.purge_stream(ns.demand_stream)
        with pytest.raises(DENIED):
            await gjs.purge_stream(ns.demand_stream, subject=ns.demand_subject("backend", "acme_app-2"))
    finally:
        await agent.close()
    assert await board.current() == {("backend", "acme_app-2")}
    assert await w.bus.lags(ns) == {"backend": 1}
