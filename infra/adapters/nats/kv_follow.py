"""Following a KV bucket: every current value, then every change, to a callback.

nats-py's ``kv.watch`` delivers the current values, a ``None`` marker, then updates; it
ends when its ordered consumer is lost (a server restart, a long silence). A
:class:`KVFollower` wraps it for processes that must keep a view of some keys for their
whole life (the spend ledger's caps, the scheduler's view of the ledger): it makes the
watch again after any failure (with backoff), re-delivering the current values so
nothing changed meanwhile is missed, and sets :attr:`ready` once the values present at
the first start are in. Deleted and purged keys reach the callback as ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.kv import KeyValue

from events.errors import ConfigError

log = structlog.get_logger("ccc.nats.kv_follow")

OnChange = Callable[[str, bytes | None], None]
SILENCE = 60.0  # a watch quiet for this long is made again (cheap; survives a lost consumer)
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError)


class KVFollower:
    def __init__(self, nc: Client, bucket: str, on_change: OnChange, *, keys: str = ">", name: str = "",
                 timeout: float = 2.0, silence: float = SILENCE) -> None:
        self.nc, self.bucket, self.keys, self.on_change = nc, bucket, keys, on_change
        self.name = name or bucket
        self.timeout, self.silence = timeout, silence
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    async def start(self, *, wait: float | None = 5.0) -> bool:
        """Start following; wait up to ``wait`` seconds for the current values. True if
        they are in (False: the bus is slow or down; the follower keeps trying)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"kv-follow-{self.name}")
        if wait is None:
            return self.ready.is_set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ready.wait(), wait)
        return self.ready.is_set()

    async def stop(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=self.timeout * 2)

    async def _loop(self) -> None:
        backoff = 0.2
        while not self._closed:
            watcher = None
            try:
                try:
                    kv = await self.nc.jetstream(timeout=self.timeout).key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    raise ConfigError(f"bucket {self.bucket} is missing: provisioning is an admin step "
                                      "(`ccc server`, `ccc up`)") from None
                watcher = await kv.watch(self.keys)
                backoff = 0.2
                while not self._closed:
                    try:
                        entry = await watcher.updates(timeout=self.silence)
                    except nats.errors.TimeoutError:
                        break
                    if entry is None:  # the current values are all delivered
                        self.ready.set()
                        continue
                    if not isinstance(entry, KeyValue.Entry):
                        break
                    gone = entry.operation in ("DEL", "PURGE") or not entry.value
                    try:
                        self.on_change(entry.key, None if gone else entry.value)
                    except Exception:  # noqa: BLE001 - one bad value must not end the follower
                        log.warning("kv_follow.callback_failed", bucket=self.bucket, key=entry.key, exc_info=True)
            except asyncio.CancelledError:
                raise
            except (*NATS_ERRORS, ConfigError) as e:
                log.warning("kv_follow.watch_failed", bucket=self.bucket, follower=self.name,
                            error=f"{type(e).__name__}: {e}", retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if watcher is not None:
                    with contextlib.suppress(*NATS_ERRORS, asyncio.CancelledError):
                        await asyncio.wait_for(watcher.stop(), self.timeout)
