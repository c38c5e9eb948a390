"""A per-client request rate limit: token buckets, and the ASGI middleware that answers
429 (the project's JSON error, with ``Retry-After``) before the request reaches a route.

    limit = RateLimit(rate=20, burst=100)        # 20 requests/s sustained, bursts of 100
    buckets = TokenBuckets(limit)
    wait = buckets.take("addr:10.0.0.7")         # 0.0: go ahead; else seconds until allowed

Why not Litestar's ``RateLimitConfig``: it counts requests in fixed windows of a whole
unit (``("second", 100)`` lets 200 requests through in a millisecond across a window
edge), keeps every timestamp of the window JSON-encoded in a store behind one global
lock (work per request grows with the limit), raises an exception whose handler in the
status API would drop its headers, and sends ``RateLimit-*`` headers but no
``Retry-After``. Litestar app middleware also runs only after routing, so requests to
paths with no route (scans) would not be counted. A token bucket is a few lines: a
sustained rate and a burst, O(1) per request, and the wait is exact.

The client is the ASGI ``client`` address. uvicorn rewrites it from
``X-Forwarded-For`` only for connections from its trusted proxies (127.0.0.1 and ::1
by default), so behind a reverse proxy on the same host the limit is per real client
and a remote client cannot choose its own key; a process on this host can (it could
open connections as fast anyway): the limit protects a service reachable from other
hosts, and the status API keys authenticated clients by their token instead.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from events.errors import ConfigError

from infra.adapters.http.errors import send_json_error


class RateLimit(msgspec.Struct, frozen=True):
    """``rate`` requests per second sustained (0: no limit), bursts of up to ``burst``."""

    rate: float = 20.0
    burst: int = 100

    def __post_init__(self) -> None:
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ConfigError(f"rate limit: {self.rate!r} requests/s (use a number >= 0; 0 turns it off)")
        if self.burst < 1:
            raise ConfigError(f"rate limit: burst {self.burst!r} (use an integer >= 1)")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


OFF = RateLimit(0.0, 1)


class TokenBuckets:
    """One token bucket per key: each request takes a token; tokens come back at
    ``rate`` per second up to ``burst``. Only the event loop's thread calls this (no lock).

    Memory is bounded by ``max_keys``: a bucket that has refilled is the same as no
    bucket, so those go first; if every bucket is still draining (many clients at once),
    the least recently seen go, which at worst hands those clients a fresh burst."""

    def __init__(self, limit: RateLimit, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 if there was one, else the seconds until there is."""
        rate, burst = self.limit.rate, self.limit.burst
        if rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.pop(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)  # a refused request takes nothing
            wait = (1.0 - tokens) / rate
        if len(self._buckets) > self.max_keys:
            self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        rate, burst = self.limit.rate, self.limit.burst
        for key in [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * rate >= burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)  # least recently seen first

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait: float) -> str:
    """``Retry-After`` is whole seconds; round up, so a client that waits is let in."""
    return str(max(1, math.ceil(wait)))


def client_key(scope: dict) -> str:
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


async def send_too_many(send: Any, wait: float) -> None:
    await send_json_error(send, 429, f"rate limit exceeded; retry in {retry_after(wait)} s",
                          headers={"Retry-After": retry_after(wait)})


class RateLimitMiddleware:
    """ASGI middleware: a 429 once a client address has used its burst. Usable as
    Litestar middleware (``middleware=[RateLimitMiddleware.factory(buckets)]``; the
    buckets are shared by every route) or around any ASGI app."""

    def __init__(self, app: Any, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    @classmethod
    def factory(cls, buckets: TokenBuckets) -> Callable[[Any], RateLimitMiddleware]:
        return lambda app: cls(app, buckets)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            wait = self.buckets.take(client_key(scope))
            if wait > 0:
                await send_too_many(send, wait)
                return
        await self.app(scope, receive, send)


__all__ = ["OFF", "RateLimit", "RateLimitMiddleware", "TokenBuckets", "client_key", "retry_after",
           "send_too_many"]
