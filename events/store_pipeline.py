"""Pipelined appends with our own ack inbox, for ``EventStore.append_many``."""

from __future__ import annotations

import asyncio
import secrets

import msgspec
from nats.aio.client import Client

from events.errors import ConcurrencyConflict, StoreUnavailable

WRONG_LAST_SEQUENCE = 10071


class AckPipeline:
    """Pipelined JetStream publishes with our own ack inbox.

    (nats-py's ``publish_async`` raises inside its reply callback when the server
    answers with an error, so a conflict would surface only as a timeout; here every
    ack, good or bad, resolves its future.)"""

    MAX_IN_FLIGHT = 4096

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = f"{bytes(nc._inbox_prefix).decode()}.{secrets.token_hex(8)}."
        self.futures: dict[str, asyncio.Future] = {}
        self.slots = asyncio.Semaphore(self.MAX_IN_FLIGHT)
        self.sub = None
        self.counter = 0

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> asyncio.Future:
        if self.sub is None:
            self.sub = await self.nc.subscribe(self.prefix + "*", cb=self._on_ack)
        await self.slots.acquire()
        self.counter += 1
        token = str(self.counter)
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _f, t=token: self._done(t))
        self.futures[token] = future
        await self.nc.publish(subject, data, reply=self.prefix + token, headers=headers)
        return future

    def _done(self, token: str) -> None:
        self.futures.pop(token, None)
        self.slots.release()

    async def _on_ack(self, msg) -> None:
        future = self.futures.get(msg.subject[len(self.prefix):])
        if future is None or future.done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(StoreUnavailable("no stream responded (is it provisioned?)"))
            return
        try:
            resp = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            future.set_exception(StoreUnavailable(f"unreadable ack: {msg.data[:100]!r}"))
            return
        error = resp.get("error")
        if error is None:
            future.set_result(int(resp["seq"]))
        elif error.get("err_code") == WRONG_LAST_SEQUENCE:
            future.set_exception(ConcurrencyConflict(f"{error.get('description')}"))
        else:
            future.set_exception(StoreUnavailable(f"append refused: {error.get('description')}"))
