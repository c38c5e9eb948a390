"""Shared rate limits: a 429/529 one agent sees pauses every agent using that API key.

Rate limits belong to the API key (the organisation), not to the process: when one agent
is told to back off, a dozen others hammering the same key only earn more 429s. So the
pause is shared through NATS:

- a KV bucket (``<ns>_ratelimits``, :func:`~infra.adapters.nats.provisioning.rate_limits_bucket`)
  holds one entry per API key, keyed by a hash of the key (:func:`key_id`; never the key,
  which must not reach the bus), its value a :class:`Pause` (its deadline, wall clock);
- an agent that gets a 429 or 529 reads ``retry-after-ms`` / ``retry-after`` (seconds or
  an HTTP date; absent or nonsense: :data:`DEFAULT_PAUSE`; capped at ``cap``) and writes
  the pause with compare-and-set, so the longest pause wins whatever the interleaving;
- every agent watches its key's entry and, before each request, waits out the pause it
  knows of. The wait uses only what the process already knows (no I/O on the request
  path), so NATS being down never blocks a call: a pause that cannot be shared is still
  honoured locally and said in a log line (fail open);
- a pause ends by its own deadline; the bucket's entries expire too
  (:data:`~infra.adapters.nats.provisioning.RATE_LIMITS_TTL`), so nothing is cleaned up.

Deadlines are wall-clock times (agents on several hosts: clocks kept by NTP). A deadline
further away than ``cap`` (a skewed clock, a bad value in the bucket) is taken as ``cap``
from when it was read, so no value can hold an agent for longer than ``cap`` at a time.

It hooks into the real ``anthropic`` SDK from outside, as httpx event hooks on the SDK's
own default client (:func:`shared_limits_http_client`): the coder's code is unchanged, the
SDK's timeouts and connection limits stay, proxies from the environment keep working
(a wrapping transport would be bypassed by httpx's proxy mounts), and the SDK still does
its own retries, which then wait for the shared pause like any other request.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

import anthropic
import httpx
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.kv import KeyValue

from events.errors import ConfigError
from events.subjects import Namespace
from infra.adapters.nats.kv_follow import KVFollower
from infra.adapters.nats.provisioning import RATE_LIMITS_TTL, rate_limits_bucket

log = structlog.get_logger("ccc.coders.shared_limits")

PAUSE_STATUSES = frozenset({429, 529})  # rate limited; overloaded
DEFAULT_PAUSE = 5.0  # a 429/529 without a usable retry-after
DEFAULT_CAP = 60.0  # the longest pause taken from one response (the SDK honours ≤ 60 s too)
MAX_CAP = RATE_LIMITS_TTL / 2  # a pause must end well before its entry expires
NATS_TIMEOUT = 1.0  # each bus operation on the request path; then fail open
WATCH_SILENCE = 10.0  # a watch quiet this long is made again (it may have died with a reconnect)
_CAS_ATTEMPTS = 8
_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError)


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a key's entry: every agent with that key waits until ``until``."""

    until: float  # epoch seconds (wall clock)
    retry_after: float  # what the response asked for, after parsing and capping
    status: int  # 429 or 529
    set_at: float  # epoch seconds
    by: str = ""  # who saw it (a process name, for operators reading the bucket)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Pause).decode


def key_id(api_key: str) -> str:
    """The KV key of an API key: a SHA-256 of it (domain-separated, 128 bits shown),
    never the key. Raises :class:`ConfigError` for an empty key."""
    if not isinstance(api_key, str) or not api_key.strip():
        raise ConfigError("shared rate limits need the API key (ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN)")
    digest = hashlib.sha256(b"ccc-rate-limit\x00" + api_key.strip().encode()).hexdigest()
    return f"k{digest[:32]}"


