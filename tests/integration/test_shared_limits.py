"""Shared rate limits (issue 14, part 2) on a real nats-server, through the real
``anthropic`` SDK against the local Messages API server: one agent's 429 pauses every
agent with the same API key; the longest pause wins; pauses end by themselves; a NATS
that is gone never blocks a call."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

import anthropic
import msgspec
import pytest
from structlog.testing import capture_logs

from events.errors import ConfigError
from events.subjects import Namespace
from infra.adapters.coders.shared_limits import (
    DEFAULT_PAUSE,
    MAX_CAP,
    Pause,
    SharedPause,
    key_id,
    retry_after,
    shared_limits_http_client,
)
from infra.adapters.nats.connection import connect
from infra.adapters.nats.provisioning import RATE_LIMITS_TTL, provision, rate_limits_bucket
from infra.adapters.nats.server import EmbeddedServer
from tests.conftest import eventually
from tests.fakes.anthropic_api import ApiError, FakeAnthropic, fake_anthropic, reply  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration


def api_key() -> str:
    return "test-key-" + uuid.uuid4().hex  # made at run time: no credential-shaped literal


# -- parsing and naming (no NATS) -------------------------------------------------------
NOW = 1_700_000_000.0


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": " 2.5 "}, 2.5),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # ms first, as the SDK reads them
    ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),   # a bad ms value falls back to seconds
    ({"retry-after": format_datetime(datetime.fromtimestamp(NOW + 7, UTC), usegmt=True)}, 7.0),
    ({"retry-after": format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True)}, 0.0),
    ({"retry-after": "3600"}, 60.0),  # capped
    ({}, DEFAULT_PAUSE),
    ({"retry-after": ""}, DEFAULT_PAUSE),
    ({"retry-after": "soon"}, DEFAULT_PAUSE),
    ({"retry-after": "-5"}, DEFAULT_PAUSE),
    ({"retry-after": "nan"}, DEFAULT_PAUSE),
    ({"retry-after": "inf"}, DEFAULT_PAUSE),
    ({"retry-after": "1e400"}, DEFAULT_PAUSE),
    ({"retry-after": "Wed, 99 Foo 2015 07:28:00 GMT"}, DEFAULT_PAUSE),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00"}, DEFAULT_PAUSE),  # no zone: not an HTTP date
])
def test_retry_after_values_good_and_bad(headers, expected) -> None:
    assert retry_after(headers, now=NOW, cap=60.0) == pytest.approx(expected, abs=1e-6)


def test_the_bucket_key_is_a_hash_of_the_api_key_never_the_key() -> None:
    key = api_key()
    assert key_id(key) == key_id(f" {key} ") and key_id(key) != key_id(api_key())
    assert key not in key_id(key) and key[9:] not in key_id(key) and len(key_id(key)) == 33
    for bad in ("", "  ", None):
        with pytest.raises(ConfigError, match="API key"):
            key_id(bad)  # type: ignore[arg-type]


def test_bad_options_are_refused_clearly(nc, ns) -> None:
    for options, what in (({"cap": 0}, "cap"), ({"cap": MAX_CAP + 1}, "cap"), ({"cap": math.nan}, "cap"),
                          ({"default": -1}, "default"), ({"default": 61}, "default"),
                          ({"timeout": 0}, "timeout")):
        with pytest.raises(ConfigError, match=what):
            SharedPause(nc, ns, api_key(), **options)


# -- a dozen agents against one rate-limited key ------------------------------------------
class RateLimitedApi:
    """The local Messages API with a rate limit: the first request starts a pause of
    ``pause`` seconds; every request during it gets a 429 with the seconds left as
    ``retry-after``; after it, replies. Records when each client's requests arrived."""

    def __init__(self, fake: FakeAnthropic, pause: float, requests: int) -> None:
        self.pause, self.lock = pause, threading.Lock()
        self.start: float | None = None  # monotonic: the first 429
        self.seen: list[tuple[float, str, int]] = []  # (arrival, client, status)
        fake.add(*([self.respond] * requests))

    @property
    def end(self) -> float:
        assert self.start is not None
        return self.start + self.pause

    def respond(self, body: dict):
        now, client = time.monotonic(), body["messages"][0]["content"]
        with self.lock:
            if self.start is None:
                self.start = now
            if now < self.start + self.pause:
                self.seen.append((now, client, 429))
                left = self.start + self.pause - now
                return ApiError(429, "rate_limit_error", "slow down", {"retry-after": str(math.ceil(left))})
            self.seen.append((now, client, 200))
        return reply(f"ok {client}")


