"""Prometheus over HTTP: the ``/metrics`` endpoint (prometheus-client's own ASGI app,
mounted in a Litestar app), the status API's request metrics (:class:`ApiMetrics` and
its ASGI :class:`MetricsMiddleware`), and :class:`MetricsServer`, ``/metrics`` on the
project's HTTP service for processes without the status API (an agent).

What the metrics *are* lives elsewhere: facts of the log in :mod:`projections.metrics`,
an agent's own work in :mod:`infra.adapters.obs.metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Litestar, MediaType, Request, Response, asgi, get
from litestar.exceptions import MethodNotAllowedException, NotFoundException
from litestar.handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_asgi_app

from infra.adapters.http.service import HttpService, Served

API_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


# -- the exposition --------------------------------------------------------------------------
def metrics_endpoint(registry: CollectorRegistry, *, path: str = "/metrics",
                     before: Callable[[], Awaitable[None]] | None = None) -> ASGIRouteHandler:
    """A Litestar route serving ``registry`` with prometheus-client's ASGI app (content
    negotiation, gzip, ``name[]`` filters). ``before``: awaited first (e.g. refresh the
    stream's last sequence for the lag metric). The collectors run on the event loop's
    thread, the one that applies events, so each scrape is one log position."""
    exposition = make_asgi_app(registry)

    async def metrics(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            raise MethodNotAllowedException(headers={"Allow": "GET, HEAD"})
        if before is not None:
            await before()
        await exposition(scope, receive, send)

    return asgi(path, name="metrics", copy_scope=True)(metrics)


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


# -- /metrics for processes without the status API -------------------------------------------
@get(["/", "/healthz"], media_type=MediaType.TEXT, sync_to_thread=False, name="healthz")
def _healthz() -> str:
    return "ok\n"


def _not_found(_: Request, __: NotFoundException) -> Response[str]:
    return Response("not found; try /metrics\n", media_type=MediaType.TEXT, status_code=404)


class MetricsServer(Served):
    """``GET /metrics`` (and ``/healthz``) on ``host:port`` (0: any free port), served
    by the project's HTTP service in the caller's event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, registry: CollectorRegistry = REGISTRY,
                 before: Callable[[], Awaitable[None]] | None = None) -> None:
        self.http = HttpService(host, port, name="metrics")
        self.app = Litestar(
            route_handlers=[metrics_endpoint(registry, before=before), _healthz],
            exception_handlers={NotFoundException: _not_found},
            logging_config=None,  # our logging (with its masking processor) stays in charge
            openapi_config=None,
        )

    @property
    def url(self) -> str:  # type: ignore[override]  # where to scrape
        return f"{self.http.url}/metrics"

    async def start(self) -> int:
        """Bind and serve; returns the bound port. A port in use is an ``OSError``."""
        return await self.http.start(self.app)

    async def stop(self) -> None:
        await self.http.stop()


async def serve_metrics(port: int = 0, *, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY,
                        before: Callable[[], Awaitable[None]] | None = None) -> MetricsServer:
    """Start a :class:`MetricsServer`; read ``.port`` and ``.url`` from it, ``stop()`` it."""
    server = MetricsServer(host, port, registry=registry, before=before)
    await server.start()
    return server


__all__ = ["API_DURATION_BUCKETS", "ApiMetrics", "MetricsMiddleware", "MetricsServer", "metrics_endpoint",
           "serve_metrics"]
