"""Connecting to NATS: the embedded server of a data dir, or an existing
server/cluster from ``NATS_URL`` (comma-separated URLs, optional creds and TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from events.errors import StoreUnavailable
from events.subjects import Namespace

from infra.adapters.nats.permissions import Role
from infra.adapters.nats.secure import KitFiles, SecureDir, reload_server
from infra.adapters.nats.settings import Settings
from infra.adapters.obs.masking import add_secrets, mask, redact_url

log = structlog.get_logger("ccc.nats")


def _drop_tls_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio warns "returning true from eof_received() has no effect when using ssl"
    each time a nats-py TLS connection closes (its protocol asks to keep the transport
    half-open, which TLS cannot): on a secure cluster that is every connection (a bench
    closes a thousand at once), and it says nothing anyone can act on. Filtered where
    the TLS connections are made, on asyncio's logger, whatever handlers log it."""
    return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_drop_tls_eof_noise)


def tls_close_noise(e: Exception) -> bool:
    """Whether ``e`` is OpenSSL reporting data that arrived after a TLS connection's
    close_notify: the server's last bytes racing our own close (seen as a coordinator
    process stops). Nothing was lost or refused; it is logged at debug, not as a warning."""
    return isinstance(e, ssl.SSLError) and e.reason == "APPLICATION_DATA_AFTER_CLOSE_NOTIFY"

AUTH_REFUSALS_BEFORE_CLOSING = 3
TRANSIENT_CONNECT_ERRORS = ("authorization", "connection lost", "eof", "reset", "timeout", "broken pipe",
                            "ssl", "handshake", "connection closed")


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
    kit: KitFiles | None = None,
    role: Role | None = None,
    agent_id: str | None = None,
    ns: Namespace | None = None,
) -> Client:
    """Connect with reconnection on and errors logged (a publish denied by
    permissions only reaches ``error_cb``; without it it would be silent).

    Credentials: ``kit``, or the kit of ``role`` (and ``agent_id``) that ``settings``
    lead to (:func:`kit_for`), or none (``--insecure``, or a server without security)."""
    if kit is None and settings is not None and role is not None:
        kit = kit_for(settings, role, url, agent_id, ns)

    refusals = 0
    holder: list[Client] = []
    closing: list[asyncio.Task] = []  # referenced, so the task is not collected mid-way

    async def error_cb(e: Exception) -> None:
        nonlocal refusals
        if tls_close_noise(e):
            log.debug("nats.tls_closed", error=str(e))
        elif not quiet:
            log.warning("nats.error", error=mask(str(e)), kind=type(e).__name__)
        if "authorization violation" in str(e).lower() and holder:
            # refused while reconnecting: the user was revoked (or the server's users were
            # replaced). Retrying for ever would only hammer the server: give up, loudly.
            refusals += 1
            if refusals >= AUTH_REFUSALS_BEFORE_CLOSING:
                log.error("nats.credentials_refused", name=name,
                          hint="revoked? (`ccc secure revoke-agent`) - closing the connection")
                closing.append(asyncio.get_running_loop().create_task(_close_quietly(holder[0])))

    async def disconnected_cb() -> None:
        log.info("nats.disconnected")

    async def reconnected_cb() -> None:
        nonlocal refusals
        refusals = 0
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
    if kit is not None:
        # this user's nkey (challenge-response: the seed never leaves this process), its
        # client certificate (mutual TLS), the cluster's CA, and its own inbox prefix
        # (its permissions allow replies there only)
        kwargs["nkeys_seed_str"] = kit.seed.read_text().strip()  # kept in memory: a revoked kit is deleted
        add_secrets(kwargs["nkeys_seed_str"])  # masked everywhere, whatever its shape
        kwargs["inbox_prefix"] = kit.kit.inbox_prefix
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(kit.ca))
        ctx.load_cert_chain(str(kit.cert), str(kit.key))
        kwargs["tls"] = ctx
    elif settings is not None:
        if settings.nats_creds:
            kwargs["user_credentials"] = settings.nats_creds
        tls = _tls_context(settings)
        if tls is not None:
            kwargs["tls"] = tls
    try:
        nc = await nats.connect(**kwargs)
    except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
        # NATS_URL may carry credentials (user:password@, token@): never in an error line
        raise StoreUnavailable(f"cannot connect to NATS at {redact_url(url)}: "
                               f"{mask(str(e)) or type(e).__name__}") from None
    holder.append(nc)
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1  # ride out server restarts for ever
    return nc


def kit_for(settings: Settings, role: Role, url: str, agent_id: str | None = None,
            ns: Namespace | None = None) -> KitFiles | None:
    """Which credentials a connection of ``role`` uses: the kit given with ``--creds`` /
    ``CCC_CREDS``; else, for a server that requires TLS (``tls://``), the role's kit in
    the data dir's secure directory (where ``ccc up``/``server``/``secure init`` put
    them); else none. ``--insecure`` uses none."""
    if settings.insecure:
        return None
    if settings.creds:
        return KitFiles.load(settings.creds)
    if not url.startswith("tls://"):
        return None
    secure = SecureDir.of(settings.data_dir)
    ns = ns or Namespace(settings.namespace)
    return secure.kit(role, ns if role != "admin" else None, agent_id)


