"""Prometheus over HTTP: the status API's own request metrics (:class:`ApiMetrics`
and its ASGI :class:`MetricsMiddleware`), the exposition (:func:`metrics_response`,
the Litestar :func:`metrics_route`), and :func:`serve_metrics`, a tiny ``/metrics``
server for processes without the status API. Facts of the log are in
:mod:`projections.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

API_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# -- the status API's own requests -----------------------------------------------------------
class ApiMetrics:
    """``claude_api_requests_total{endpoint,method,status}`` and
    ``claude_api_duration_seconds{endpoint,method}``; ``endpoint`` is the route template
    (``/api/v1/tasks/{task_id:str}``), never the raw path, so cardinality stays bounded."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 buckets: tuple[float, ...] = API_DURATION_BUCKETS) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("claude_api_requests", "HTTP requests served",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.duration = Histogram("claude_api_duration_seconds", "HTTP request duration",
                                  ["endpoint", "method"], registry=self.registry, buckets=buckets)

    def middleware(self, app: Any) -> MetricsMiddleware:
        """Litestar middleware (``Litestar(middleware=[api_metrics.middleware])``) or a
        wrapper for any ASGI app."""
        return MetricsMiddleware(app, self)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.duration.labels(endpoint, method).observe(seconds)


class MetricsMiddleware:
    """ASGI middleware recording :class:`ApiMetrics`. The route template is read from the
    scope (Litestar sets ``path_template`` when it routes); a request no route matched
    is recorded as ``<unmatched>``."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = scope.get("path_template") or "<unmatched>"
            self.metrics.observe(endpoint, scope.get("method", "GET"), status, time.perf_counter() - start)


def metrics_response(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metrics_route(registry: CollectorRegistry, *, path: str = "/metrics",
                  before: Callable[[], Awaitable[None]] | None = None) -> Any:
    """A Litestar ``GET /metrics`` handler for ``registry``. ``before``: awaited first
    (e.g. refresh the stream's last sequence for the lag metric)."""
    from litestar import Response, get

    async def metrics() -> Any:
        if before is not None:
            await before()
        body, content_type = metrics_response(registry)
        # Litestar would append a second charset to a text/ media type: set the header as is
        return Response(content=body, media_type=content_type, headers={"content-type": content_type})

    metrics.__annotations__ = {"return": Response}  # resolved here, not in this module's globals
    return get(path, include_in_schema=False, name="metrics")(metrics)


# -- a tiny /metrics server for processes without the status API --------------------------------
class MetricsServer:
    def __init__(self, server: asyncio.base_events.Server, host: str, port: int) -> None:
        self._server = server
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}/metrics" if ":" in host else f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)


async def serve_metrics(port: int = 0, *, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY,
                        before: Callable[[], Awaitable[None]] | None = None) -> MetricsServer:
    """Serve ``GET /metrics`` (and ``/healthz``) on the running event loop, so collectors
    run on the loop's thread. Port 0 picks a free port: read ``.port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target = (request_line.split(" ") + ["", ""])[:2]
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (h.partition(":") for h in header_lines if h)}
            path = target.split("?", 1)[0]
            content_type, extra = "text/plain; charset=utf-8", ""
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b"method not allowed\n"
            elif path == "/metrics":
                if before is not None:
                    await before()
                body, content_type = metrics_response(registry)
                status = "200 OK"
                if "gzip" in headers.get("accept-encoding", ""):
                    body, extra = gzip.compress(body), "Content-Encoding: gzip\r\n"
            elif path in ("/", "/healthz"):
                status, body = "200 OK", b"ok\n"
            else:
                status, body = "404 Not Found", b"not found; try /metrics\n"
            writer.write((f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError,
                ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    return MetricsServer(server, host, bound)
