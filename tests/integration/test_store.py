"""The event store against a real nats-server."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import msgspec
import pytest

from events.errors import ConcurrencyConflict, StoreUnavailable
from events.codec import BadMessage
from events.store import EventStore
from events.task import IssueRef
from events.task_state import CreateTask, StartAnalysis, decide, evolve
from infra.adapters.nats.connection import connect
from infra.adapters.nats.server import EmbeddedServer
from infra.adapters.nats.provisioning import provision
from tests.support.histories import random_history

pytestmark = pytest.mark.timeout(60)
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def created(tid: str, n: int = 1):
    return decide(None, CreateTask(at=NOW, actor="coordinator", task_id=tid,
                                   issue=IssueRef(source="local", repo="acme/app", number=n, title="t")))


async def test_first_append_expects_no_aggregate(store):
    await store.append(created("acme_app-1"), expected_last_seq=0)
    with pytest.raises(ConcurrencyConflict):  # a second "creation" is refused
        await store.append(created("acme_app-1"), expected_last_seq=0)


async def test_stale_writer_conflicts_and_reload_wins(store):
    [seq1] = await store.append(created("acme_app-1"), expected_last_seq=0)
    state, last = await store.load_task("acme_app-1")
    # two writers decide from the same state
    a = decide(state, StartAnalysis(at=NOW, actor="coordinator-a"))
    b = decide(state, StartAnalysis(at=NOW, actor="coordinator-b"))
    results = await asyncio.gather(
        store.append(a, expected_last_seq=last), store.append(b, expected_last_seq=last),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ConcurrencyConflict) for r in results) == 1
    state, last2 = await store.load_task("acme_app-1")
    assert state.version == 2 and last2 > seq1


async def test_conflict_scope_is_the_aggregate(store):
    await store.append(created("acme_app-1", 1), expected_last_seq=0)
    # appends to another aggregate do not disturb this one's expectation
    await store.append(created("acme_app-2", 2), expected_last_seq=0)
    state, last = await store.load_task("acme_app-1")
    await store.append(decide(state, StartAnalysis(at=NOW, actor="c")), expected_last_seq=last)


async def test_dedup_without_expectation(store):
    ev = created("acme_app-9", 9)
    s1 = await store.append(ev, expected_last_seq=None)
    s2 = await store.append(ev, expected_last_seq=None)  # same Nats-Msg-Id: a no-op
    assert s1 == s2
    assert await store.last_seq() == s1[0]


async def test_append_many_pipelined_with_per_item_results(store):
    items = [(created(f"acme_app-{i}", i)[0], 0) for i in range(1, 201)]
    results = await store.append_many(items)
    assert all(isinstance(r, int) for r in results)
    assert sorted(results) == list(range(1, 201))
    again = await store.append_many(items[:3])
    assert all(isinstance(r, ConcurrencyConflict) for r in again), again


async def test_read_from_until_and_filter(store):
    log = random_history(21, steps=150)
    for e in log:
        await store.append([e], expected_last_seq=None)
    items = [x async for x in store.read()]
    assert [s for s, _ in items] == list(range(1, len(log) + 1))
    assert [e for _, e in items] == log
    part = [s async for s, _ in store.read(from_seq=10, until_seq=20)]
    assert part == list(range(10, 21))
    one = [e async for _, e in store.read(filter_subject=store.ns.task_filter("acme_app-1"))]
    assert one == [e for e in log if e.rel_subject.startswith("task.acme_app-1.")]
    assert [x async for x in store.read(from_seq=len(log) + 1)] == []


async def test_load_of_unknown_aggregate_is_empty(store):
    state, last = await store.load_task("nope-1")
    assert state is None and last == 0


async def test_follow_sees_new_events(store):
    seen: list[int] = []

    async def follower():
        async for seq, _ in store.read(follow=True):
            seen.append(seq)
            if len(seen) == 3:
                return

    task = asyncio.create_task(follower())
    for i in range(1, 4):
        await store.append(created(f"acme_app-{i}", i), expected_last_seq=0)
    await asyncio.wait_for(task, 10)
    assert seen == [1, 2, 3]


async def test_garbage_on_event_subject_is_a_bad_message(store, nc):
    js = nc.jetstream()
    await store.append(created("acme_app-1"), expected_last_seq=0)
    await js.publish(store.ns.subject("task.acme_app-1.created"), b"\x00garbage")
    await store.append(created("acme_app-2", 2), expected_last_seq=0)
    items = [x async for x in store.read()]
    assert isinstance(items[1][1], BadMessage) and items[1][0] == 2
    assert items[2][1].task_id == "acme_app-2"


async def test_unavailable_server_raises_store_unavailable(tmp_path):
    server = EmbeddedServer(tmp_path)
    server.start()
    nc = await connect(server.url, reconnect=False)
    await provision(nc)
    store = EventStore(nc, timeout=1.0, retry_for=1.0)
    server.kill()
    with pytest.raises(StoreUnavailable):
        await store.append(created("acme_app-1"), expected_last_seq=0)
    await nc.close()


async def test_appended_events_survive_server_restart(tmp_path):
    server = EmbeddedServer(tmp_path)
    server.start()
    nc = await connect(server.url)
    await provision(nc)
    store = EventStore(nc)
    log = random_history(4, steps=40)
    for e in log:
        await store.append([e], expected_last_seq=None)
    await nc.close()
    server.kill()  # SIGKILL: sync_interval=always must have fsynced every ack
    server2 = EmbeddedServer(tmp_path, port=None)
    server2.start()
    nc = await connect(server2.url)
    store = EventStore(nc)
    assert [e async for _, e in store.read()] == log
    await nc.close()
    server2.stop()


def test_evolve_of_loaded_history_matches(store):
    # sanity: the helper used above builds valid events
    ev = created("x-1")
    assert evolve(None, ev[0]).status == "pending"


async def test_several_events_append_atomically(store):
    from events.task import Analysis
    from events.task_state import RecordAnalysis

    [first] = created("acme_app-1")
    state = evolve(None, first)
    started = decide(state, StartAnalysis(at=NOW, actor="c"))
    analysed = decide(evolve(state, started[0]),
                      RecordAnalysis(at=NOW, actor="c", analysis=Analysis(specialty="backend")))
    seqs = await store.append([first, *started, *analysed], expected_last_seq=0)
    assert seqs == [1, 2, 3]
    state, last = await store.load_task("acme_app-1")
    assert state.status == "queued" and last == 3
    # a stale batch: nothing of it lands
    [other] = created("acme_app-2", 2)
    with pytest.raises(ConcurrencyConflict):
        await store.append([other, *decide(evolve(None, other), StartAnalysis(at=NOW, actor="c"))],
                           expected_last_seq=5)
    assert await store.last_seq() == 3


async def test_junk_on_a_tasks_subjects_leaves_it_readable_as_the_read_model_sees_it(nc, ns, store):
    """Decodable events the state machine rejects (a second creation, a transition with
    the wrong version) on a task's subjects are passed over by ``load_task`` as by the
    read model; their sequences still count for the next append."""
    from events.codec import encode
    from projections.read_model import ReadModel

    await store.append(created("acme_app-1", 1), expected_last_seq=0)
    state, _ = await store.load_task("acme_app-1")
    [forged] = decide(None, CreateTask(at=NOW, actor="intruder", task_id="acme_app-1",
                                       issue=IssueRef(source="local", repo="acme/app", number=1, title="forged")))
    [skipped] = decide(state, StartAnalysis(at=NOW, actor="intruder"))
    wrong_version = msgspec.structs.replace(skipped, version=7, event_id="junk-v7")
    for junk in (forged, wrong_version):
        await nc.jetstream().publish(ns.subject(junk.rel_subject), encode(junk),
                                     headers={"Nats-Msg-Id": f"junk-{junk.event_id}-{junk.version}"})
    loaded, last = await store.load_task("acme_app-1")
    assert loaded == state  # pending, version 1: both pieces of junk passed over
    view = ReadModel(ns.prefix)
    await store.replay(view.apply, filter_subject=ns.task_filter("acme_app-1"))
    assert view.tasks["acme_app-1"] == loaded
    # the next append expects the last sequence, junk included, and lands
    await store.append(decide(loaded, StartAnalysis(at=NOW, actor="c")), expected_last_seq=last)
    assert (await store.load_task("acme_app-1"))[0].status == "analyzing"
