"""The dashboard's live stream (``GET /ui/stream``) over real HTTP: an ApiServer under
uvicorn over a real nats-server, read by httpx as a browser's EventSource would
(and, for the slow client, by a raw socket that stops reading).

What it proves: an appended event reaches an open stream within one second, with its
stream sequence as the event id; a client resumes from ``Last-Event-ID`` /
``?since=`` (and is told to resync when it missed anything, across an API restart
too); a client that stops reading is told to resync once it reads again, while the
projection and the other clients go on at full speed; streams end when they should
(client gone, server stopping: promptly, not after uvicorn's graceful timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest
import pytest_asyncio

from events import agent_state, task_state
from events.agent_state import RegisterAgent
from events.store import EventStore
from events.task import IssueRef
from events.task_state import CreateTask
from infra.adapters.http.auth import ApiAccess, ApiTokens
from infra.adapters.http.dashboard.live import (
    LiveStreams,
    behind,
    close_live_streams,
    live_hubs,
    resume_point,
)
from infra.adapters.http.service import SHUTDOWN_TIMEOUT
from infra.adapters.http.status_server import ApiServer
from projections.live import LiveReadModel
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
LIVE_WITHIN = 1.0  # the issue: an update within one second of the event


# -- the cluster side ---------------------------------------------------------------------------
def created(task_id: str, n: int = 1) -> list:
    issue = IssueRef(source="local", repo="acme/shop", number=n, title=f"issue {task_id}")
    return task_state.decide(None, CreateTask(at=T0 + timedelta(seconds=n), actor="coordinator",
                                              task_id=task_id, issue=issue))


async def create_task(store: EventStore, task_id: str) -> int:
    return (await store.append(created(task_id), expected_last_seq=0))[-1]


async def register_agent(store: EventStore, agent_id: str) -> int:
    events = agent_state.decide(None, RegisterAgent(at=T0, actor=agent_id, agent_id=agent_id,
                                                    specialties=("backend",)))
    return (await store.append(events, expected_last_seq=0))[-1]


async def serve(store: EventStore, port: int = 0, **kwargs) -> ApiServer:
    """An ApiServer as ``ccc api`` runs one: over its own projection (caught up when
    ``start`` returns), with the dashboard and its ``/ui/stream``."""
    server = ApiServer(store, "127.0.0.1", port, materialize=False, **kwargs)
    await server.start()
    return server


def hub_of(live: LiveReadModel) -> LiveStreams:
    hubs = live_hubs(live)
    assert len(hubs) == 1, hubs
    return hubs[0]


@pytest_asyncio.fixture
async def api(store) -> AsyncIterator[ApiServer]:
    server = await serve(store)
    yield server
    await server.stop()


@pytest.fixture
def live(api) -> LiveReadModel:
    return api.live


# -- the browser side: an EventSource, as httpx sees it ------------------------------------------
@dataclass
class Sse:
    id: str | None
    event: str
    data: dict

    @property
    def seq(self) -> int:
        assert self.id is not None and self.id == str(self.data["seq"]), self
        return int(self.id)


class Ended(Exception):
    """The server ended the stream."""


@dataclass
class SseReader:
    """Parses ``text/event-stream`` as the HTML standard says (fields, comments, blank
    line dispatches), keeping what a browser keeps: the last event id and ``retry``."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str | None = None

    def __post_init__(self) -> None:
        self._lines = self.response.aiter_lines()

    async def _block(self) -> dict[str, str] | None:
        """The fields of the next block (None: the stream ended)."""
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                fields.setdefault("", "")  # a comment-only block
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "retry" and value.isdigit():
                self.retry = int(value)
            elif name == "id":
                self.last_event_id = value
            fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
        return None

    async def next(self, timeout: float = 5.0) -> Sse:
        """The next dispatched event (blocks of comments or ``retry`` alone dispatch nothing)."""
        async with asyncio.timeout(timeout):
            while True:
                fields = await self._block()
                if fields is None:
                    raise Ended
                if "data" in fields:
                    return Sse(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))

    async def connected(self, timeout: float = 5.0) -> None:
        """Until the preamble is read: from then on the server has this client."""
        async with asyncio.timeout(timeout):
            while "connected" not in self.comments:
                if await self._block() is None:
                    raise Ended

    async def ended(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while await self._block() is not None:
                pass


@contextlib.asynccontextmanager
async def stream(http: httpx.AsyncClient, *, last_event_id: str | None = None, since: str | None = None,
                 headers: dict[str, str] | None = None) -> AsyncIterator[SseReader]:
    h = {"Accept": "text/event-stream", **(headers or {})}
    if last_event_id is not None:
        h["Last-Event-ID"] = last_event_id
    params = {"since": since} if since is not None else {}
    async with http.stream("GET", "/ui/stream", headers=h, params=params) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "no-cache" in response.headers["cache-control"]
        reader = SseReader(response)
        await reader.connected()
        yield reader


# -- pure parts -------------------------------------------------------------------------------------
def test_where_a_client_resumes_from():
    assert resume_point(None, None) is None and resume_point("", None) is None
    assert resume_point("12", "3") == 12  # the browser's Last-Event-ID wins over the page's since
    assert resume_point("", "3") == 3 and resume_point(None, " 7 ") == 7
    for junk in ("abc", "-1", "1e3", "٣", "9" * 40):
        assert resume_point(junk, None) == "unknown", junk
    assert [behind(p, 10) for p in (None, 10, 4, 11, "unknown")] == [None, None, "behind", "ahead", "unknown"]


# -- over real HTTP -------------------------------------------------------------------------------
async def test_an_appended_event_arrives_within_a_second_with_its_seq(nc, ns, store, live, api):
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http, stream(http) as sse:
        assert sse.retry == 1000  # a browser comes back a second after the stream drops

        start = time.monotonic()
        seq = await create_task(store, "lv-1")
        got = await sse.next(timeout=LIVE_WITHIN)
        assert time.monotonic() - start < LIVE_WITHIN
        assert (got.event, got.seq, got.data) == ("change", seq, {"seq": seq, "kind": "task", "id": "lv-1"})
        assert sse.last_event_id == str(seq)  # what the browser sends back when it reconnects

        seq = await register_agent(store, "agent-lv")
        got = await sse.next(timeout=LIVE_WITHIN)
        assert (got.event, got.seq, got.data["kind"], got.data["id"]) == ("change", seq, "agent", "agent-lv")

        # what the projection cannot apply is announced too (the overview counts bad events):
        # junk on a task's subject, and an event its state machine refuses (a second "created")
        junk = (await nc.jetstream().publish(ns.subject("task.lv-1.exploded"), b"not json")).seq
        got = await sse.next(timeout=LIVE_WITHIN)
        assert (got.seq, got.data["kind"], got.data["id"]) == (junk, "bad", "lv-1")
        again = msgspec.structs.replace(created("lv-1")[0], event_id="lv-1:again")  # (not a duplicate)
        refused = (await store.append([again], expected_last_seq=None))[-1]
        got = await sse.next(timeout=LIVE_WITHIN)
        assert (got.seq, got.data["kind"], got.data["id"]) == (refused, "bad", "lv-1")

        # several at once: each in order, none lost, none twice
        seqs = [await create_task(store, f"lv-burst-{i}") for i in range(20)]
        assert [(await sse.next(timeout=LIVE_WITHIN)).seq for _ in seqs] == seqs
        assert live.model.last_seq == seqs[-1]


async def test_resume_from_last_event_id(store, live, api):
    first = await create_task(store, "rs-1")
    last = await create_task(store, "rs-2")
    await live.wait_for_seq(last)
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http:
        # behind: told at once to resync, at the projection's position
        async with stream(http, last_event_id=str(first)) as sse:
            got = await sse.next(timeout=LIVE_WITHIN)
            assert (got.event, got.seq, got.data["reason"]) == ("resync", last, "behind")
            nxt = await create_task(store, "rs-3")
            assert (await sse.next()).seq == nxt  # and then live, from there
        last = nxt

        # up to date: nothing to catch up on, the next event is the next change
        async with stream(http, last_event_id=str(last)) as sse:
            nxt = await create_task(store, "rs-4")
            got = await sse.next()
            assert (got.event, got.seq) == ("change", nxt)
        last = nxt

        # the header (the browser's reconnect) wins over ?since (the page's first position)
        async with stream(http, last_event_id=str(last), since=str(first)) as sse:
            nxt = await create_task(store, "rs-5")
            assert ((got := await sse.next()).event, got.seq) == ("change", nxt)
        last = nxt
        async with stream(http, since=str(first)) as sse:
            got = await sse.next()
            assert (got.event, got.seq, got.data["reason"]) == ("resync", last, "behind")

        # ahead of this log (another cluster's page, a log reset), or nonsense: resync
        for position, reason in ((str(last + 1000), "ahead"), ("banana", "unknown")):
            async with stream(http, last_event_id=position) as sse:
                got = await sse.next()
                assert (got.event, got.seq, got.data["reason"]) == ("resync", last, reason)

        # no position at all: from now on
        async with stream(http) as sse:
            nxt = await create_task(store, "rs-6")
            assert ((got := await sse.next()).event, got.seq) == ("change", nxt)


async def test_resume_after_the_api_restarts(store):
    server = await serve(store)
    port = server.port
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http, stream(http) as sse:
            seen = await create_task(store, "rr-1")
            assert (await sse.next()).seq == seen
            await server.stop()
            with pytest.raises(Ended):  # the stream ends with the server
                await sse.next(timeout=SHUTDOWN_TIMEOUT + 2)
            last_id = sse.last_event_id
        assert last_id == str(seen)
        missed = [await create_task(store, f"rr-{n}") for n in (2, 3)]  # nobody serves the page now
        server = await serve(store, port)  # back on the same address, its projection rebuilt
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http, \
                stream(http, last_event_id=last_id) as sse:
            got = await sse.next(timeout=LIVE_WITHIN)
            assert (got.event, got.seq, got.data["reason"]) == ("resync", missed[-1], "behind")
            nxt = await create_task(store, "rr-4")
            assert (await sse.next(timeout=LIVE_WITHIN)).seq == nxt
    finally:
        await server.stop()


# -- a slow client ---------------------------------------------------------------------------------
class RawClient:
    """An HTTP client that reads only when told, over a connection with small buffers
    at both ends: a browser tab on a stalled network. (Without them the kernel would
    absorb megabytes of events first: the test would only take longer.)"""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: no autotuning
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
                                      "\r\n".encode())
        return cls(sock)

    async def read_until(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while (m := pattern.search(self.data)) is None:
                chunk = await loop.sock_recv(self.sock, 1 << 16)
                if not chunk:
                    raise Ended(bytes(self.data[-500:]))
                self.data += chunk
        return m

    def shrink_server_side(self) -> None:
        """A small send buffer on the server's end of this connection (it is this
        process's own socket: the server runs in the test's event loop)."""
        peer = self.sock.getsockname()
        for name in os.listdir("/proc/self/fd"):
            try:
                other = socket.socket(fileno=os.dup(int(name)))
            except OSError:
                continue  # not a socket
            with other:  # closes the duplicate only
                try:
                    if other.type == socket.SOCK_STREAM and other.getpeername() == peer:
                        other.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                        return
                except OSError:
                    continue
        raise AssertionError(f"no server-side socket connected to {peer}")

    def close(self) -> None:
        self.sock.close()


RESYNC = re.compile(rb'id: (\d+)\nevent: resync\ndata: (\{[^\n]*"reason":"dropped"[^\n]*\})\n\n')


async def test_a_slow_client_is_told_to_resync_and_stalls_nothing(store, live, api):
    """One client stops reading; the server's writes to it back up, its buffer of
    pending changes overflows and is dropped. Meanwhile the projection and a reading
    client keep up with every event; when the slow one reads again it gets one resync
    (at the position it must refetch from), then changes again."""
    hub = hub_of(live)
    batch_size = 200  # well under the buffer (512): a client that reads keeps up with a batch
    assert hub.settings.queue_size > batch_size
    slow = await RawClient.open("127.0.0.1", api.port, "/ui/stream")
    fast_seqs: list[int] = []
    fast_events: list[str] = []
    try:
        await slow.read_until(re.compile(rb": connected\n\n"), 5)
        slow.shrink_server_side()
        async with httpx.AsyncClient(base_url=api.url, timeout=5) as http, stream(http) as fast:
            async def follow() -> None:
                while True:
                    got = await fast.next(timeout=30)
                    fast_events.append(got.event)
                    fast_seqs.append(got.seq)
            reader = asyncio.create_task(follow())
            appended: list[int] = []
            long_id = "slow-" + "x" * 100  # larger frames: the socket backs up sooner
            batch = 0
            while not any(c.dropped for c in hub.clients):
                assert batch < 40, "the slow client's buffer never overflowed"
                events = [(e, None) for i in range(batch_size) for e in created(f"{long_id}-{batch}-{i}", 1)]
                results = await store.append_many(events)
                assert all(isinstance(r, int) for r in results), results
                appended += results
                batch += 1
                # nobody waits on the slow client: the projection and the fast client keep up
                start = time.monotonic()
                await live.wait_for_seq(appended[-1], timeout=LIVE_WITHIN)
                await eventually(lambda last=appended[-1]: fast_seqs and fast_seqs[-1] == last,
                                 timeout=LIVE_WITHIN)
                assert time.monotonic() - start < LIVE_WITHIN
            assert fast_seqs == appended and set(fast_events) == {"change"}  # every one, in order, no resync
            assert len(hub.clients) == 2

            # the slow client reads again: after what was already in flight, one resync
            # at the position it missed from; then live changes again
            m = await slow.read_until(RESYNC, 20)
            assert int(m.group(1)) == appended[-1] == json.loads(m.group(2))["seq"]
            assert slow.data.count(b"event: resync") == 1
            nxt = await create_task(store, "slow-after")
            await slow.read_until(re.compile(rb"id: %d\nevent: change\n" % nxt), 5)
            await eventually(lambda: fast_seqs[-1] == nxt, timeout=LIVE_WITHIN)
            print(f"slow client dropped after {len(appended)} events ({batch} batches)")
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        slow.close()
    await eventually(lambda: not hub.clients, timeout=5)  # both gone: nothing kept


# -- ends of streams ---------------------------------------------------------------------------------
async def test_a_client_that_leaves_is_forgotten(store, live, api):
    hub = hub_of(live)
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http:
        async with stream(http):
            async with stream(http):
                assert len(hub.clients) == 2
            await eventually(lambda: len(hub.clients) == 1, timeout=5)
        await eventually(lambda: not hub.clients, timeout=5)
        assert hub.observe in live.observers  # the hub stays for the next client
        async with stream(http) as sse:
            seq = await create_task(store, "gone-1")
            assert (await sse.next()).seq == seq


async def test_keep_alive_comments_while_nothing_happens(store, live, api):
    hub = hub_of(live)
    hub.settings = replace(hub.settings, keepalive=0.2)
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http, stream(http) as sse:
        async with asyncio.timeout(3):
            while sse.comments.count("keep-alive") < 2:
                assert await sse._block() is not None
        seq = await create_task(store, "ka-1")  # and events still come through
        assert (await sse.next()).seq == seq


async def test_too_many_streams_are_refused(store, live, api):
    hub = hub_of(live)
    hub.settings = replace(hub.settings, max_clients=2)
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http:
        async with stream(http), stream(http):
            r = await http.get("/ui/stream")
            assert r.status_code == 503 and r.headers["retry-after"]
        await eventually(lambda: not hub.clients, timeout=5)
        async with stream(http):
            pass


async def test_stopping_the_server_ends_open_streams_promptly(store):
    """uvicorn waits (up to its graceful timeout) for responses in flight; an event
    stream would hold every stop for that long. The server's stop ends them first."""
    server = await serve(store)
    live = server.live
    hub = hub_of(live)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http, \
                contextlib.AsyncExitStack() as streams:
            readers = [await streams.enter_async_context(stream(http)) for _ in range(3)]
            assert len(hub.clients) == 3
            start = time.monotonic()
            await server.stop()
            took = time.monotonic() - start
            assert took < 1.5, f"stop took {took:.2f} s with open streams (graceful timeout {SHUTDOWN_TIMEOUT} s)"
            for sse in readers:
                await sse.ended(timeout=2)
        assert not hub.clients and hub.closed and hub.observe not in live.observers
    finally:
        await server.stop()


async def test_a_closed_hub_answers_with_an_empty_stream(store, live, api):
    """Between the streams' close and the listener's, a browser that reconnects gets a
    stream that ends at once (nothing new holds the shutdown up)."""
    hub = hub_of(live)
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http:
        close_live_streams(live)
        close_live_streams(live)  # idempotent
        start = time.monotonic()
        r = await http.get("/ui/stream")
        assert r.status_code == 200 and r.text.startswith("retry: 1000\n")
        assert "event:" not in r.text and time.monotonic() - start < 1.0
        assert hub.closed and not hub.clients


async def test_the_stream_is_behind_the_api_gate(store):
    """A GET like the pages: the read scope. Where a token is required, none is a 401;
    a read token is enough."""
    read = secrets.token_urlsafe(32)
    access = ApiAccess(tokens=ApiTokens.from_plaintext(read=read), require_token=True)
    server = await serve(store, access=access)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            r = await http.get("/ui/stream")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            async with stream(http, headers={"Authorization": f"Bearer {read}"}) as sse:
                seq = await create_task(store, "gate-1")
                assert (await sse.next()).seq == seq
    finally:
        await server.stop()
