"""The KV views hold only what their names say: every key of ``<ns>_tasks`` is a task,
every key of ``<ns>_agents`` an agent; the writer's checkpoint lives in
``<ns>_checkpoints``. A cluster an older version left with the checkpoint as the key
``_checkpoint`` of ``<ns>_tasks`` is migrated on the first start: read once, kept in the
new place, purged from the tasks. Against real nats-servers: the session's, and one with
the generated security, where the coordinator's own credentials do the migration."""

from __future__ import annotations

import msgspec
import nats.js.errors
import pytest

from events.errors import ConfigError
from events.store import EventStore
from events.subjects import Namespace
from infra.adapters.nats.provisioning import provision
from projections.kv_writer import LEGACY_CHECKPOINT_KEY, VIEWS_CHECKPOINT, KvMaterializer, checkpoints_bucket
from projections.live import LiveReadModel
from projections.read_model import ReadModel
from tests.integration.test_live_kv import append_all
from tests.integration.test_security import Secured
from tests.support.histories import random_history

pytestmark = pytest.mark.timeout(60)


async def keys(kv) -> set[str]:
    try:
        return set(await kv.keys())
    except nats.js.errors.NoKeysError:
        return set()


async def checkpoint_of(js, ns: Namespace) -> dict | None:
    try:
        entry = await (await js.key_value(checkpoints_bucket(ns))).get(VIEWS_CHECKPOINT)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    return msgspec.json.decode(entry.value)


async def has_legacy_key(js, ns: Namespace) -> bool:
    tasks = await js.key_value(ns.tasks_bucket)
    try:
        await tasks.get(LEGACY_CHECKPOINT_KEY)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return LEGACY_CHECKPOINT_KEY in await keys(tasks)  # (never listed once purged)
    return True


async def old_layout(js, ns: Namespace, value: bytes, *, keep_new: bool = False) -> None:
    """What an older version left: the checkpoint as a key of ``<ns>_tasks`` (and, with
    ``keep_new``, a migration that stopped after writing the new one)."""
    if not keep_new:
        await (await js.key_value(checkpoints_bucket(ns))).purge(VIEWS_CHECKPOINT)
    await (await js.key_value(ns.tasks_bucket)).put(LEGACY_CHECKPOINT_KEY, value)


async def model_of(store: EventStore) -> ReadModel:
    model = ReadModel(store.ns.prefix)
    await store.replay(model.apply)
    return model


async def materialised(store: EventStore) -> int:
    """Run the KV materialiser once over the whole log; the sequence it reached."""
    live = LiveReadModel(store, materialize=True)
    await live.start()
    try:
        return await live.catch_up()
    finally:
        await live.stop()


async def test_the_view_buckets_hold_only_views_and_the_checkpoint_lives_apart(store, nc):
    log = random_history(41, steps=120)
    await append_all(store, log)
    end = await materialised(store)
    js, model = nc.jetstream(), await model_of(store)
    assert await keys(await js.key_value(store.ns.tasks_bucket)) == set(model.tasks)
    assert await keys(await js.key_value(store.ns.agents_bucket)) == set(model.agents)
    assert await keys(await js.key_value(checkpoints_bucket(store.ns))) == {VIEWS_CHECKPOINT}
    assert await checkpoint_of(js, store.ns) == {"applied_seq": end} and end == len(log)


async def test_an_old_checkpoint_is_read_once_moved_and_purged_from_the_tasks(store, nc):
    js = nc.jetstream()
    log = random_history(42, steps=160)
    half = len(log) // 2
    await append_all(store, log[:half])
    assert await materialised(store) == half
    await old_layout(js, store.ns, msgspec.json.encode({"applied_seq": half}))
    assert await has_legacy_key(js, store.ns) and await checkpoint_of(js, store.ns) is None
    await append_all(store, log[half:])

    model = await model_of(store)
    kv = KvMaterializer(nc, store.ns, model)
    # the old position counts: only what changed after it is written again
    assert await kv.load_checkpoint() == half
    assert model.dirty_tasks == {t for t, seq in model.task_seq.items() if seq > half}
    assert model.dirty_agents == {a for a, seq in model.agent_seq.items() if seq > half}
    assert await checkpoint_of(js, store.ns) == {"applied_seq": half}
    assert not await has_legacy_key(js, store.ns)
    assert LEGACY_CHECKPOINT_KEY not in await keys(await js.key_value(store.ns.tasks_bucket))

    await kv.flush()
    assert await checkpoint_of(js, store.ns) == {"applied_seq": len(log)}
    assert await keys(await js.key_value(store.ns.tasks_bucket)) == set(model.tasks)
    # read once: the next start finds the checkpoint in its new place only
    again = KvMaterializer(nc, store.ns, await model_of(store))
    assert await again.load_checkpoint() == len(log) and not await has_legacy_key(js, store.ns)


async def test_a_migration_stopped_half_way_keeps_the_new_checkpoint(store, nc):
    js = nc.jetstream()
    log = random_history(43, steps=60)
    await append_all(store, log)
    assert await materialised(store) == len(log)
    await old_layout(js, store.ns, msgspec.json.encode({"applied_seq": 3}), keep_new=True)
    kv = KvMaterializer(nc, store.ns, await model_of(store))
    assert await kv.load_checkpoint() == len(log)  # the newer one wins over the stale old key
    assert not await has_legacy_key(js, store.ns)
    assert await checkpoint_of(js, store.ns) == {"applied_seq": len(log)}


async def test_an_unreadable_old_checkpoint_means_everything_is_written_again(store, nc):
    js = nc.jetstream()
    await append_all(store, random_history(44, steps=40))
    await materialised(store)
    await old_layout(js, store.ns, b"not a checkpoint")
    model = await model_of(store)
    kv = KvMaterializer(nc, store.ns, model)
    assert await kv.load_checkpoint() == 0
    assert model.dirty_tasks == set(model.tasks)  # slower, never wrong
    assert not await has_legacy_key(js, store.ns)
    assert await checkpoint_of(js, store.ns) == {"applied_seq": 0}


async def test_a_cluster_not_provisioned_for_the_checkpoints_says_so(nc):
    ns = Namespace("tnoprov")
    kv = KvMaterializer(nc, ns, ReadModel(ns.prefix))
    with pytest.raises(ConfigError, match=f"{ns.prefix}_checkpoints.*provisioning is an admin step"):
        await kv.load_checkpoint()


async def test_the_coordinators_credentials_may_keep_and_migrate_the_checkpoint(tmp_path):
    """With security on, the KV views are the coordinator's to write (the status API's
    credentials may not): the new bucket is in its permissions, and so is the purge of
    the old key."""
    s = Secured(tmp_path)
    s.url = s.server.start()
    try:
        admin = await s.as_("admin")
        coordinator = await s.as_("coordinator", inbox_prefix="_INBOX_coordinator")
        try:
            await provision(admin, s.ns)
            log = random_history(45, steps=60)  # (agents' events too: written as admin)
            await append_all(EventStore(admin, s.ns), log)
            await old_layout(admin.jetstream(), s.ns, msgspec.json.encode({"applied_seq": 7}))
            # as the coordinator: migrate, write the views, keep the checkpoint
            assert await materialised(EventStore(coordinator, s.ns)) == len(log)
            assert await checkpoint_of(admin.jetstream(), s.ns) == {"applied_seq": len(log)}
            assert not await has_legacy_key(admin.jetstream(), s.ns)
            assert not s.errors, s.errors
        finally:
            await coordinator.close()
            await admin.close()
    finally:
        s.server.stop()
