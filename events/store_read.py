"""Reading the event store: the log through an ordered push consumer.

``last_seq``, ``replay`` (the rebuild hot path), ``read`` (an async iterator, with
``follow``), and ``load`` / ``load_task`` / ``load_agent`` for one aggregate.
:class:`EventReader` is the base of :class:`events.store.EventStore`; a message that
does not decode comes out as :class:`BadMessage` and reading continues after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from events.agent import AgentEvent
from events.agent_state import AgentState
from events.agent_state import fold as fold_agent
from events.codec import MAX_EVENT_BYTES, Event, decode_event, event_decoder
from events.errors import BadEventError, StoreUnavailable
from events.task import TaskEvent
from events.task_state import TaskState
from events.task_state import fold as fold_task

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from events.subjects import Namespace


class StoredEvent(NamedTuple):
    seq: int
    event: Event


class BadMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message on an event subject that could not be applied; kept for operators."""

    seq: int
    subject: str
    error: str
    preview: str = ""


class Loaded(NamedTuple):
    events: list[StoredEvent]
    last_seq: int  # 0 when the aggregate has no events: expect "none" on append
    bad: list[BadMessage]


def _unavailable(e: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"NATS unavailable: {type(e).__name__}: {e}")


class EventReader:
    """The reading side of :class:`events.store.EventStore`, which sets these up."""

    js: JetStreamContext
    ns: Namespace
    stream: str

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
                apply(seq, BadMessage(seq=seq, subject=subject, error=str(e),
                                      preview=data[:200].decode("utf-8", errors="replace")))
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

    async def load_task(self, task_id: str) -> tuple[TaskState | None, int]:
        loaded = await self.load(self.ns.task_filter(task_id))
        state = fold_task(e.event for e in loaded.events if isinstance(e.event, TaskEvent))
        return state, loaded.last_seq

    async def load_agent(self, agent_id: str) -> tuple[AgentState | None, int]:
        loaded = await self.load(self.ns.agent_filter(agent_id))
        state = fold_agent(e.event for e in loaded.events if isinstance(e.event, AgentEvent))
        return state, loaded.last_seq


def stream_seq(reply: str) -> int:
    """The stream sequence from a JetStream ack subject, without building metadata:
    ``$JS.ACK.<stream>.<consumer>.<n>.<sseq>...`` or, with domain and account hash,
    ``$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<n>.<sseq>...``."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def decode_or_bad(seq: int, subject: str, rel_subject: str, data: bytes) -> Event | BadMessage:
    try:
        return decode_event(rel_subject, data)
    except BadEventError as e:
        return BadMessage(seq=seq, subject=subject, error=str(e),
                          preview=data[:200].decode("utf-8", errors="replace"))
