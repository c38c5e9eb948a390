"""Keep a :class:`ReadModel` current: rebuild it from the log (the fast ordered
replay), then follow new events. Optionally materialise it to KV as it goes.

Bad messages are logged with their stream sequence once, when first seen."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from events.errors import StoreUnavailable
from events.store import EventStore
from events.aio import cancel_and_wait

from projections.kv_writer import KvMaterializer
from projections.read_model import ReadModel

log = structlog.get_logger("ccc.projection")


class LiveReadModel:
    def __init__(
        self,
        store: EventStore,
        *,
        materialize: bool = False,
        flush_interval: float = 0.05,
    ) -> None:
        self.store = store
        self.model = ReadModel(store.ns.prefix)
        self.kv = KvMaterializer(store.nc, store.ns, self.model) if materialize else None
        self.flush_interval = flush_interval
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self.stream_last_seq = 0  # the log's end as last observed (for lag)
        self.started = False
        # folds that ride along with the model (e.g. metrics counters): called with every
        # (seq, item) the model applied or rejected, after it
        self.observers: list[Callable[[int, object], object]] = []

    async def start(self) -> None:
        self.started = True
        await self.store.replay(self._log_bad_apply)
        if self.kv is not None:
            await self.kv.load_checkpoint()
            await self.kv.flush()
        self._tasks.append(asyncio.create_task(self._follow(), name="projection-follow"))
        if self.kv is not None:
            self._tasks.append(asyncio.create_task(self._materialize(), name="kv-materialize"))

    def _log_bad_apply(self, seq: int, item) -> None:
        before = self.model.bad_count
        self.model.apply(seq, item)
        for observe in self.observers:
            observe(seq, item)
        if self.model.bad_count != before:
            bad = self.model.bad[-1]
            log.warning("projection.bad_event", seq=bad.seq, subject=bad.subject, error=bad.error)

    async def _follow(self) -> None:
        while True:
            try:
                async for seq, item in self.store.read(
                    from_seq=self.model.last_seq + 1, follow=True
                ):
                    self._log_bad_apply(seq, item)
                    async with self._changed:
                        self._changed.notify_all()
            except StoreUnavailable as e:
                log.warning("projection.follow_interrupted", error=str(e))
                await asyncio.sleep(0.5)

    async def _materialize(self) -> None:
        assert self.kv is not None
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.kv.flush()
            except StoreUnavailable as e:
                log.warning("kv.flush_failed", error=str(e))

    @property
    def following(self) -> bool:
        """False once the follower task has died (a bug): /health reports it."""
        return any(t.get_name() == "projection-follow" and not t.done() for t in self._tasks)

    async def wait_for_seq(self, seq: int, timeout: float = 10.0) -> None:
        """Wait until everything up to ``seq`` has been applied (read-your-writes)."""
        async def reached() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.model.last_seq >= seq)
        await asyncio.wait_for(reached(), timeout)

    async def catch_up(self, timeout: float = 10.0) -> int:
        """Wait until the model reflects the log as it is now; returns that sequence."""
        end = await self.store.last_seq()
        self.stream_last_seq = end
        await self.wait_for_seq(end, timeout)
        return end

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.kv is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.kv.flush()
