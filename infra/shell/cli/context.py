"""What the ``ccc`` commands share: :class:`CliState` (the ``ctx.obj`` of every
command: the global options, the settings, and how a command gets a provisioned
connection), :func:`run_async`, and whether a NATS server is there to talk to.

Every command that talks to NATS uses ``--nats-url`` / ``NATS_URL`` if given, otherwise
the embedded server of the data dir (the one ``ccc server`` runs, or one started for
the duration of the command), and provisions streams and buckets first (idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats.errors

from events.errors import ConfigError, StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace

from infra.adapters.nats.permissions import Role
from infra.adapters.nats.settings import Settings, load_settings


INSECURE_WARNING = ("warning: --insecure: the embedded nats-server runs without TLS and without users; "
                    "anyone who reaches its port can read and write every event")


class CliState:
    """The global options, and how a command gets a provisioned connection.

    The options are overrides: ``None`` leaves the setting to its environment
    variable and default (:func:`~infra.adapters.nats.settings.load_settings`)."""

    def __init__(self, *, nats_url: str | None, data_dir: str | None, namespace: str | None,
                 log_level: str, repos: str | None = None, creds: str | None = None,
                 insecure: bool | None = None) -> None:
        self._overrides = {"nats_url": nats_url, "data_dir": data_dir, "namespace": namespace,
                           "repos": repos, "creds": creds, "insecure": insecure}
        self.log_level = log_level
        self._settings: Settings | None = None

    def settings(self, **overrides) -> Settings:
        if overrides:
            return load_settings(**{**self._overrides, **overrides})
        if self._settings is None:
            self._settings = load_settings(**self._overrides)
        return self._settings

    @property
    def ns(self) -> Namespace:
        return Namespace(self.settings().namespace)  # validates: ConfigError

    def store(self, nc) -> EventStore:
        return EventStore(nc, self.ns, timeout=self.settings().request_timeout)

    def run(self, fn: Callable[[object], Awaitable], *, role: Role = "cli", agent_id: str | None = None) -> object:
        """Connect as ``role`` (``NATS_URL`` or the embedded server; the role's credentials),
        make sure the streams are there, ``await fn(nc)``."""
        from infra.adapters.nats.connection import open_nats

        settings, ns = self.settings(), self.ns

        async def go():
            if settings.nats_url:
                await probe(settings.nats_url, settings)
            else:
                await _drop_stale_url_file(settings)
            async with open_nats(settings, role=role, ns=ns, agent_id=agent_id) as nc:
                return await fn(nc)

        return run_async(go())


def run_async(coro: Awaitable) -> object:
    """``asyncio.run``, with failures of the NATS client that escaped as its own
    exception types turned into :class:`StoreUnavailable` (one line, exit 1)."""
    try:
        return asyncio.run(coro)
    except (nats.errors.Error, asyncio.TimeoutError) as e:
        from infra.adapters.obs.masking import mask  # the error may quote a URL with credentials

        raise StoreUnavailable(f"NATS: {type(e).__name__}: {mask(str(e))}") from None


async def probe(url: str, settings: Settings | None = None, timeout: float = 3.0) -> None:
    """Raise :class:`StoreUnavailable` quickly and quietly if ``url`` cannot be reached."""
    from infra.adapters.nats.connection import connect

    nc = await connect(url, name="ccc-probe", settings=settings, connect_timeout=timeout,
                       reconnect=False, quiet=True, role="cli")
    await nc.close()


async def reachable(url: str, settings: Settings) -> bool:
    from infra.adapters.nats.connection import server_alive

    return await server_alive(url, settings)


async def _drop_stale_url_file(settings: Settings) -> None:
    """A ``nats.url`` left by a ``ccc server`` that was killed: remove it, so the
    command starts its own embedded server (``open_nats`` would retry it forever)."""
    from infra.adapters.nats.connection import embedded_url_file

    url_file = embedded_url_file(settings.data_dir)
    try:
        url = url_file.read_text().strip()
    except OSError:
        return
    if not url or not await reachable(url, settings):
        url_file.unlink(missing_ok=True)


def require_running_nats(obj: CliState) -> None:
    """``agent`` and ``api`` join a running cluster. Without ``--nats-url`` and without
    a live server for the data dir, ``obj.run`` would start a private embedded server
    for the life of the command: an agent nobody can assign work to (the server writes
    no nats.url, so no other command finds it), on the same store dir that a later
    ``ccc up`` would open with a second server."""
    from infra.adapters.nats.connection import embedded_url_file

    settings = obj.settings()
    if settings.nats_url:
        return
    url_file = embedded_url_file(settings.data_dir)
    url = url_file.read_text().strip() if url_file.is_file() else ""
    if not url or not run_async(reachable(url, settings)):
        raise ConfigError(f"no cluster is running for data dir {settings.data_dir}: start `ccc up` "
                          "(or `ccc server`) with that data dir first, or pass --nats-url")


def nats_cli_flags(settings: Settings, ns: Namespace) -> str:
    """The `nats` CLI's flags to connect as the ``cli`` role of the data dir's secure
    cluster (its kit: CA, client certificate, nkey, inbox prefix); empty for --insecure."""
    from infra.adapters.nats.permissions import inbox_prefix
    from infra.adapters.nats.secure import SecureDir, user_id

    if settings.insecure:
        return ""
    secure = SecureDir.of(settings.data_dir)
    kit = secure.kit_dir(user_id("cli", ns))
    return (f" --tlsca {secure.ca_cert} --tlscert {kit}/cert.pem --tlskey {kit}/key.pem"
            f" --nkey {kit}/user.nk --inbox-prefix {inbox_prefix('cli')}")
