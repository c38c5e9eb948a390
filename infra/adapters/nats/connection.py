"""Connecting to NATS: the embedded server of a data dir, or an existing
server/cluster from ``NATS_URL`` (comma-separated URLs, optional creds and TLS)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from events.errors import StoreUnavailable

from infra.adapters.nats.settings import Settings

log = structlog.get_logger("ccc.nats")


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=settings.nats_tls_ca)
    if settings.nats_tls_cert:
        ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
    return ctx


async def connect(
    url: str,
    *,
    name: str = "ccc",
    settings: Settings | None = None,
    connect_timeout: float = 5.0,
    inbox_prefix: str | None = None,
    reconnect: bool = True,
    quiet: bool = False,
) -> Client:
    """Connect with reconnection on and errors logged (a publish denied by
    permissions only reaches ``error_cb``; without it it would be silent)."""

    async def error_cb(e: Exception) -> None:
        if not quiet:
            log.warning("nats.error", error=str(e), kind=type(e).__name__)

    async def disconnected_cb() -> None:
        log.info("nats.disconnected")

    async def reconnected_cb() -> None:
        log.info("nats.reconnected")

    kwargs: dict = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": reconnect,
        # bounded while connecting for the first time (a CLI command must not hang
        # on a wrong URL); unlimited once connected, set below
        "max_reconnect_attempts": 2 if reconnect else 1,
        "reconnect_time_wait": 0.25,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "pending_size": 64 * 1024 * 1024,
    }
    if inbox_prefix:
        kwargs["inbox_prefix"] = inbox_prefix
    if settings is not None:
        if settings.nats_creds:
            kwargs["user_credentials"] = settings.nats_creds
        tls = _tls_context(settings)
        if tls is not None:
            kwargs["tls"] = tls
    try:
        nc = await nats.connect(**kwargs)
    except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
        raise StoreUnavailable(f"cannot connect to NATS at {url}: {e or type(e).__name__}") from None
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1  # ride out server restarts for ever
    return nc


def embedded_url_file(data_dir: Path) -> Path:
    return data_dir / "nats.url"


@asynccontextmanager
async def open_nats(settings: Settings, *, name: str = "ccc") -> AsyncIterator[Client]:
    """A connection for one CLI command: ``NATS_URL`` if given, otherwise the embedded
    server of ``data_dir``, which is started for the command if it is not running."""
    from infra.adapters.nats.server import EmbeddedServer  # local: only needed without NATS_URL

    server = None
    url = settings.nats_url
    if url is None:
        url_file = embedded_url_file(settings.data_dir)
        if url_file.is_file():
            url = url_file.read_text().strip()
            try:
                nc = await connect(url, name=name, settings=settings, connect_timeout=1.0,
                                   reconnect=False)
            except StoreUnavailable:
                url = None  # stale file: the server is gone
            else:
                await nc.close()
        if url is None:
            server = EmbeddedServer(settings.data_dir, sync_interval=settings.sync_interval)
            url = server.start()
    nc = await connect(url, name=name, settings=settings)
    try:
        yield nc
    finally:
        try:
            await nc.drain()
        except Exception:  # noqa: BLE001 - closing is best effort
            await nc.close()
        if server is not None:
            server.stop()
