"""The security of a ``ccc chaos`` run: the suite runs the cluster as it is deployed, so
by default with everything issue 10 turns on (``--insecure`` keeps the old mode).

One secure directory per run (``<sandbox>/nats/secure``, made by :meth:`SecureDir.init`):
the server (or every node of the 3-node cluster) requires mutual TLS and the users of its
``auth.conf``, and encrypts its store. Who connects how:

* the harness (publishing issues, poison, following the log, reading it back): admin;
* a coordinator (``ccc up --agents 0 --nats-url``): its data dir's ``secure`` is this
  directory (a symlink, as for a ``ccc up`` on the server's machine), so it provisions
  as admin and runs the coordinator with the coordinator's own credentials: a
  permission the coordinator lacks shows up under faults, not hidden behind admin's;
* an agent (``ccc agent --creds <kit>``): its own kit, registered while the cluster runs
  (:meth:`ChaosSecurity.register_agent`: user added, its artifact bucket provisioned
  as admin, every node reloaded, and admitted by every node before it starts), the way
  ``ccc secure add-agent`` adds a remote agent;
* ``ccc dead-letters`` (the poison scenario): the CLI user's kit.

Every run also checks that the server really refuses strangers
(:meth:`ChaosSecurity.strangers_refused`): a suite that silently ran without security
would prove nothing about the secure cluster.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client

from events.subjects import Namespace

from infra.adapters.nats.connection import connect, connect_when_admitted
from infra.adapters.nats.permissions import Role
from infra.adapters.nats.provisioning import provision_agent
from infra.adapters.nats.secure import KitFiles, SecureDir, user_id

ADMISSION_TIMEOUT = 10.0  # a node applies a reloaded user list within milliseconds; this is slack


class ChaosSecurity:
    """The credentials of one run, and what the harness does with them."""

    def __init__(self, data_dir: Path, ns: Namespace) -> None:
        self.ns = ns
        self.secure = SecureDir.of(data_dir)
        self.secure.init(ns)

    @property
    def js_key(self) -> str:
        return self.secure.js_key()

    def kit(self, role: Role, agent_id: str | None = None) -> KitFiles:
        return self.secure.kit(role, None if role == "admin" else self.ns, agent_id)

    def creds_args(self, role: Role, agent_id: str | None = None) -> list[str]:
        """``--creds <kit>``: the global option that makes a ``ccc`` process connect as
        ``role`` (an agent's kit exists once :meth:`register_agent` has run)."""
        return ["--creds", str(self.secure.kit_dir(user_id(role, None if role == "admin" else self.ns, agent_id)))]

    def share_with(self, data_dir: Path) -> None:
        """Make ``data_dir`` (a coordinator's) find this run's credentials where a
        ``ccc up --nats-url`` looks for them: ``<data-dir>/secure``."""
        link = data_dir / "secure"
        if not link.exists():
            link.symlink_to(self.secure.path, target_is_directory=True)

    async def connect_admin(self, url: str, name: str) -> Client:
        return await connect(url, name=name, quiet=True, kit=self.kit("admin"))

    async def register_agent(self, admin: Client, url: str, agent_id: str, *, replicas: int,
                             reload: Callable[[], object]) -> KitFiles:
        """Add ``agent_id`` to the running cluster: its user (``auth.conf``), its artifact
        bucket (an admin step), a reload of every node; returns once every node admits
        it, so the agent process never races the (asynchronous) reload."""
        kit = self.secure.add_agent(self.ns, agent_id)
        await provision_agent(admin, self.ns, agent_id, replicas=replicas)
        reload()
        for node in url.split(","):
            # every node, so the agent process never races the (asynchronous) reload
            nc = await connect_when_admitted(node, timeout=ADMISSION_TIMEOUT, name=f"chaos-admit-{agent_id}",
                                             kit=kit, reconnect=False, quiet=True)
            await nc.close()
        return kit

    async def strangers_refused(self, url: str) -> list[str]:
        """Violations if any node lets in a client without a certificate, a client with a
        valid certificate but no user, or a plain-text client."""
        cli = self.kit("cli")
        no_cert = ssl.create_default_context(cafile=str(cli.ca))
        cert_only = ssl.create_default_context(cafile=str(cli.ca))
        cert_only.load_cert_chain(str(cli.cert), str(cli.key))
        seed = cli.seed.read_text().strip()
        out = []
        for node in url.split(","):
            for what, server, kwargs in (
                ("a client without a certificate", node, {"tls": no_cert, "nkeys_seed_str": seed}),
                ("a client with a certificate but no user", node, {"tls": cert_only}),
                ("a plain-text client", node.replace("tls://", "nats://", 1), {}),
            ):
                if await _admitted(server, **kwargs):
                    out.append(f"security: {node} admitted {what}")
        return out


async def _admitted(url: str, **kwargs) -> bool:
    async def quiet(_: Exception) -> None:
        pass

    try:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2.0,
                                error_cb=quiet, **kwargs)
    except (nats.errors.Error, OSError, ssl.SSLError, asyncio.TimeoutError):
        return False  # refused: by the TLS handshake or by the authorization
    await nc.close()
    return True