def retry_after(headers: Mapping[str, str], *, now: float | None = None, default: float = DEFAULT_PAUSE,
                cap: float = DEFAULT_CAP) -> float:
    """Seconds to pause for a 429/529 with these response headers: ``retry-after-ms``
    (milliseconds), else ``retry-after`` (delta seconds or an HTTP date). Absent,
    unparseable, negative or non-finite values give ``default``; a date already past gives
    0 (retry now); the result is at most ``cap``."""
    now = time.time() if now is None else now
    seconds: float | None = None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        seconds = _number(raw_ms)
        seconds = None if seconds is None else seconds / 1000.0
    if seconds is None and (raw := headers.get("retry-after")) is not None:
        seconds = _number(raw)
        if seconds is None:
            try:
                date = email.utils.parsedate_to_datetime(raw.strip())
            except (TypeError, ValueError, IndexError, OverflowError):
                date = None
            if date is not None and date.tzinfo is not None:
                seconds = max(0.0, date.timestamp() - now)
    if seconds is None:
        seconds = default
    return min(max(seconds, 0.0), cap)


def _number(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except (AttributeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


class SharedPause:
    """The pause of one API key in one cluster, as this process knows it; shared with
    every other process through the rate-limit bucket.

    ``wait()`` before a request, ``record(response)`` after it. ``start()`` (done by the
    first ``wait``) binds the bucket and starts the watch; ``close()`` stops it."""

    def __init__(self, nc: Client, ns: Namespace, api_key: str, *, cap: float = DEFAULT_CAP,
                 default: float | None = None, timeout: float = NATS_TIMEOUT, name: str = "") -> None:
        if not (0 < cap <= MAX_CAP):
            raise ConfigError(f"shared rate limits: cap {cap!r} s must be in (0, {MAX_CAP:g}]")
        default = min(DEFAULT_PAUSE, cap) if default is None else default
        if not (0 <= default <= cap):
            raise ConfigError(f"shared rate limits: default pause {default!r} s must be in [0, cap={cap:g}]")
        if not (0 < timeout <= 30):
            raise ConfigError(f"shared rate limits: NATS timeout {timeout!r} s must be in (0, 30]")
        self.nc, self.ns, self.key = nc, ns, key_id(api_key)
        self.bucket = rate_limits_bucket(ns)
        self.cap, self.default, self.timeout, self.name = cap, default, timeout, name
        self._until = 0.0  # monotonic deadline this process honours
        self._kv: KeyValue | None = None
        self._follower: KVFollower | None = None  # the watch of the key, once started
        self._start_lock = asyncio.Lock()
        self._closed = False
        self.shared = 0  # pauses this process wrote to the bucket (won the compare-and-set)
        self.unshared = 0  # pauses it could not write (NATS down): honoured locally only

    # -- the request path ---------------------------------------------------------------
    def remaining(self) -> float:
        """Seconds left of the pause this process knows of."""
        return max(0.0, self._until - time.monotonic())

    async def wait(self) -> float:
        """Wait out the pause (extended while waiting if another agent extends it);
        returns the seconds waited. Never waits on NATS for longer than ``timeout``."""
        await self.start()
        waited, t0 = False, time.monotonic()
        while (left := self.remaining()) > 0:
            if not waited:
                log.info("rate_limit.waiting", key=self.key, seconds=round(left, 3), agent=self.name)
                waited = True
            await asyncio.sleep(left)
        return time.monotonic() - t0

    async def record(self, status: int, headers: Mapping[str, str]) -> float:
        """Take a response: a 429/529 pauses this process at once and every process with
        the key as soon as the write lands (compare-and-set: the longest pause wins).
        Returns the pause taken (0 for any other status)."""
        if status not in PAUSE_STATUSES:
            return 0.0
        seconds = retry_after(headers, default=self.default, cap=self.cap)
        if seconds <= 0:
            return 0.0
        now = time.time()
        self._extend(seconds)
        pause = Pause(until=now + seconds, retry_after=seconds, status=status, set_at=now, by=self.name)
        try:
            won = await asyncio.wait_for(self._publish(pause), self.timeout)
        except (*_NATS_ERRORS, ConfigError) as e:
            self.unshared += 1
            log.warning("rate_limit.not_shared", key=self.key, status=status, seconds=seconds, agent=self.name,
                        error=f"{type(e).__name__}: {e}",
                        note="honoured by this agent only; other agents learn it from their own 429s")
            return seconds
        if won:
            self.shared += 1
        log.info("rate_limit.paused", key=self.key, status=status, seconds=seconds, agent=self.name, shared=won)
        return seconds

    # -- the bus --------------------------------------------------------------------------
    async def start(self) -> None:
        """Watch the key (:class:`~infra.adapters.nats.kv_follow.KVFollower`: made again
        after any failure); the first call waits for the current value at most
        ``timeout``. Fails open: calls go on while the watch is not ready."""
        if self._closed or self._follower is not None:
            return
        async with self._start_lock:
            if self._follower is not None:
                return
            self._follower = KVFollower(self.nc, self.bucket, self._take, keys=self.key,
                                        name=f"shared-limits-{self.name or self.key}", timeout=self.timeout,
                                        silence=WATCH_SILENCE)
            if not await self._follower.start(wait=self.timeout):
                log.warning("rate_limit.watch_not_ready", key=self.key, agent=self.name, timeout=self.timeout,
                            note="calls proceed; pauses shared by other agents are not seen until it is")

    async def close(self) -> None:
        """Stop the watch."""
        self._closed = True
        follower, self._follower = self._follower, None
        if follower is not None:
            await follower.stop()

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.nc.jetstream(timeout=self.timeout).key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                raise ConfigError(f"bucket {self.bucket} is missing: provisioning is an admin step "
                                  "(`ccc server`, `ccc up`)") from None
        return self._kv

    async def _publish(self, pause: Pause) -> bool:
        """Compare-and-set: write ``pause`` unless the entry already pauses as long.
        True if this write is the entry now."""
        kv = await self._bucket()
        data = _encode(pause)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await kv.get(self.key)
            except nats.js.errors.KeyNotFoundError:  # absent, deleted or expired
                entry = None
            current = self._decode(entry)
            if current is not None and current.until >= pause.until:
                return False
            try:
                if entry is None:
                    await kv.create(self.key, data)
                else:
                    await kv.update(self.key, data, last=entry.revision)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone wrote in between: read again, compare again
        return False

    def _take(self, key: str, value: bytes | None) -> None:
        pause = self._decode_value(value)
        if pause is not None:
            left = pause.until - time.time()
            if left > 0:
                self._extend(min(left, self.cap))

    def _decode(self, entry: KeyValue.Entry | None) -> Pause | None:
        if entry is None or entry.operation in ("DEL", "PURGE"):
            return None
        return self._decode_value(entry.value)

    def _decode_value(self, value: bytes | None) -> Pause | None:
        if not value:
            return None
        try:
            pause = _decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("rate_limit.bad_entry", key=self.key, bucket=self.bucket)
            return None
        return pause if math.isfinite(pause.until) else None

    def _extend(self, seconds: float) -> None:
        self._until = max(self._until, time.monotonic() + seconds)


class SharedLimitHooks:
    """httpx event hooks: wait out the shared pause before each request, record a 429/529
    after it."""

    def __init__(self, pause: SharedPause) -> None:
        self.pause = pause

    async def on_request(self, request: httpx.Request) -> None:
        await self.pause.wait()

    async def on_response(self, response: httpx.Response) -> None:
        await self.pause.record(response.status_code, response.headers)

    def event_hooks(self) -> dict[str, list[Any]]:
        return {"request": [self.on_request], "response": [self.on_response]}


class SharedLimitsClient(anthropic.DefaultAsyncHttpxClient):
    """The SDK's default http client with a :class:`SharedPause` hooked in; closing it
    stops the pause's watch."""

    def __init__(self, pause: SharedPause, **kwargs: Any) -> None:
        super().__init__(event_hooks=SharedLimitHooks(pause).event_hooks(), **kwargs)
        self.shared_pause = pause

    async def aclose(self) -> None:
        await self.shared_pause.close()
        await super().aclose()


def shared_limits_http_client(nc: Client, ns: Namespace, api_key: str, **options: Any) -> SharedLimitsClient:
    """The http client to give ``anthropic.AsyncAnthropic(http_client=...)``: the SDK's
    default client (its timeouts and connection limits) with the shared pause of
    ``api_key`` in cluster ``ns`` hooked in. ``options`` go to :class:`SharedPause`
    (``cap``, ``default``, ``timeout``, ``name``). Raises :class:`ConfigError` for an
    empty key or bad options."""
    return SharedLimitsClient(SharedPause(nc, ns, api_key, **options))
