"""What keeps the status API close to its framework (``ccc bench api`` measures it), checked
against a real nats-server: a page of the board reuses the answer it built for each
task while the task and its wait words are unchanged (and builds a new one the moment
either changes); ``/health`` asks NATS for the log's end at most once per
``HEALTH_TTL``, however many probes come, and still reports a lost connection at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest

from events import task_state
from events.store import EventStore
from events.task import Analysis, IssueRef
from events.task_state import CreateTask, RecordAnalysis, StartAnalysis
from infra.adapters.nats.connection import connect
from projections.live import LiveReadModel
from projections.status_api import create_app
from projections.status_views import HEALTH_TTL, StatusReader

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


def create(task_id: str, seconds: int) -> CreateTask:
    number = int(task_id.split("-")[1]) + 1
    issue = IssueRef(source="local", repo="acme/cost", number=number, title=f"issue {task_id}")
    return CreateTask(at=T0 + timedelta(seconds=seconds), actor="coordinator", task_id=task_id, issue=issue)


async def append(store: EventStore, task_id: str, seconds: int, *more) -> int:
    state, last = (await store.load_task(task_id))
    commands = [create(task_id, seconds)] if state is None else []
    for command in [*commands, *more]:
        events = task_state.decide(state, command)
        last = (await store.append(events, expected_last_seq=last))[-1]
        state = task_state.fold(events, state)
    return last


def analysed(seconds: int) -> list:
    at = T0 + timedelta(seconds=seconds)
    return [StartAnalysis(at=at, actor="coordinator"),
            RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(specialty="backend"))]


async def test_a_page_reuses_each_tasks_answer_until_the_task_or_its_words_change(store, live):
    for i in range(5):
        last = await append(store, f"c-{i}", i)
    last = await append(store, "c-0", 0, *analysed(10))  # queued: its words follow the clock
    await live.wait_for_seq(last, timeout=5)
    now = [T0 + timedelta(minutes=5)]
    reader = StatusReader(live, clock=lambda: now[0])

    def page():
        return reader.task_page(reader.task_ids_in_order(), states=None, specialties=None, agent=None,
                                limit=50, offset=0).items

    first = page()
    assert [t.task_id for t in first] == [f"c-{i}" for i in range(5)]
    again = page()
    assert all(a is b for a, b in zip(first, again))  # nothing changed: the very same answers
    assert reader.task_out("c-3") is first[3]

    now[0] += timedelta(minutes=10)  # the queued task has waited longer: its words move on, nobody else's
    later = page()
    assert later[0] is not first[0] and later[0].queue != first[0].queue
    assert "waited 14m" in later[0].queue and later[0].waiting == first[0].waiting
    assert later[0].applied_seq == first[0].applied_seq and later[0].version == first[0].version
    assert all(a is b for a, b in zip(first[1:], later[1:]))

    # the page's JSON, joined from each task's cached JSON: the same bytes as encoding the page
    for limit, offset in ((50, 0), (2, 1), (2, 10)):
        kw = {"states": None, "specialties": None, "agent": None, "limit": limit, "offset": offset}
        assert reader.task_page_json(reader.task_ids_in_order(), **kw) == \
            msgspec.json.encode(reader.task_page(reader.task_ids_in_order(), **kw))

    def queued() -> list[str]:  # a filtered view of the board, kept while the log stands still
        return [t.task_id for t in reader.task_page(reader.task_ids_in_order(), states=frozenset({"queued"}),
                                                    specialties=None, agent=None, limit=50, offset=0).items]

    assert queued() == queued() == ["c-0"]
    seq = await append(store, "c-2", 2, *analysed(20))  # an event: that task's answer is rebuilt
    await live.wait_for_seq(seq, timeout=5)
    assert queued() == ["c-0", "c-2"]
    fresh = page()
    assert fresh[2] is not later[2]
    assert (fresh[2].status, fresh[2].applied_seq, fresh[2].specialty) == ("queued", seq, "backend")
    assert all(fresh[k] is later[k] for k in (1, 3, 4))


async def test_agent_answers_are_reused_until_the_agent_changes(store, live):
    from events import agent_state
    from events.agent_state import EnterMaintenance, RegisterAgent

    events = agent_state.decide(None, RegisterAgent(at=T0, actor="a-1", agent_id="a-1", specialties=("backend",)))
    seq = (await store.append(events, expected_last_seq=0))[-1]
    await live.wait_for_seq(seq, timeout=5)
    reader = StatusReader(live)
    one = reader.agent_out("a-1")
    assert reader.agent_out("a-1") is one
    assert reader.agent_page(states=None, specialties=None, limit=50, offset=0).items[0] is one
    state = agent_state.fold(events, None)
    seq = (await store.append(agent_state.decide(state, EnterMaintenance(at=T0, actor="a-1", reason="upgrade")),
                              expected_last_seq=seq))[-1]
    await live.wait_for_seq(seq, timeout=5)
    changed = reader.agent_out("a-1")
    assert changed is not one and changed.status == "maintenance" and changed.applied_seq == seq


async def test_health_asks_nats_once_per_ttl_and_sees_a_lost_connection_at_once(nats_url, admin_kit, ns, nc,
                                                                                 store):
    """Every ask for the log's end is a JetStream API request on the bus: a plain
    subscriber to ``$JS.API.STREAM.INFO.<stream>`` sees each one."""
    last = await append(store, "h-1", 0)
    own = await connect(nats_url, name="health-cost-test", reconnect=False, kit=admin_kit)
    live = LiveReadModel(EventStore(own, ns))
    await live.start()
    asks: list[str] = []

    async def seen(msg) -> None:
        asks.append(msg.subject)

    sub = await nc.subscribe(f"$JS.API.STREAM.INFO.{ns.events_stream}", cb=seen)
    await nc.flush()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(live)),
                                     base_url="http://status") as client:
            bodies = [r.json() for r in await asyncio.gather(*(client.get("/health") for _ in range(20)))]
            bodies += [(await client.get("/health")).json() for _ in range(20)]
            await nc.flush()
            await asyncio.sleep(0.05)
            assert len(asks) == 1, asks  # 40 probes within the TTL, one ask (shared while in flight)
            assert all(b["status"] == "ok" and b["stream_last_seq"] == last and b["lag"] == 0 for b in bodies)

            seq = await append(store, "h-2", 1)  # the log moves on: the answer follows the projection
            await live.wait_for_seq(seq, timeout=5)
            assert (await client.get("/health")).json()["stream_last_seq"] == seq
            await asyncio.sleep(HEALTH_TTL + 0.05)
            assert (await client.get("/health")).json()["stream_last_seq"] == seq
            await nc.flush()
            await asyncio.sleep(0.05)
            assert len(asks) == 2  # asked again once the TTL had passed

            await own.close()  # within the TTL of an ok answer: a lost connection still shows at once
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["nats_connected"] is False
    finally:
        await sub.unsubscribe()
        await live.stop()


def test_only_clocked_statuses_have_words_that_read_the_clock():
    """What lets the reader keep a task's words while the board is unchanged: outside
    ``CLOCKED``, ``why`` and ``explain`` give the same words at any time (a board with
    every state, with agents, a file lease and the merge queue)."""
    from infra.shell.bench.api import agent_histories, task_histories
    from projections.fairness import explain
    from projections.read_model import ReadModel
    from projections.waits import CLOCKED, Holds, Waits

    model = ReadModel("ccc")
    seq = 0
    for history in agent_histories(6) + task_histories(60, 6):
        for event in history:
            seq += 1
            model.apply(seq, event)
    waits = Waits.of(model.tasks, model.agents, None, Holds())
    soon, later = T0 + timedelta(seconds=1), T0 + timedelta(days=3, minutes=7)
    statuses = set()
    for t in model.tasks.values():
        if t.status in CLOCKED:
            continue
        statuses.add(t.status)
        assert waits.why(t, soon) == waits.why(t, later), t.task_id
        assert explain(t, soon) == explain(t, later) == ""
    assert {"pending", "analyzing", "assigned", "in_progress", "testing", "completed", "failed",
            "cancelled"} <= statuses