async def call(client: anthropic.AsyncAnthropic, name: str) -> str:
    response = await client.messages.create(model="claude-test", max_tokens=16,
                                            messages=[{"role": "user", "content": name}])
    return response.content[0].text


async def test_one_agents_429_pauses_a_dozen_agents_and_they_all_proceed_after_it(
        nats_url, admin_kit, nc, ns, fake_anthropic) -> None:  # noqa: F811
    fake, url = fake_anthropic
    await provision(nc, ns)
    key, pause = api_key(), 2.0
    api = RateLimitedApi(fake, pause, requests=100)
    conns, clients, http = [], [], []
    try:
        for i in range(12):  # a dozen agents: each its own NATS connection, http client and SDK client
            conn = await connect(nats_url, name=f"test-agent-{i}", kit=admin_kit)
            conns.append(conn)
            h = shared_limits_http_client(conn, ns, key, name=f"agent-{i}")
            http.append(h)
            clients.append(anthropic.AsyncAnthropic(api_key=key, base_url=url, http_client=h, max_retries=6))
        await asyncio.gather(*(h.shared_pause.start() for h in http))

        # six agents call at once: the first request is told to wait, the others are in flight
        burst = [asyncio.create_task(call(clients[i], f"client-{i}")) for i in range(6)]
        await eventually(lambda: api.start is not None, timeout=10)
        # every agent learns the pause through the bucket, even those that never called
        await eventually(lambda: all(h.shared_pause.remaining() > 0 for h in http), timeout=5)
        late = [asyncio.create_task(call(clients[i], f"client-{i}")) for i in range(6, 12)]
        results = await asyncio.wait_for(asyncio.gather(*burst, *late), timeout=30)
    finally:
        for c in clients:
            await c.close()
        for h in http:
            await h.aclose()
        for conn in conns:
            await conn.close()

    assert results == [f"ok client-{i}" for i in range(12)]  # after the pause they all proceed
    during = [(t, c) for t, c, _ in api.seen if t < api.end]
    by_client = {c: sum(1 for _, x in during if x == c) for _, c in during}
    # during the pause: at most the one request each burst agent already had in flight
    assert len(during) <= 6 and all(n == 1 for n in by_client.values()), api.seen
    assert set(by_client) <= {f"client-{i}" for i in range(6)}, "an agent that knew of the pause called"
    late_arrivals = [t for t, c, _ in api.seen if int(c.split("-")[1]) >= 6]
    assert len(late_arrivals) == 6 and min(late_arrivals) >= api.end, "late agents waited the pause out"
    assert [s for _, c, s in api.seen if s == 429 and int(c.split("-")[1]) >= 6] == []
    assert len(api.seen) <= 6 * 2 + 6  # nobody hammered: one 429 at most, then one success
    shared = sum(h.shared_pause.shared for h in http)
    assert shared >= 1 and all(h.shared_pause.unshared == 0 for h in http)


async def test_the_longest_pause_wins_the_compare_and_set(nats_url, admin_kit, nc, ns) -> None:
    await provision(nc, ns)
    key = api_key()
    conns = [await connect(nats_url, name=f"test-cas-{i}", kit=admin_kit) for i in range(8)]
    pauses = [SharedPause(c, ns, key, name=f"a{i}", cap=50) for i, c in enumerate(conns)]
    try:
        # eight agents report different pauses at the same moment, longest in the middle
        seconds = [3, 7, 1, 40, 12, 5, 2, 9]
        t0 = time.time()
        await asyncio.gather(*(p.record(429, {"retry-after": str(s)}) for p, s in zip(pauses, seconds)))
        kv = await nc.jetstream().key_value(rate_limits_bucket(ns))
        entry = await kv.get(key_id(key))
        stored = msgspec.json.decode(entry.value, type=Pause)
        assert stored.retry_after == 40 and t0 + 40 <= stored.until <= time.time() + 40
        # a shorter pause later does not shorten it; everyone waits for the longest
        assert await pauses[0].record(529, {"retry-after": "1"}) == 1
        assert (await kv.get(key_id(key))).revision == entry.revision
        for p in pauses:
            await p.start()
        await eventually(lambda: all(p.remaining() > 35 for p in pauses), timeout=5)
        # nothing in the bucket names the key
        keys = await kv.keys()
        assert keys == [key_id(key)] and key.encode() not in entry.value and key not in keys[0]
    finally:
        for p in pauses:
            await p.close()
        for c in conns:
            await c.close()


