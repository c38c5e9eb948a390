"""Run the status API under uvicorn (see :mod:`infra.adapters.http.service`), in the caller's
event loop, with a live projection.

    server = ApiServer(store, "127.0.0.1", 0)
    port = await server.start()      # the projection has caught up; the socket is bound
    ...                               # server.url -> "http://127.0.0.1:<port>"
    await server.stop()

or ``await server.serve_forever()`` (stops cleanly when cancelled).
"""

from __future__ import annotations

import asyncio

import structlog
from litestar import Litestar
from prometheus_client import CollectorRegistry

from events.store import EventStore
from projections.live import LiveReadModel
from projections.status_api import create_app, register_log_metrics

from infra.adapters.http.metrics import ApiMetrics, metrics_endpoint
from infra.adapters.http.service import SHUTDOWN_TIMEOUT, HttpService, Served

log = structlog.get_logger("ccc.api")


class ApiServer(Served):
    """The status API on ``host:port`` (0: any free port), over a projection it owns,
    or over ``live`` if given (then the caller starts and stops that)."""

    def __init__(
        self, store: EventStore, host: str = "127.0.0.1", port: int = 0, *,
        materialize: bool = True, live: LiveReadModel | None = None,
    ) -> None:
        self.store = store
        self.http = HttpService(host, port, name="status API")
        self._owns_live = live is None
        self.live = live or LiveReadModel(store, materialize=materialize)

    async def start(self) -> int:
        """Catch the projection up, bind, start serving; returns the bound port."""
        self.http.bind()  # first: a port in use fails before any replay
        app = self.build_app()  # before the replay: its metrics fold rides along from seq 1
        if self._owns_live:
            try:
                await self.live.start()
            except BaseException:
                self.http.release()
                raise
        try:
            return await self.http.start(app)
        except BaseException:
            await self._stop_live()
            raise

    def build_app(self) -> Litestar:
        """The status API with ``/metrics``. One registry per app: facts of the log come
        from the live model (a restart rebuilds them), the API's own request counts
        from this process."""
        registry = CollectorRegistry()
        api_metrics = ApiMetrics(registry)
        refresh_lag = register_log_metrics(self.live, registry)
        return create_app(self.live, route_handlers=[metrics_endpoint(registry, before=refresh_lag)],
                          middleware=[api_metrics.middleware])

    async def stop(self) -> None:
        """Stop serving (in-flight requests get ``SHUTDOWN_TIMEOUT``), then the
        projection. Idempotent."""
        await self.http.stop()
        await self._stop_live()

    async def _stop_live(self) -> None:
        if not self._owns_live:
            return
        try:
            # bounded: shutting down must not hang on a follower that missed its cancel
            await asyncio.wait_for(self.live.stop(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("api.projection_stop_timeout", timeout=SHUTDOWN_TIMEOUT)
