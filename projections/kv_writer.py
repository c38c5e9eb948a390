"""Materialise the task and agent views into KV buckets (``<ns>_tasks``,
``<ns>_agents``) so ``nats kv get ccc_tasks <id>`` shows a task as JSON.

Each value is the view plus ``applied_seq``, the stream sequence of the last event
folded into it. The writer keeps a ``_checkpoint`` key holding the log position it
has fully written, so a restart writes only what changed since. Writes are
pipelined (one round trip per flush, not per key).
"""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from events.errors import StoreUnavailable
from events.subjects import Namespace

from projections.read_model import ReadModel

log = structlog.get_logger("ccc.kv")
CHECKPOINT_KEY = "_checkpoint"
_enc = msgspec.json.Encoder()


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
        """Read the checkpoint and forget dirtiness the KV already reflects."""
        try:
            kv = await self.js.key_value(self.ns.tasks_bucket)
            entry = await kv.get(CHECKPOINT_KEY)
            self.written_seq = int(msgspec.json.decode(entry.value)["applied_seq"])
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.NotFoundError):
            self.written_seq = 0
        except (KeyError, ValueError, msgspec.DecodeError):
            log.warning("kv.checkpoint_unreadable", bucket=self.ns.tasks_bucket)
            self.written_seq = 0
        m = self.model
        m.dirty_tasks = {t for t in m.dirty_tasks if m.task_seq.get(t, 0) > self.written_seq}
        m.dirty_agents = {a for a in m.dirty_agents if m.agent_seq.get(a, 0) > self.written_seq}
        return self.written_seq

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
                    f"$KV.{self.ns.tasks_bucket}.{CHECKPOINT_KEY}",
                    _enc.encode({"applied_seq": upto}),
                )
            except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
                m.dirty_tasks |= tasks  # nothing is lost: try again on the next flush
                m.dirty_agents |= agents
                raise StoreUnavailable(f"KV materialisation failed: {e}") from None
            self.written_seq = upto
            return len(futures)
