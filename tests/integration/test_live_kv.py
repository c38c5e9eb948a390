"""The live projection and its KV materialisation, against a real nats-server."""

from __future__ import annotations

import msgspec
import pytest

from events.store import EventStore
from projections.kv_writer import VIEWS_CHECKPOINT, checkpoints_bucket
from projections.live import LiveReadModel
from projections.read_model import ReadModel
from tests.conftest import eventually
from tests.support.histories import random_history

pytestmark = pytest.mark.timeout(60)


async def append_all(store: EventStore, log) -> None:
    results = await store.append_many((e, None) for e in log)
    assert all(isinstance(r, int) for r in results), results


async def test_live_model_follows_and_equals_rebuild(store):
    log = random_history(31, steps=200)
    half = len(log) // 2
    await append_all(store, log[:half])
    live = LiveReadModel(store)
    await live.start()
    try:
        assert live.model.last_seq == half
        await append_all(store, log[half:])
        await live.catch_up()
        fresh = ReadModel()
        await store.replay(fresh.apply)
        assert live.model.snapshot() == fresh.snapshot()
        assert live.model.last_seq == len(log)
    finally:
        await live.stop()


async def test_kv_materialisation_and_checkpoint(store, nc):
    log = random_history(32, steps=150)
    await append_all(store, log)
    live = LiveReadModel(store, materialize=True, flush_interval=0.01)
    await live.start()
    js = nc.jetstream()
    kv_tasks = await js.key_value(store.ns.tasks_bucket)
    kv_agents = await js.key_value(store.ns.agents_bucket)
    try:
        model = live.model
        for tid, state in model.tasks.items():
            value = msgspec.json.decode((await kv_tasks.get(tid)).value)
            assert value["status"] == state.status
            assert value["version"] == state.version
            assert value["applied_seq"] == model.task_seq[tid]
        for aid, state in model.agents.items():
            value = msgspec.json.decode((await kv_agents.get(aid)).value)
            assert value["status"] == state.status and value["applied_seq"] == model.agent_seq[aid]
        kv_checkpoints = await js.key_value(checkpoints_bucket(store.ns))
        checkpoint = msgspec.json.decode((await kv_checkpoints.get(VIEWS_CHECKPOINT)).value)
        assert checkpoint["applied_seq"] == len(log)

        # new events reach KV while following
        more = random_history(33, steps=60, n_tasks=2)
        more = [e for e in more if e.rel_subject.startswith("task.")]
        renamed = [msgspec.structs.replace(e, task_id="zz_new-" + e.task_id.rsplit("-", 1)[1],
                                           event_id="zz_new-" + e.event_id.split("-", 1)[1],
                                           correlation_id="zz_new-" + e.task_id.rsplit("-", 1)[1])
                   for e in more]
        await append_all(store, renamed)
        last = renamed[-1]

        async def reached():
            try:
                v = msgspec.json.decode((await kv_tasks.get(last.task_id)).value)
            except Exception:  # noqa: BLE001 - not there yet
                return False
            return v["version"] == live.model.tasks[last.task_id].version
        await eventually(reached)
    finally:
        await live.stop()

    # a restarted materialiser only writes what changed after its checkpoint
    live2 = LiveReadModel(store, materialize=True)
    await live2.start()
    try:
        assert live2.kv.written_seq == live2.model.last_seq
        assert live2.model.dirty_tasks == set()
    finally:
        await live2.stop()


async def test_bad_messages_do_not_stop_the_live_model(store, nc):
    js = nc.jetstream()
    log = random_history(34, steps=80)
    live = LiveReadModel(store)
    await live.start()
    try:
        await append_all(store, log[:10])
        await js.publish(store.ns.subject("task.acme_app-1.created"), b"{not json")
        await js.publish(store.ns.subject("agent.agent-a.registered"), b'{"type":"agent.unknown"}')
        await append_all(store, log[10:])
        await live.catch_up()
        assert live.model.bad_count == 2
        assert [b.seq for b in live.model.bad] == [11, 12]
        assert live.model.applied_count == len(log)
    finally:
        await live.stop()