def streams_of(role: Role, ns: Namespace) -> tuple[str, ...] | None:
    """The streams a role works with (and may look at): None is all of them."""
    if role == "webhook":
        return (ns.issues_stream,)
    if role == "agent":
        return (ns.events_stream, ns.heartbeats_stream)
    return None


async def register_local_agent(settings: Settings, url: str, ns: Namespace, agent_id: str) -> None:
    """``ccc agent`` on the server's machine: register the agent in the data dir's secure
    directory if it is new (the server reloads its users), and, as admin, provision its
    artifact bucket. A remote agent brings a kit instead (``ccc secure add-agent``)."""
    from infra.adapters.nats.provisioning import provision_agent

    if settings.insecure or settings.creds or not url.startswith("tls://"):
        return
    secure = SecureDir.of(settings.data_dir)
    if not secure.exists():
        return
    if not any(k.agent_id == agent_id and k.namespace == ns.prefix for k in secure.agents()):
        secure.add_agent(ns, agent_id)
        reload_server(settings.data_dir)
    admin = await connect_when_admitted(url, name="ccc-agent-admin", settings=settings, role="admin",
                                        reconnect=False)
    try:
        await provision_agent(admin, ns, agent_id, replicas=settings.replicas)
    finally:
        await admin.close()


async def server_alive(url: str, settings: Settings, *, name: str = "ccc-probe", attempts: int = 4) -> bool:
    """Is a server listening at ``url``? Only a refused connection means no: a connection
    cut during a config reload (an agent was just added or revoked) or a slow handshake on
    a loaded machine is asked again, since "no" makes the caller start a server of its own."""
    for attempt in range(attempts):
        try:
            nc = await connect(url, name=name, settings=settings, connect_timeout=2.0, reconnect=False,
                               quiet=True, role="cli")  # any reader will do
        except StoreUnavailable as e:
            if "refused" in str(e).lower() or "connect call failed" in str(e).lower():
                return False
            if attempt == attempts - 1:
                return False
            await asyncio.sleep(0.25 * (attempt + 1))
        else:
            await nc.close()
            return True
    return False


async def _close_quietly(nc: Client) -> None:
    with contextlib.suppress(Exception):
        await nc.close()


async def connect_when_admitted(url: str, *, timeout: float = 10.0, **kwargs) -> Client:
    """Connect, retrying while the server refuses the user for a few seconds: a user just
    added is admitted once the server has reloaded its config (SIGHUP is asynchronous)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await connect(url, **kwargs)
        except StoreUnavailable as e:
            # refused (not reloaded yet), or cut off by the reload itself: nats-server
            # reloading its TLS and users drops a handshake in progress, which surfaces as
            # any of a lost connection, EOF, reset, broken pipe or an SSL error
            transient = any(w in str(e).lower() for w in TRANSIENT_CONNECT_ERRORS)
            if not transient or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def embedded_url_file(data_dir: Path) -> Path:
    return data_dir / "nats.url"


@asynccontextmanager
async def open_nats(
    settings: Settings, *, name: str = "ccc", role: Role = "cli", ns: Namespace | None = None,
    agent_id: str | None = None,
) -> AsyncIterator[Client]:
    """A connection of ``role`` for one CLI command: ``NATS_URL`` if given, otherwise the
    embedded server of ``data_dir``, which is started (and provisioned) for the command if
    it is not running. With ``ns``, the streams of that namespace are there when it yields."""
    from infra.adapters.nats.server import EmbeddedServer  # local: only needed without NATS_URL

    from infra.adapters.nats.provisioning import provision, provision_agent, require_streams

    server = None
    url = settings.nats_url
    if url is None:
        url_file = embedded_url_file(settings.data_dir)
        if url_file.is_file():
            url = url_file.read_text().strip()
            if not await server_alive(url, settings, name=name):
                url = None  # stale file: the server is gone
        if url is None:
            own = ns or Namespace(settings.namespace)
            server = EmbeddedServer.for_settings(settings, own)
            url = server.start()
            # a server of our own: provisioning is ours to do, as admin
            admin = await connect(url, name=f"{name}-admin", settings=settings, role="admin")
            try:
                await provision(admin, own, replicas=settings.replicas)
            finally:
                await admin.close()
    if role == "agent" and agent_id and server is None:
        await register_local_agent(settings, url, Namespace(settings.namespace), agent_id)
    kit = kit_for(settings, role, url, agent_id, ns)
    nc = await connect_when_admitted(url, name=name, settings=settings, kit=kit)
    try:
        if ns is not None and server is None:
            if kit is None or kit.kit.role == "admin":
                # admin, or no credentials (--insecure, or a server without security:
                # anyone may administer): provisioning is idempotent
                await provision(nc, ns, replicas=settings.replicas)
                if role == "agent" and agent_id:
                    await provision_agent(nc, ns, agent_id, replicas=settings.replicas)
            else:
                # the admin's step (ccc server / up / secure init): a missing stream is
                # reported by name
                await require_streams(nc, ns, streams_of(kit.kit.role, ns))
        yield nc
    finally:
        try:
            await nc.drain()
        except Exception:  # noqa: BLE001 - closing is best effort
            await nc.close()
        if server is not None:
            server.stop()
