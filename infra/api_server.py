"""Run the status API under uvicorn, in the caller's event loop, with a live projection.

    server = ApiServer(store, "127.0.0.1", 0)
    port = await server.start()      # the projection has caught up; the socket is bound
    ...                               # server.url -> "http://127.0.0.1:<port>"
    await server.stop()

or ``await server.serve_forever()`` (stops cleanly when cancelled), or ``serve_api()``.

Two deliberate departures from ``uvicorn.run``:

* we bind the listening socket ourselves and hand it to uvicorn, so port 0 works (the
  real port is known before serving) and a port in use is an ``OSError`` from
  ``start()``; uvicorn would call ``sys.exit`` from inside our event loop.
* uvicorn does not install signal handlers: the process owner (``ccc api``,
  ``ccc up``) decides what SIGINT/SIGTERM mean and cancels or stops us.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from events.store import EventStore
from projections.live import LiveReadModel
from projections.status_api import create_app

log = structlog.get_logger("ccc.api")

STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the process owner handles signals
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """The status API on ``host:port`` (0: any free port), over a projection it owns,
    or over ``live`` if given (then the caller starts and stops that)."""

    def __init__(
        self, store: EventStore, host: str = "127.0.0.1", port: int = 0, *,
        materialize: bool = True, live: LiveReadModel | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self._owns_live = live is None
        self.live = live or LiveReadModel(store, materialize=materialize)
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> int:
        """Catch the projection up, bind, start serving; returns the bound port."""
        if self._task is not None:
            raise RuntimeError("ApiServer already started")
        sock = _bind(self.host, self.port)  # first: a port in use fails before any replay
        self.port = sock.getsockname()[1]
        app = create_app(self.live)  # before the replay: its metrics fold rides along from seq 1
        if self._owns_live:
            try:
                await self.live.start()
            except BaseException:
                sock.close()
                raise
        config = uvicorn.Config(
            app, host=self.host, port=self.port, log_level="warning", log_config=None,
            lifespan="on", timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
        )
        self._server = server = _Server(config)
        self._task = asyncio.create_task(self._serve(server, sock), name=f"api-server:{self.port}")
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                # uvicorn offers a flag, not an event: poll it (startup is milliseconds)
                while not server.started and not self._task.done():
                    await asyncio.sleep(0.005)
        except BaseException:
            await self.stop()
            raise
        if self._task.done():  # startup failed: surface why
            error = self._task.exception() or RuntimeError("status API exited during startup")
            await self.stop()
            raise error
        log.info("api.started", url=self.url)
        return self.port

    @staticmethod
    async def _serve(server: _Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as e:  # uvicorn exits the process on a lifespan failure
            raise RuntimeError(f"status API failed to start (uvicorn exit {e.code})") from None
        finally:
            sock.close()

    async def serve_forever(self) -> None:
        """Serve until cancelled (or stopped from elsewhere), then shut down."""
        if self._task is None:
            await self.start()
        assert self._task is not None
        try:
            await asyncio.shield(self._task)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop serving (in-flight requests get ``SHUTDOWN_TIMEOUT``), then the
        projection. Idempotent."""
        server, task = self._server, self._task
        if server is not None and task is not None and not task.done():
            server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), SHUTDOWN_TIMEOUT + 1.0)
            except TimeoutError:
                server.force_exit = True
                task.cancel()
            except Exception as e:  # noqa: BLE001 - shutting down regardless
                log.warning("api.stop_error", error=repr(e))
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_live()

    async def _stop_live(self) -> None:
        if not self._owns_live:
            return
        try:
            # bounded: shutting down must not hang on a follower that missed its cancel
            await asyncio.wait_for(self.live.stop(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("api.projection_stop_timeout", timeout=SHUTDOWN_TIMEOUT)


async def serve_api(
    store: EventStore, host: str, port: int, *, materialize: bool = True,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve the status API until cancelled. ``ready`` is set once it accepts
    connections; with port 0, use :class:`ApiServer` to learn the port."""
    server = ApiServer(store, host, port, materialize=materialize)
    await server.start()
    if ready is not None:
        ready.set()
    await server.serve_forever()
