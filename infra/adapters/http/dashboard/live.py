"""The dashboard's live updates: ``GET /ui/stream``, server-sent events pushed from the
live projection (an observer on :class:`LiveReadModel`), no polling anywhere.

What a client reads (``text/event-stream``)::

    retry: 1000                  once, first: how soon a browser reconnects
    : connected

    id: 42                       the stream sequence of the log item
    event: change
    data: {"seq":42,"kind":"task","id":"acme_calc-1"}     kind: task | agent | bad

    id: 57
    event: resync                "refetch what you show": the client missed items
    data: {"seq":57,"reason":"behind"}                    behind | ahead | unknown | dropped

    : keep-alive                 after ``keepalive`` seconds without anything else

Resume. The client says where it is with ``Last-Event-ID`` (what a browser's
EventSource sends when it reconnects) or, on a first connection, ``?since=<seq>`` (the
page's ``ccc-last-seq``: the log position it was rendered at); the header wins. A
client behind the projection (it missed items while away: the API restarted, the
network dropped) is told to ``resync`` at once rather than replayed item by item:
one refetch of its fragments shows the state after everything it missed. A client
*ahead* of the projection (the log it saw is not this one) or with an unreadable
position resyncs too. Without a position, the stream starts at the present.

Back-pressure. The observer runs inside the projection's fold: it must never wait. Each
client has a bounded buffer of pending changes; one that fills it (its socket is not
draining) loses them and is sent one ``resync`` once it drains again. A slow client
costs the projection one list append per item, never a stall.

Shutdown. uvicorn waits for open responses before it stops (up to its graceful
timeout), and an event stream never ends by itself: the server's owner calls
:func:`close_live_streams` (or :meth:`LiveStreams.close`) first, which ends every
stream at once (browsers reconnect after ``retry``). A closed hub answers any late
stream request with an empty stream, so nothing new holds the shutdown up.

Wiring (the server builds one hub per app it serves)::

    route_handlers=[*live_handlers(live)]    # GET /ui/stream, read scope like every GET
    ...
    close_live_streams(live)                 # before stopping the HTTP server
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import structlog
from litestar import Request, get
from litestar.response import Response, Stream

from events.agent import AgentEventBase
from events.codec import BadMessage
from events.task import TaskEventBase
from projections.live import LiveReadModel

log = structlog.get_logger("ccc.api.live")

STREAM_PATH = "/ui/stream"
KEEPALIVE_FRAME = b": keep-alive\n\n"


@dataclass(frozen=True, kw_only=True)
class StreamSettings:
    """``queue_size``: pending changes a client may fall behind by before it is told to
    resync; ``keepalive``: seconds of silence before a comment (proxies and browsers
    drop idle connections); ``retry_ms``: the browser's reconnect delay; ``max_clients``:
    open streams per hub (beyond: 503, the browser's script backs off)."""

    queue_size: int = 512
    keepalive: float = 15.0
    retry_ms: int = 1000
    max_clients: int = 1000

    def __post_init__(self) -> None:
        if self.queue_size < 1 or self.keepalive <= 0 or self.retry_ms < 0 or self.max_clients < 1:
            raise ValueError(f"invalid stream settings: {self}")


class Change(msgspec.Struct, frozen=True):
    """One log item as the dashboard hears of it."""

    seq: int
    kind: str  # task | agent | bad
    id: str  # the aggregate's id ("" for a bad message on no aggregate)


class Resync(msgspec.Struct, frozen=True):
    seq: int
    reason: str


_encode = msgspec.json.Encoder().encode


def sse_frame(event: str, seq: int, payload: msgspec.Struct) -> bytes:
    """One event of the stream. JSON has no raw line breaks, so ``data`` is one line."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event.encode(), _encode(payload))


def change_of(seq: int, item: object, model_bad_seq: int | None = None) -> Change:
    """What a log item is to the dashboard. ``model_bad_seq``: the sequence of the last
    item the read model rejected (an event its state machine refused is bad too)."""
    if isinstance(item, BadMessage):
        parts = item.subject.split(".", 3)  # <prefix>.<task|agent>.<id>.<type>
        aggregate = parts[2] if len(parts) >= 3 and parts[1] in ("task", "agent") else ""
        return Change(seq, "bad", aggregate)
    if isinstance(item, TaskEventBase):
        return Change(seq, "bad" if model_bad_seq == seq else "task", item.task_id)
    if isinstance(item, AgentEventBase):
        return Change(seq, "bad" if model_bad_seq == seq else "agent", item.agent_id)
    return Change(seq, "bad", "")


class StreamClient:
    """One open stream: what it has been sent up to (``since``) and what is pending.
    Touched only from the event loop's thread (the observer and the stream's own
    generator), so no locks; every method is synchronous, so none interleaves."""

    __slots__ = ("closing", "dropped", "limit", "pending", "since", "wake")

    def __init__(self, since: int, limit: int) -> None:
        self.since = since
        self.limit = limit
        self.pending: list[bytes] = []
        self.dropped = False  # its buffer overflowed: it gets one resync, then changes again
        self.closing = False
        self.wake = asyncio.Event()

    def offer(self, seq: int, frame: bytes) -> None:
        if seq <= self.since or self.dropped or self.closing:
            return
        if len(self.pending) >= self.limit:
            self.pending.clear()  # stale anyway: the resync covers all of them
            self.dropped = True
        else:
            self.pending.append(frame)
            self.since = seq
        self.wake.set()

    def close(self) -> None:
        self.closing = True
        self.wake.set()


class LiveStreams:
    """The hub: one observer on ``live`` fanning changes out to every open stream.
    Build it (or :func:`live_handlers`) once per served app; :meth:`close` is final."""

    def __init__(self, live: LiveReadModel, settings: StreamSettings | None = None) -> None:
        self.live = live
        self.settings = settings or StreamSettings()
        self.clients: set[StreamClient] = set()
        self.closed = False
        self.resyncs = 0  # resyncs sent, for tests and logs
        live.observers.append(self.observe)

    # -- the projection's side (never waits, never raises) ----------------------------------
    def observe(self, seq: int, item: object) -> None:
        if not self.clients:
            return
        try:
            bad = self.live.model.bad
            change = change_of(seq, item, bad[-1].seq if bad else None)
            frame = sse_frame("change", seq, change)
            for client in self.clients:
                client.offer(seq, frame)
        except Exception:  # an observer that raised would stop the projection: never
            log.exception("live.observe_failed", seq=seq)

    # -- the HTTP side ---------------------------------------------------------------------
    def open(self, last_event_id: str | None, since: str | None) -> Response:
        """The response of one ``GET /ui/stream``."""
        if len(self.clients) >= self.settings.max_clients and not self.closed:
            return Response({"error": "service_unavailable", "detail": "too many open event streams"},
                            status_code=503, headers={"Retry-After": "5"})
        return Stream(self._frames(last_event_id, since), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"})

    async def _frames(self, last_event_id: str | None, since: str | None) -> AsyncIterator[bytes]:
        preamble = b"retry: %d\n: connected\n\n" % self.settings.retry_ms
        if self.closed:  # the server is stopping: an empty stream (the browser comes back later)
            yield preamble
            return
        # The client joins the fan-out here, when the response streams, not before: one
        # whose response never starts is never registered. From the position read to the
        # registration nothing awaits, so no item slips between them.
        now = self.live.model.last_seq
        client = StreamClient(now, self.settings.queue_size)
        first = [preamble]
        reason = behind(resume_point(last_event_id, since), now)
        if reason is not None:
            first.append(sse_frame("resync", now, Resync(now, reason)))
            self.resyncs += 1
        self.clients.add(client)
        try:
            yield b"".join(first)
            while True:
                if not (client.pending or client.dropped or client.closing):
                    client.wake.clear()
                    try:
                        async with asyncio.timeout(self.settings.keepalive):
                            await client.wake.wait()
                    except TimeoutError:
                        yield KEEPALIVE_FRAME
                        continue
                if client.closing:
                    return
                if client.dropped:
                    now = client.since = self.live.model.last_seq
                    client.dropped = False
                    self.resyncs += 1
                    log.info("live.client_resync", seq=now, reason="dropped")
                    yield sse_frame("resync", now, Resync(now, "dropped"))
                    continue
                batch, client.pending = client.pending, []
                yield b"".join(batch)
        finally:  # the client left (Litestar cancels the stream on disconnect) or we closed it
            self.clients.discard(client)

    def close(self) -> None:
        """End every open stream now and refuse new ones (idempotent, synchronous)."""
        if self.closed:
            return
        self.closed = True
        if self.observe in self.live.observers:
            self.live.observers.remove(self.observe)
        for client in self.clients:
            client.close()


def resume_point(last_event_id: str | None, since: str | None) -> int | None | str:
    """The sequence a client says it has seen: ``Last-Event-ID`` before ``?since=``;
    None if it says nothing; ``"unknown"`` if what it says is not a sequence."""
    raw = last_event_id if last_event_id not in (None, "") else since
    if raw is None or raw == "":
        return None
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else "unknown"


def behind(point: int | None | str, now: int) -> str | None:
    """Why a client at ``point`` must resync with a projection at ``now``, or None."""
    if point is None:
        return None
    if isinstance(point, str):
        return point
    if point < now:
        return "behind"
    if point > now:
        return "ahead"
    return None


def live_handlers(live: LiveReadModel, settings: StreamSettings | None = None) -> list:
    """``GET /ui/stream`` over ``live`` (a new :class:`LiveStreams` hub): the route
    handlers to serve beside the dashboard's pages. A GET: the read scope, like the
    pages; behind the same gate."""
    hub = LiveStreams(live, settings)

    @get(STREAM_PATH, name="ui-stream", include_in_schema=False, sync_to_thread=False, cache=False)
    def ui_stream(request: Request) -> Response:
        return hub.open(request.headers.get("last-event-id"), request.query_params.get("since"))

    return [ui_stream]


def live_hubs(live: LiveReadModel) -> list[LiveStreams]:
    """The open hubs observing ``live``."""
    return [hub for observe in live.observers
            if isinstance(hub := getattr(observe, "__self__", None), LiveStreams)]


def close_live_streams(live: LiveReadModel) -> None:
    """End the event streams of every hub on ``live``: call it before stopping the HTTP
    server, so its shutdown does not wait out the graceful timeout on them."""
    for hub in live_hubs(live):
        hub.close()


__all__ = ["STREAM_PATH", "Change", "LiveStreams", "Resync", "StreamClient", "StreamSettings", "behind",
           "change_of", "close_live_streams", "live_handlers", "live_hubs", "resume_point", "sse_frame"]
