"""An ASGI app under uvicorn, in the caller's event loop: the one way this project
serves HTTP (the status API, the webhook receiver).

Two deliberate departures from ``uvicorn.run``:

* we bind the listening socket ourselves and hand it to uvicorn, so port 0 works (the
  real port is known before serving) and a port in use is an ``OSError`` from
  ``bind()``/``start()``; uvicorn would call ``sys.exit`` from inside our event loop.
* uvicorn installs no signal handlers and no logging config: the process owner decides
  what SIGINT/SIGTERM mean, and our logging (with its masking processor) stays in charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import structlog
import uvicorn

log = structlog.get_logger("ccc.http")

STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0
KEEP_ALIVE = 75.0
"""Seconds an idle keep-alive connection stays open. uvicorn's default is 5 s: a client
polling every 5 s (a dashboard, a health probe; ``ccc soak`` samples every 5 s) then
sends its next request on a connection the server is closing at that very moment and
gets "server disconnected without sending a response" (the hour-long soak met it 3 times
in 720 samples). 75 s outlasts such pollers and the idle timeout of the load balancers
usually put in front (60 s), so the server never closes a connection a client still
counts on; each idle connection costs a socket and a few KB meanwhile."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the process owner handles signals
        yield


def bind(host: str, port: int) -> socket.socket:
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


class HttpService:
    def __init__(self, host: str, port: int, *, name: str) -> None:
        self.host = host
        self.port = port
        self.name = name
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def bind(self) -> int:
        """Bind now (before slow start-up work), so a port in use fails first."""
        if self._sock is None:
            self._sock = bind(self.host, self.port)
            self.port = self._sock.getsockname()[1]
        return self.port

    def release(self) -> None:
        """Give the socket back if start-up is abandoned before ``start``."""
        if self._sock is not None and self._task is None:
            self._sock.close()
            self._sock = None

    async def start(self, app: Any) -> int:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self.bind()
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", log_config=None,
                                lifespan="on", timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
                                timeout_keep_alive=KEEP_ALIVE)
        self._server = server = _Server(config)
        self._task = asyncio.create_task(self._serve(server, self._sock), name=f"{self.name}:{self.port}")
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                # uvicorn offers a flag, not an event: poll it (startup is milliseconds)
                while not server.started and not self._task.done():
                    await asyncio.sleep(0.005)
        except BaseException:
            await self.stop()
            raise
        if self._task.done():  # startup failed: surface why
            error = self._task.exception() or RuntimeError(f"{self.name} exited during startup")
            await self.stop()
            raise error
        log.info("http.started", service=self.name, url=self.url)
        return self.port

    async def _serve(self, server: _Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as e:  # uvicorn exits the process on a lifespan failure
            raise RuntimeError(f"{self.name} failed to start (uvicorn exit {e.code})") from None
        finally:
            sock.close()

    async def wait(self) -> None:
        """Until the server stops (or this is cancelled)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop serving; in-flight requests get ``SHUTDOWN_TIMEOUT``. Idempotent."""
        server, task = self._server, self._task
        if server is None or task is None or task.done():
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), SHUTDOWN_TIMEOUT + 1.0)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
        except Exception as e:  # noqa: BLE001 - shutting down regardless
            log.warning("http.stop_error", service=self.name, error=repr(e))
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Served:
    """What the status API and the webhook receiver share on top of :class:`HttpService`:
    the address and ``serve_forever``. Subclasses set ``self.http`` and define
    ``start()`` and ``stop()``."""

    http: HttpService

    host = property(lambda self: self.http.host)
    port = property(lambda self: self.http.port)
    url = property(lambda self: self.http.url)
    running = property(lambda self: self.http.running)

    async def start(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    async def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def serve_forever(self) -> None:
        """Serve until cancelled (or stopped from elsewhere), then shut down."""
        if not self.http.running:
            await self.start()
        try:
            await self.http.wait()
        finally:
            await self.stop()
