"""The event store: JetStream is the database.

* ``append``: one aggregate's new events, with ``Nats-Msg-Id`` (the event id, i.e.
  the aggregate position) for dedup and ``Nats-Expected-Last-Subject-Sequence`` scoped
  to the aggregate's wildcard for optimistic concurrency. A stale writer gets
  :class:`ConcurrencyConflict`, reloads, re-decides.
* ``append_many``: independent aggregates, pipelined (``publish_async``).
* ``load``: one aggregate's history and the stream sequence to expect next time.
* ``read`` / ``replay``: the log from any sequence through an ordered push consumer
  (the fast path); ``follow`` keeps going with new events.

A message that does not decode is never fatal: it comes out as :class:`BadMessage`
with its stream sequence, and reading continues after it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable, Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from opentelemetry import propagate

from events.codec import Event, encode
from events.errors import CccError, ConcurrencyConflict, StoreUnavailable
from events.store_pipeline import WRONG_LAST_SEQUENCE, _AckPipeline
from events.store_read import BadMessage, EventReader, Loaded, StoredEvent, _unavailable, decode_or_bad, stream_seq
from events.subjects import DEFAULT_NS, Namespace

__all__ = [
    "BATCH_COMMIT",
    "BATCH_ID",
    "BATCH_SEQ",
    "EXPECTED_SEQ",
    "EXPECTED_SEQ_SUBJECT",
    "MSG_ID",
    "WRONG_LAST_SEQUENCE",
    "BadMessage",
    "EventStore",
    "Loaded",
    "StoredEvent",
    "decode_or_bad",
    "stream_seq",
]

EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID = "Nats-Msg-Id"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQ = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"


class EventStore(EventReader):
    def __init__(self, nc: Client, ns: Namespace = DEFAULT_NS, *, timeout: float = 5.0,
                 retry_for: float = 15.0) -> None:
        self.nc = nc
        self.retry_for = retry_for  # an R3 leader election stalls writes ~5 s (DESIGN §9)
        self.ns = ns
        self.timeout = timeout
        self.js = nc.jetstream(timeout=timeout)
        self.stream = ns.events_stream
        self._pipeline: _AckPipeline | None = None

    # -- writing -------------------------------------------------------------------
    def _message(self, event: Event, expected: int | None) -> tuple[str, bytes, dict[str, str]]:
        subject = self.ns.subject(event.rel_subject)
        headers = {MSG_ID: event.event_id}
        propagate.inject(headers)  # W3C traceparent: one trace spans coordinator and agents
        if expected is not None:
            headers[EXPECTED_SEQ] = str(expected)
            headers[EXPECTED_SEQ_SUBJECT] = self.ns.scope_of(subject) or subject
        return subject, encode(event), headers

    async def append(self, events: Sequence[Event], *, expected_last_seq: int | None) -> list[int]:
        """Append events of one aggregate, all or nothing, retrying across a lost
        connection or a leader election for up to ``retry_for`` seconds with the same
        dedup ids. If a retry meets a conflict because the first try did land (its ack
        was what got lost), that is success: the aggregate's last message is ours."""
        deadline = time.monotonic() + self.retry_for
        tries = 0
        while True:
            try:
                return await self._append_once(events, expected_last_seq)
            except ConcurrencyConflict:
                if tries and events:
                    landed = await self._landed(events)
                    if landed:
                        return landed
                raise
            except StoreUnavailable as e:
                tries += 1
                if not e.retryable or time.monotonic() >= deadline \
                        or self.nc.is_closed or self.nc.is_draining:
                    raise  # (a connection we are closing will not come back: fail fast)
                await asyncio.sleep(min(1.0, 0.05 * 2 ** tries))

    async def _landed(self, events: Sequence[Event]) -> list[int] | None:
        subject = self.ns.subject(events[-1].rel_subject)
        try:
            msg = await self.js.get_last_msg(self.stream, self.ns.scope_of(subject) or subject, direct=True)
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError):
            return None
        if (msg.headers or {}).get(MSG_ID) != events[-1].event_id:
            return None
        return list(range(msg.seq - len(events) + 1, msg.seq + 1))

    async def _append_once(self, events: Sequence[Event], expected_last_seq: int | None) -> list[int]:
        """One try of :meth:`append`. ``expected_last_seq`` is the
        stream sequence of the aggregate's last event as loaded (0: none); ``None`` skips
        the check (only for writers that own the aggregate alone). Returns the sequences.

        Several events go as one JetStream atomic batch (server >= 2.12, stream
        ``allow_atomic``): one round trip, and a crash can never leave half a decision
        in the log."""
        if not events:
            return []
        if len(events) == 1:
            return [await self._append_one(events[0], expected_last_seq)]
        batch = secrets.token_hex(8)
        last = len(events)
        try:
            for i, event in enumerate(events, 1):
                subject, data, headers = self._message(event, expected_last_seq if i == 1 else None)
                headers[BATCH_ID] = batch
                headers[BATCH_SEQ] = str(i)
                if i < last:
                    await self.nc.publish(subject, data, headers=headers)
                else:
                    headers[BATCH_COMMIT] = "1"
                    reply = await self.nc.request(subject, data, headers=headers, timeout=self.timeout)
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise _unavailable(e) from None
        resp = msgspec.json.decode(reply.data) if reply.data else {}
        error = resp.get("error")
        if error is not None:
            if error.get("err_code") == WRONG_LAST_SEQUENCE:
                raise ConcurrencyConflict(
                    f"{events[0].rel_subject}: expected last sequence {expected_last_seq}, "
                    f"{error.get('description')}")
            raise StoreUnavailable(f"atomic append refused: {error.get('description')}")
        if "seq" not in resp:
            raise StoreUnavailable(f"unexpected batch ack: {reply.data[:200]!r}")
        end = int(resp["seq"])
        return list(range(end - last + 1, end + 1))

    async def _append_one(self, event: Event, expected: int | None) -> int:
        subject, data, headers = self._message(event, expected)
        try:
            ack = await self.js.publish(subject, data, headers=headers, timeout=self.timeout)
        except nats.js.errors.APIError as e:
            if e.err_code == WRONG_LAST_SEQUENCE:
                raise ConcurrencyConflict(
                    f"{subject}: expected last sequence {expected}, {e.description}"
                ) from None
            raise StoreUnavailable(f"append {subject}: {e}") from None
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise _unavailable(e) from None
        return ack.seq

    async def append_many(
        self, items: Iterable[tuple[Event, int | None]]
    ) -> list[int | Exception]:
        """Pipelined appends for independent aggregates: one round trip's latency for
        the whole batch. Each item is ``(event, expected_last_seq)``; the result holds
        the stream sequence or the error (ConcurrencyConflict / StoreUnavailable)."""
        if self._pipeline is None:
            self._pipeline = _AckPipeline(self.nc)
        futures = []
        try:
            for event, expected in items:
                subject, data, headers = self._message(event, expected)
                futures.append(await self._pipeline.publish(subject, data, headers))
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            for f in futures:
                f.cancel()
            raise _unavailable(e) from None
        done = await asyncio.gather(
            *(asyncio.wait_for(f, self.timeout) for f in futures), return_exceptions=True
        )
        return [r if isinstance(r, (int, CccError)) else _unavailable(r) for r in done]
