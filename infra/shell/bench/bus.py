"""The benches' throwaway servers, one per security setting, and how each role of the
cast connects to them.

* off: plain TCP, no authentication, no permissions, the store unencrypted (what
  ``--insecure`` runs).
* on: what ``ccc up`` runs by default: mutual TLS (every client presents a certificate
  of the run's own CA), one nkey user per process with its role's permissions (the
  coordinator as ``coordinator``, every null agent as its own ``agent`` user, the
  driver publishing issues as ``cli``, provisioning as ``admin``), and the JetStream
  store encrypted with a generated key.

Every user is generated before the server starts (its first config has them all), so no
config reload or admission wait happens during a run. A thousand agent users take a few
seconds to generate (a key pair, a certificate and a seed each), outside every measured
window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nats.aio.client import Client

from events.subjects import Namespace

from infra.adapters.nats.connection import connect
from infra.adapters.nats.permissions import Role
from infra.adapters.nats.secure import KitFiles, SecureDir, user_id
from infra.adapters.nats.server import EmbeddedServer

SECURITY_CHOICES = ("both", "off", "on")
DESCRIPTION = {
    "off": "plain TCP, no authentication, store unencrypted",
    "on": "mutual TLS, nkey users with role permissions, store encrypted (chachapoly)",
}


def sides_of(security: str) -> tuple[str, ...]:
    """``both`` -> ``("off", "on")``: off first, it is the reference of the ratios."""
    if security not in SECURITY_CHOICES:
        raise ValueError(f"security must be one of {', '.join(SECURITY_CHOICES)}, not {security!r}")
    return ("off", "on") if security == "both" else (security,)


class BenchBus:
    """One throwaway nats-server with security ``off`` or ``on``, in ``workdir``."""

    def __init__(self, workdir: Path, security: str, sync_interval: str) -> None:
        if security not in ("off", "on"):
            raise ValueError(f"a bench server's security is off or on, not {security!r}")
        self.security = security
        self.workdir = workdir
        self.secure = SecureDir(workdir / "secure") if security == "on" else None
        self.sync_interval = sync_interval
        self.server: EmbeddedServer | None = None
        self.url = ""
        self.users = 0  # nkey users the server started with (0: no authentication)

    @property
    def on(self) -> bool:
        return self.secure is not None

    @property
    def description(self) -> str:
        return DESCRIPTION[self.security]

    @property
    def server_pid(self) -> int | None:
        proc = self.server.proc if self.server is not None else None
        return proc.pid if proc is not None else None

    def register(self, ns: Namespace, agent_ids: Sequence[str] = ()) -> None:
        """The users of namespace ``ns`` (its service roles and these agents). Before
        :meth:`start`: the server reads them once, at start."""
        if self.secure is None:
            return
        if self.server is not None:
            raise RuntimeError("register every user before the bench server starts")
        self.secure.init(ns)
        if agent_ids:
            self.secure.add_agents(ns, list(agent_ids))

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure is not None and not self.secure.exists():
            self.secure.init(Namespace())  # at least the admin user (raw baselines)
        key = self.secure.js_key() if self.secure is not None else ""
        self.users = len(self.secure.users()) if self.secure is not None else 0
        self.server = EmbeddedServer(self.workdir / "nats", sync_interval=self.sync_interval,
                                     secure=self.secure, js_key=key, name=f"ccc-bench-{self.security}")
        self.url = self.server.start()
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def kit(self, role: Role, ns: Namespace | None = None, agent_id: str | None = None) -> KitFiles | None:
        """The credentials of that user (None with security off). Loaded straight from
        its directory: :meth:`SecureDir.kit` re-reads the whole registry per call, which a
        thousand agents would make quadratic."""
        if self.secure is None:
            return None
        return KitFiles.load(self.secure.kit_dir(user_id(role, None if role == "admin" else ns, agent_id)))

    def kit_path(self, role: Role, ns: Namespace | None = None, agent_id: str | None = None) -> Path | None:
        kit = self.kit(role, ns, agent_id)
        return kit.seed.parent if kit is not None else None

    async def connect(self, role: Role, ns: Namespace | None = None, agent_id: str | None = None, *,
                      name: str) -> Client:
        """A connection as that role's user (with security off, a plain one: the same
        number of connections either way, so only the security differs)."""
        return await connect(self.url, name=name, kit=self.kit(role, ns, agent_id))
