"""The event store: JetStream is the database.

* ``append``: one aggregate's new events, with ``Nats-Msg-Id`` (the event id, i.e.
  the aggregate position) for dedup and ``Nats-Expected-Last-Subject-Sequence`` scoped
  to the aggregate's wildcard for optimistic concurrency. A stale writer gets
  :class:`ConcurrencyConflict`, reloads, re-decides.
* ``append_many``: independent aggregates, pipelined (:class:`~events.store_pipeline.AckPipeline`).
* ``last_seq``; ``replay`` (the rebuild hot path); ``read`` (an async iterator, with
  ``follow``): the log from any sequence through an ordered push consumer.
* ``load`` / ``load_task`` / ``load_agent``: one aggregate's history (or state) and the
  stream sequence to expect next time.

A message that does not decode is never fatal: it comes out as a
:class:`~events.codec.BadMessage` with its stream sequence, and reading continues after it.

Secrets never reach the log: every event is masked on its way in (every string field, at
any depth, by the process's masker, :mod:`events.secrets`), here at the one boundary every
writer passes, rather than trusted to each writer. The cost is a few substring searches
over the encoded bytes per event (~5 us for 500 bytes); only an event that may hold a
secret is walked and re-encoded.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from opentelemetry import propagate

from events.agent import AgentEvent
from events.agent_state import AgentState
from events.agent_state import evolve as evolve_agent
from events.codec import MAX_EVENT_BYTES, BadMessage, Event, bad_message, decode_or_bad, event_decoder
from events.errors import CccError, ConcurrencyConflict, DomainError, StoreUnavailable
from events.fold import fold
from events.retry import backoff
from events.secrets import Masker, masked_json
from events.store_pipeline import WRONG_LAST_SEQUENCE, AckPipeline
from events.subjects import DEFAULT_NS, Namespace
from events.task import TaskEvent
from events.task_state import TaskState
from events.task_state import evolve as evolve_task

EXPECTED_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID = "Nats-Msg-Id"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQ = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"


class StoredEvent(NamedTuple):
    seq: int
    event: Event


class Loaded(NamedTuple):
    events: list[StoredEvent]
    last_seq: int  # 0 when the aggregate has no events: expect "none" on append
    bad: list[BadMessage]


def _unavailable(e: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"NATS unavailable: {type(e).__name__}: {e}")


class EventStore:
    """The ``<NS>_EVENTS`` stream as an event store: reading (the log, one aggregate) and
    appending (one aggregate with optimistic concurrency, or many independent ones)."""

    def __init__(self, nc: Client, ns: Namespace = DEFAULT_NS, *, timeout: float = 5.0,
                 retry_for: float = 15.0, masker: Masker | None = None) -> None:
        self.nc = nc
        # None: the process's masker as it is at each append (it learns secrets at run time)
        self.masker = masker
        self.retry_for = retry_for  # an R3 leader election stalls writes ~5 s (DESIGN §9)
        self.ns = ns
        self.timeout = timeout
        self.js = nc.jetstream(timeout=timeout)
        self.stream = ns.events_stream
        self._pipeline: AckPipeline | None = None

    # -- reading -------------------------------------------------------------------
    async def last_seq(self, filter_subject: str | None = None) -> int:
        """Stream sequence of the last message matching ``filter_subject`` (wildcards
        allowed), or of the stream; 0 if none."""
        try:
            if filter_subject is None:
                info = await self.js.stream_info(self.stream)
                return info.state.last_seq
            msg = await self.js.get_last_msg(self.stream, filter_subject, direct=True)
            return msg.seq or 0
        except nats.js.errors.NotFoundError:
            return 0
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise _unavailable(e) from None

    async def _consume(
        self,
        on_msg: Callable[[int, str, bytes], None],
        *,
        filter_subject: str | None,
        from_seq: int,
        until_seq: int | None,
        follow: bool,
        stop: asyncio.Event | None = None,
    ) -> int:
        """Drive an ordered push consumer, calling ``on_msg(seq, subject, data)``
        synchronously for each message. Returns the last sequence seen."""
        end = None
        if not follow:
            end = await self.last_seq(filter_subject)
            if until_seq is not None:
                end = min(end, until_seq)
            if end < from_seq:
                return from_seq - 1
        done = asyncio.Event() if stop is None else stop
        last = from_seq - 1
        failure: list[BaseException] = []

        async def cb(msg) -> None:
            nonlocal last
            seq = stream_seq(msg.reply)
            if end is not None and seq > end:
                done.set()
                return
            last = seq
            try:
                on_msg(seq, msg.subject, msg.data)
            except BaseException as e:  # noqa: BLE001 - surfaced to the caller below
                failure.append(e)
                done.set()
                return
            if end is not None and seq >= end:
                done.set()

        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, from_seq),
        )
        if filter_subject is None:
            config.filter_subjects = [self.ns.task_filter(), self.ns.agent_filter()]
        try:
            sub = await self.js.subscribe(
                filter_subject or "", stream=self.stream, cb=cb, ordered_consumer=True,
                # a missed heartbeat resets the ordered consumer: 1 s notices a restarted
                # server quickly (the client default of 5 s left followers stalled ~20 s)
                idle_heartbeat=1.0,
                config=config, pending_msgs_limit=512 * 1024,
                pending_bytes_limit=256 * 1024 * 1024,
            )
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
            raise _unavailable(e) from None
        try:
            await done.wait()
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        if failure:
            raise failure[0]
        return last

    async def replay(
        self,
        apply: Callable[[int, Event | BadMessage], object],
        *,
        filter_subject: str | None = None,
        from_seq: int = 1,
        until_seq: int | None = None,
    ) -> int:
        """Fold the log (or the part matching ``filter_subject``) as it is now, from
        ``from_seq``, into ``apply``. Returns the last sequence applied.

        This is the rebuild hot path: decode and subject check are inlined."""
        cut = len(self.ns.prefix) + 1
        decode = event_decoder.decode

        def on_msg(seq: int, subject: str, data: bytes) -> None:
            try:
                event = decode(data)
            except msgspec.DecodeError as e:
                apply(seq, bad_message(seq, subject, str(e), data))
                return
            if event.rel_subject != subject[cut:] or len(data) > MAX_EVENT_BYTES:
                apply(seq, decode_or_bad(seq, subject, subject[cut:], data))
                return
            apply(seq, event)

        return await self._consume(
            on_msg, filter_subject=filter_subject, from_seq=from_seq, until_seq=until_seq,
            follow=False,
        )

    async def read(
        self,
        *,
        filter_subject: str | None = None,
        from_seq: int = 1,
        until_seq: int | None = None,
        follow: bool = False,
    ) -> AsyncIterator[tuple[int, Event | BadMessage]]:
        """The log as an async iterator; with ``follow`` it waits for new events."""
        queue: asyncio.Queue = asyncio.Queue()
        rel = self.ns.rel
        end_marker = object()

        def on_msg(seq: int, subject: str, data: bytes) -> None:
            queue.put_nowait((seq, decode_or_bad(seq, subject, rel(subject), data)))

        stop = asyncio.Event()  # ends the consumer even if a cancel is swallowed mid-subscribe

        async def run() -> None:
            try:
                await self._consume(
                    on_msg, filter_subject=filter_subject, from_seq=from_seq,
                    until_seq=until_seq, follow=follow, stop=stop,
                )
            except BaseException as e:  # noqa: BLE001
                queue.put_nowait(e)
            queue.put_nowait(end_marker)

        task = asyncio.ensure_future(run())
        try:
            while True:
                item = await queue.get()
                if item is end_marker:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def load(self, scope: str) -> Loaded:
        """One aggregate's history (``scope`` is its wildcard, e.g. ``ns.task_filter(id)``)."""
        events: list[StoredEvent] = []
        bad: list[BadMessage] = []

        def apply(seq: int, item: Event | BadMessage) -> None:
            (bad if isinstance(item, BadMessage) else events).append(
                item if isinstance(item, BadMessage) else StoredEvent(seq, item)
            )

        last = await self.replay(apply, filter_subject=scope)
        return Loaded(events, max(last, 0), bad)

    # An event the state machine rejects (a forged or misplaced message on the aggregate's
    # subjects) is passed over, as the read model passes over it: every reader of the log
    # sees the same state, and junk on a subject cannot make an aggregate unreadable (its
    # sequence still counts in ``last_seq``, which an append must expect).
    async def load_task(self, task_id: str) -> tuple[TaskState | None, int]:
        loaded = await self.load(self.ns.task_filter(task_id))
        state = fold(evolve_task, (e.event for e in loaded.events if isinstance(e.event, TaskEvent)),
                     skip=DomainError)
        return state, loaded.last_seq

    async def load_agent(self, agent_id: str) -> tuple[AgentState | None, int]:
        loaded = await self.load(self.ns.agent_filter(agent_id))
        state = fold(evolve_agent, (e.event for e in loaded.events if isinstance(e.event, AgentEvent)),
                     skip=DomainError)
        return state, loaded.last_seq

    # -- writing -------------------------------------------------------------------
    def _message(self, event: Event, expected: int | None) -> tuple[str, bytes, dict[str, str]]:
        subject = self.ns.subject(event.rel_subject)
        headers = {MSG_ID: event.event_id}
        propagate.inject(headers)  # W3C traceparent: one trace spans coordinator and agents
        if expected is not None:
            headers[EXPECTED_SEQ] = str(expected)
            headers[EXPECTED_SEQ_SUBJECT] = self.ns.scope_of(subject) or subject
        return subject, self.masked(event), headers

    def masked(self, event: Event) -> bytes:
        """The bytes stored for ``event``: with every secret in its strings masked (its
        identity fields, which its subject and dedup id are made of, excepted)."""
        return masked_json(event, self.masker)

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
                await asyncio.sleep(backoff(tries, 0.1, 1.0))  # 0.1, 0.2, 0.4, … 1 s

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
            self._pipeline = AckPipeline(self.nc)
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


def stream_seq(reply: str) -> int:
    """The stream sequence from a JetStream ack subject, without building metadata:
    ``$JS.ACK.<stream>.<consumer>.<n>.<sseq>...`` or, with domain and account hash,
    ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<n>.<sseq>...``."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])
