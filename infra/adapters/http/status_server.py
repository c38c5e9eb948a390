"""Run the status API under uvicorn (see :mod:`infra.adapters.http.service`), in the caller's
event loop, with a live projection.

    server = ApiServer(store, "127.0.0.1", 0)
    port = await server.start()      # the projection has caught up; the socket is bound
    ...                               # server.url -> "http://127.0.0.1:<port>"
    await server.stop()

or ``await server.serve_forever()`` (stops cleanly when cancelled).

Access (:mod:`infra.adapters.http.auth`): ``ApiServer(..., access=ApiAccess(...))``
decides tokens, Host allow-list and rate limit; the default needs no token on
localhost and refuses to start beyond it without one.

The web dashboard (:mod:`infra.adapters.http.dashboard`) is served beside the API, on
the same port and behind the same gate: its pages at ``/`` (built from the same live
projection), its live stream at ``/ui/stream``, its actions and sign-in under ``/ui/``
(``forge_root``: the local forge's directory on this host, for publishing issues and
merging or closing pull requests there; ``publisher``: a connection allowed to publish
local issue facts, where the store's is not).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from events.store import EventStore
from projections.fairness import FairnessPolicy
from projections.live import LiveReadModel
from projections.waits import Holds
from projections.status_api import create_app, register_log_metrics

from infra.adapters.http.auth import ApiAccess, ApiGate, scope_guard
from infra.adapters.http.dashboard.actions import action_handlers
from infra.adapters.http.dashboard.live import close_live_streams, live_handlers
from infra.adapters.http.dashboard.pages import Dashboard
from infra.adapters.http.metrics import ApiMetrics, metrics_endpoint
from infra.adapters.http.service import SHUTDOWN_TIMEOUT, HttpService, Served
from infra.adapters.nats.spend_ledger import SpendWatch
from infra.adapters.plugins.health import HealthWatch

log = structlog.get_logger("ccc.api")


async def async_scope_guard(connection: Any, handler: Any) -> None:
    """:func:`scope_guard`, as a coroutine: Litestar runs a plain function guard in a worker
    thread, on every request (a thread hop per request, for a check of a few dict reads)."""
    scope_guard(connection, handler)


def settle_heap() -> None:
    """Once per process, when the projection has replayed: collect, then move everything
    alive (the modules, the rebuilt projection) out of the collector's generations
    (``gc.freeze``). A full collection otherwise walks all of it — ~100 ms with 10,000
    tasks on a busy 2-core machine, every few seconds under load: it was the API's p99
    (``ccc bench api``). What is allocated later is collected as usual."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


class ApiServer(Served):
    """The status API on ``host:port`` (0: any free port), over a projection it owns,
    or over ``live`` if given (then the caller starts and stops that). ``access``: who
    may call it (``ConfigError`` here if it needs a token there and has none);
    ``route_handlers``: served beside the API, behind the same checks (a handler
    declares ``opt={"scope": "write"}`` for actions); ``forge_root`` and ``publisher``:
    what the dashboard's actions need (see the module's doc)."""

    def __init__(
        self, store: EventStore, host: str = "127.0.0.1", port: int = 0, *,
        materialize: bool = True, live: LiveReadModel | None = None,
        access: ApiAccess | None = None, route_handlers: Sequence[Any] = (),
        forge_root: Path | str | None = None, publisher: Client | None = None,
        fairness: FairnessPolicy | None = None,
        holds: Callable[[], Holds] | None = None,
    ) -> None:
        self.fairness = fairness  # the coordinator's admission policy, for the wait reasons
        # what holds queued tasks back beyond the log: the spend ledger and the plugins' holds —
        # the coordinator's own view when it runs in this process (``holds``), else followed
        # on the bus with the store's connection
        self.spend = self.health = None
        if holds is None:
            self.spend, self.health = SpendWatch(store.nc, store.ns), HealthWatch(store.nc, store.ns)
            spend, health = self.spend, self.health
            holds = lambda: Holds(spend.book(), health.plugin_waits())  # noqa: E731
        self.holds = holds
        self.access = access if access is not None else ApiAccess()
        self.access.check(host)  # before anything binds or replays
        self.store = store
        self.route_handlers = tuple(route_handlers)
        self.forge_root = forge_root
        self.publisher = publisher
        self.http = HttpService(host, port, name="status API")
        self._owns_live = live is None
        self.live = live or LiveReadModel(store, materialize=materialize)

    async def start(self) -> int:
        """Catch the projection up, bind, start serving; returns the bound port."""
        self.http.bind()  # first: a port in use fails before any replay
        app = self.build_app()  # before the replay: its metrics fold rides along from seq 1
        if self.spend is not None and self.health is not None:  # (not readable yet: followed as they come)
            await self.spend.start(wait=2.0)
            await self.health.start(wait=2.0)
        if self._owns_live:
            try:
                await self.live.start()
            except BaseException:
                self.http.release()
                await self._stop_spend()
                raise
        settle_heap()
        try:
            return await self.http.start(app)
        except BaseException:
            await self._stop_live()
            await self._stop_spend()
            raise

    def build_app(self) -> Any:
        """The ASGI app served: the status API with ``/metrics`` and the dashboard, behind
        :class:`ApiGate` (rate limit, Host, token) and :func:`scope_guard` (each route's
        scope). One registry per app: facts of the log come from the live model (a restart
        rebuilds them), the API's own request counts from this process; the request
        metrics wrap everything, so refused requests are counted too (endpoint
        ``<unmatched>``). Built before the projection replays, so the metrics' and the
        dashboard's folds ride along from sequence 1."""
        registry = CollectorRegistry()
        api_metrics = ApiMetrics(registry)
        refresh_lag = register_log_metrics(self.live, registry)
        dashboard = Dashboard(self.live, local_forge=self.forge_root is not None, fairness=self.fairness,
                              holds=self.holds)
        ui = [*dashboard.route_handlers(), *live_handlers(self.live),
              *action_handlers(self.store, self.access, forge_root=self.forge_root, publisher=self.publisher)]
        app = create_app(self.live, route_handlers=[metrics_endpoint(registry, before=refresh_lag),
                                                    *ui, *self.route_handlers],
                         guards=[async_scope_guard], fairness=self.fairness, holds=self.holds)
        return api_metrics.middleware(ApiGate(app, self.access, self.http.host))

    async def stop(self) -> None:
        """Stop serving (in-flight requests get ``SHUTDOWN_TIMEOUT``), then the
        projection. Idempotent. The dashboard's event streams are ended first: they never
        end by themselves, and would hold the shutdown for its whole grace period."""
        close_live_streams(self.live)
        await self.http.stop()
        await self._stop_live()
        await self._stop_spend()

    async def _stop_spend(self) -> None:
        for watch in (self.spend, self.health):
            if watch is not None:
                await watch.stop()

    async def _stop_live(self) -> None:
        if not self._owns_live:
            return
        try:
            # bounded: shutting down must not hang on a follower that missed its cancel
            await asyncio.wait_for(self.live.stop(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("api.projection_stop_timeout", timeout=SHUTDOWN_TIMEOUT)
