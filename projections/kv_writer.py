"""Materialise the task and agent views into KV buckets (``<ns>_tasks``,
``<ns>_agents``) so ``nats kv get ccc_tasks <id>`` shows a task as JSON.

Each value is the view plus ``applied_seq``, the stream sequence of the last event
folded into it. Writes are pipelined (one round trip per flush, not per key).

The writer's checkpoint, the log position it has fully written (so a restart writes
only what changed since), is kept apart, in ``<ns>_checkpoints`` under the projection's
name (:data:`VIEWS_CHECKPOINT`): a bucket holds only what its name says, so every key of
``<ns>_tasks`` is a task and every key of ``<ns>_agents`` an agent, and a reader that
lists them (``nats kv ls ccc_tasks``, a script, a KEDA scaler) needs no exception.
Until this version the checkpoint was the key ``_checkpoint`` of ``<ns>_tasks``; a
cluster that still has it is migrated on the first start: the old value is read once,
written to the new place, and the old key purged (:meth:`KvMaterializer.load_checkpoint`).
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from events.errors import ConfigError, StoreUnavailable
from events.subjects import Namespace

from projections.read_model import ReadModel

log = structlog.get_logger("ccc.kv")
VIEWS_CHECKPOINT = "kv_views"
"""The key, in :func:`checkpoints_bucket`, of this writer's checkpoint: the task and
agent views of ``<ns>_tasks`` and ``<ns>_agents``."""
LEGACY_CHECKPOINT_KEY = "_checkpoint"
"""Where the checkpoint was until this version: a key of ``<ns>_tasks`` (migrated away)."""
_enc = msgspec.json.Encoder()
_NOT_THERE = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.NotFoundError)


def checkpoints_bucket(ns: Namespace) -> str:
    """The KV bucket of the projections' checkpoints: one key per projection that keeps
    one, its value ``{"applied_seq": N}``, the log position it has fully written."""
    return f"{ns.prefix}_checkpoints"


def view_record(view: msgspec.Struct, applied_seq: int) -> bytes:
    """A view as flat JSON with the stream sequence it reflects."""
    d = msgspec.to_builtins(view)
    d["applied_seq"] = applied_seq
    return _enc.encode(d)


class KvMaterializer:
    def __init__(self, nc: Client, ns: Namespace, model: ReadModel) -> None:
        self.js = nc.jetstream(timeout=10.0)
        self.ns = ns
        self.model = model
        self.written_seq = 0
        self._lock = asyncio.Lock()

    async def load_checkpoint(self) -> int:
        """Read the checkpoint (migrating one an older version kept in ``<ns>_tasks``) and
        forget dirtiness the KV already reflects."""
        try:
            self.written_seq = await self._read_checkpoint()
        except nats.js.errors.BucketNotFoundError:
            raise ConfigError(f"a KV bucket of {checkpoints_bucket(self.ns)}, {self.ns.tasks_bucket} is missing: "
                              "provisioning is an admin step (`ccc server`, `ccc up` or `ccc secure init` "
                              "on the server's machine)") from None
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise StoreUnavailable(f"KV checkpoint unreadable: {type(e).__name__}: {e}") from None
        m = self.model
        m.dirty_tasks = {t for t in m.dirty_tasks if m.task_seq.get(t, 0) > self.written_seq}
        m.dirty_agents = {a for a in m.dirty_agents if m.agent_seq.get(a, 0) > self.written_seq}
        return self.written_seq

    async def _read_checkpoint(self) -> int:
        bucket = checkpoints_bucket(self.ns)
        checkpoints = await self.js.key_value(bucket)
        current = await _get(checkpoints, VIEWS_CHECKPOINT)
        seq = 0 if current is None else _applied_seq(current, bucket)
        # an older version's checkpoint in the tasks bucket: read once, kept here (unless a
        # migration stopped half-way after keeping it), then taken out of the tasks
        tasks = await self.js.key_value(self.ns.tasks_bucket)
        legacy = await _get(tasks, LEGACY_CHECKPOINT_KEY)
        if legacy is not None:
            if current is None:
                seq = _applied_seq(legacy, self.ns.tasks_bucket)
                await checkpoints.put(VIEWS_CHECKPOINT, _enc.encode({"applied_seq": seq}))
            await tasks.purge(LEGACY_CHECKPOINT_KEY)
            log.info("kv.checkpoint_migrated", applied_seq=seq, to=f"{bucket}/{VIEWS_CHECKPOINT}",
                     source=f"{self.ns.tasks_bucket}/{LEGACY_CHECKPOINT_KEY}")
        return seq

    async def flush(self) -> int:
        """Write every view changed since the last flush; returns how many."""
        async with self._lock:
            m = self.model
            tasks, agents = m.dirty_tasks, m.dirty_agents
            if not tasks and not agents and self.written_seq >= m.last_seq:
                return 0
            m.dirty_tasks, m.dirty_agents = set(), set()
            upto = m.last_seq
            futures = []
            try:
                for tid in tasks:
                    futures.append(await self.js.publish_async(
                        f"$KV.{self.ns.tasks_bucket}.{tid}",
                        view_record(m.tasks[tid], m.task_seq[tid]),
                    ))
                for aid in agents:
                    futures.append(await self.js.publish_async(
                        f"$KV.{self.ns.agents_bucket}.{aid}",
                        view_record(m.agents[aid], m.agent_seq[aid]),
                    ))
                await asyncio.gather(*(asyncio.wait_for(f, 10.0) for f in futures))
                await self.js.publish(
                    f"$KV.{checkpoints_bucket(self.ns)}.{VIEWS_CHECKPOINT}",
                    _enc.encode({"applied_seq": upto}),
                )
            except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
                m.dirty_tasks |= tasks  # nothing is lost: try again on the next flush
                m.dirty_agents |= agents
                raise StoreUnavailable(f"KV materialisation failed: {e}") from None
            self.written_seq = upto
            return len(futures)


async def _get(kv, key: str):
    """The entry of ``key``, or None if there is none (never written, deleted, purged)."""
    try:
        return await kv.get(key)
    except _NOT_THERE:
        return None


def _applied_seq(entry, bucket: str) -> int:
    """A checkpoint's position; 0 (write everything again: slower, never wrong) for a
    value that does not say one."""
    try:
        return max(int(msgspec.json.decode(entry.value or b"")["applied_seq"]), 0)
    except (KeyError, TypeError, ValueError, msgspec.DecodeError):
        log.warning("kv.checkpoint_unreadable", bucket=bucket, key=entry.key)
        return 0