async def test_a_pause_ends_by_itself_and_no_value_holds_an_agent_longer_than_its_cap(nc, ns) -> None:
    await provision(nc, ns)
    kv = await nc.jetstream().key_value(rate_limits_bucket(ns))
    assert (await kv.status()).ttl == pytest.approx(RATE_LIMITS_TTL)  # entries expire too
    key = api_key()
    writer, reader = SharedPause(nc, ns, key, name="w"), SharedPause(nc, ns, key, name="r", cap=1.0)
    try:
        await writer.record(429, {"retry-after": "0.5"})
        t0 = time.monotonic()
        await reader.wait()  # learns the pause when it starts watching, waits it out
        assert 0.2 < time.monotonic() - t0 < 2.0
        fresh = SharedPause(nc, ns, key, name="later")
        await fresh.start()
        assert fresh.remaining() == 0 and await fresh.wait() < 0.1  # past: nobody waits
        await fresh.close()

        # a deadline far off (a skewed clock, a bad writer) holds a reader for its cap only
        far = Pause(until=time.time() + 100_000, retry_after=100_000, status=429, set_at=time.time())
        await kv.put(key_id(key), msgspec.json.encode(far))
        await eventually(lambda: reader.remaining() > 0, timeout=5)
        assert reader.remaining() <= 1.0
        t0 = time.monotonic()
        await asyncio.wait_for(reader.wait(), timeout=5)
        assert time.monotonic() - t0 < 1.5

        # junk in the bucket is ignored (and a log line says so), then overwritten
        with capture_logs() as logs:
            await kv.put(key_id(key), b"not a pause")
            await asyncio.sleep(0.2)
            assert await writer.record(429, {"retry-after": "0.3"}) == pytest.approx(0.3)
        assert any(e["event"] == "rate_limit.bad_entry" for e in logs)
        got = msgspec.json.decode((await kv.get(key_id(key))).value, type=Pause)
        assert got.retry_after == pytest.approx(0.3)
        # any other status pauses nobody
        assert await writer.record(500, {"retry-after": "30"}) == 0 and await writer.record(200, {}) == 0
    finally:
        await writer.close()
        await reader.close()


async def test_a_missing_bucket_or_a_lost_nats_never_blocks_a_call(tmp_path, fake_anthropic) -> None:  # noqa: F811
    fake, url = fake_anthropic
    server = EmbeddedServer(tmp_path)
    server.start()
    conn = await connect(server.url, name="test-lost-nats", connect_timeout=2.0)
    key = api_key()
    fake.add(ApiError(429, "rate_limit_error", "slow down", {"retry-after": "1"}), reply("after"),
             ApiError(429, "rate_limit_error", "slow down", {"retry-after": "1"}), reply("after again"),
             reply("fresh"))
    try:
        ns = Namespace("t" + uuid.uuid4().hex[:10])
        # not provisioned: the bucket is missing; calls go on, the pause is kept locally
        h = shared_limits_http_client(conn, ns, key, name="unprovisioned", timeout=0.5)
        client = anthropic.AsyncAnthropic(api_key=key, base_url=url, http_client=h, max_retries=2)
        with capture_logs() as logs:
            t0 = time.monotonic()
            assert await asyncio.wait_for(call(client, "x"), timeout=10) == "after"
        assert 0.9 < time.monotonic() - t0 < 5 and h.shared_pause.unshared == 1
        assert any(e["event"] == "rate_limit.not_shared" and "missing" in e["error"] for e in logs)
        await client.close()

        await provision(conn, ns)
        h = shared_limits_http_client(conn, ns, key, name="lost", timeout=0.5)
        client = anthropic.AsyncAnthropic(api_key=key, base_url=url, http_client=h, max_retries=2)
        await h.shared_pause.start()
        server.kill()  # NATS gone: the connection is reconnecting, every request on it times out
        with capture_logs() as logs:
            t0 = time.monotonic()
            assert await asyncio.wait_for(call(client, "y"), timeout=10) == "after again"
            took = time.monotonic() - t0
            # a new agent starting while NATS is away is not held either
            h2 = shared_limits_http_client(conn, ns, key, name="new", timeout=0.5)
            client2 = anthropic.AsyncAnthropic(api_key=key, base_url=url, http_client=h2, max_retries=0)
            t1 = time.monotonic()
            assert await asyncio.wait_for(call(client2, "z"), timeout=10) == "fresh"
            assert time.monotonic() - t1 < 2.0
        assert 0.9 < took < 5 and h.shared_pause.unshared == 1
        assert any(e["event"] == "rate_limit.not_shared" for e in logs)
        assert any(e["event"] == "rate_limit.watch_not_ready" for e in logs)
        await client.close()
        await client2.close()
    finally:
        with contextlib.suppress(OSError):  # its server may be gone: closing flushes into nothing
            await conn.close()
        server.stop()
