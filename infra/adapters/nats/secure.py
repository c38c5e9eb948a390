"""The secure directory: everything the bus's security is made of, in one place on disk.

Why a generated server config of nkey users, not NATS's decentralised JWT auth: one
machine (or one operator) owns the cluster, so an operator/account hierarchy and a
resolver would add moving parts without adding a trust boundary; nkey users give the same
per-user permissions and challenge-response authentication (the seed never leaves the
client), and nats-server applies a changed user list on a config *reload* — an added
agent may connect at once, a removed one is disconnected at once — with no restart.

``<data-dir>/secure/`` (mode 0700; every secret 0600)::

    ca.pem, ca-key.pem          the cluster's CA (mutual TLS)
    server.pem, server-key.pem  the server certificate (loopback, this host, --host names)
    js.key                      the JetStream encryption key (encryption at rest)
    users.json                  the registry: user -> role, namespace, agent id, nkey
    auth.conf                   generated from the registry; the server config includes it
    users/<user>/               one kit per user: user.nk (its nkey seed), cert.pem,
                                key.pem, ca.pem, kit.json (role, namespace, inbox prefix)

A kit is all a process needs to connect as its user: ``ccc secure add-agent`` writes one
for a remote machine (``ccc agent --creds <kit>``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
from pathlib import Path

import msgspec
import nkeys

from events.errors import ConfigError
from events.subjects import Namespace, check_id

from infra.adapters.nats.permissions import (
    ROLES,
    Permissions,
    Role,
    inbox_prefix,
    permissions_for,
)
from infra.adapters.nats.pki import CertificateAuthority, default_server_hosts, write_private

# The roles every namespace gets at init; agents are added one by one.
SERVICE_ROLES: tuple[Role, ...] = ("coordinator", "webhook", "cli", "status", "ci")


class Kit(msgspec.Struct, frozen=True, kw_only=True):
    """What one process needs to connect as one user (``users/<user>/kit.json``)."""

    user: str
    role: Role
    namespace: str = ""
    agent_id: str | None = None
    inbox_prefix: str
    public_key: str


class KitFiles(msgspec.Struct, frozen=True, kw_only=True):
    """A kit on disk, as :func:`infra.adapters.nats.connection.connect` uses it."""

    kit: Kit
    seed: Path
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def load(cls, directory: Path | str) -> KitFiles:
        d = Path(directory)
        try:
            kit = msgspec.json.decode((d / "kit.json").read_bytes(), type=Kit)
        except FileNotFoundError:
            raise ConfigError(f"{d}: not a credentials kit (no kit.json; `ccc secure add-agent` writes one)") from None
        except msgspec.DecodeError as e:
            raise ConfigError(f"{d / 'kit.json'}: {e}") from None
        files = cls(kit=kit, seed=d / "user.nk", cert=d / "cert.pem", key=d / "key.pem", ca=d / "ca.pem")
        for f in (files.seed, files.cert, files.key, files.ca):
            if not f.is_file():
                raise ConfigError(f"credentials kit {d}: {f.name} is missing")
        return files


def user_id(role: Role, ns: Namespace | None, agent_id: str | None = None) -> str:
    """A user's directory name: ``admin``, ``ccc.coordinator``, ``ccc.agent.agent-1``."""
    if role == "admin":
        return "admin"
    assert ns is not None
    return f"{ns.prefix}.agent.{check_id(agent_id or '', 'agent id')}" if role == "agent" else f"{ns.prefix}.{role}"


class SecureDir:
    """The secure directory of a data dir. Create it with :meth:`init` (idempotent)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, data_dir: Path | str) -> SecureDir:
        return cls(Path(data_dir) / "secure")

    # -- files -------------------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.path / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.path / "server-key.pem"

    @property
    def js_key_file(self) -> Path:
        return self.path / "js.key"

    @property
    def auth_conf(self) -> Path:
        return self.path / "auth.conf"

    @property
    def registry(self) -> Path:
        return self.path / "users.json"

    def kit_dir(self, user: str) -> Path:
        return self.path / "users" / user

    def exists(self) -> bool:
        return self.registry.is_file() and self.ca_cert.is_file() and self.server_cert.is_file()

    # -- creating ----------------------------------------------------------------------
    def init(self, ns: Namespace, *, hosts: tuple[str, ...] = ()) -> list[str]:
        """Create what is missing: CA, server certificate, encryption key, the admin
        user and the service users of ``ns``. Returns the users created. Running it
        again changes nothing that exists (certificates and keys are never rotated
        behind the operator's back)."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        created: list[str] = []
        if not (self.ca_cert.is_file() and self.ca_key.is_file()):
            CertificateAuthority.create(self.ca_cert, self.ca_key)
        if not self.server_cert.is_file() or hosts:
            self._ca().issue(self.server_cert, self.server_key, common_name="ccc nats-server", server=True,
                             hosts=default_server_hosts(hosts))
        if not self.js_key_file.is_file():
            write_private(self.js_key_file, secrets.token_hex(32).encode())
        for role in ("admin", *SERVICE_ROLES):
            user = user_id(role, ns)
            if user not in self._users():
                self._add_user(role, ns if role != "admin" else None)
                created.append(user)
        self.render()
        return created

    def add_agent(self, ns: Namespace, agent_id: str) -> KitFiles:
        """Register agent ``agent_id`` (or return its kit if registered) and regenerate
        the server's user list; a running server picks it up on :meth:`reload`."""
        self._require()
        user = user_id("agent", ns, agent_id)
        if user not in self._users():
            self._add_user("agent", ns, agent_id)
            self.render()
        return KitFiles.load(self.kit_dir(user))

    def add_agents(self, ns: Namespace, agent_ids: list[str]) -> list[str]:
        """Register many agents at once (those not registered yet) and regenerate the
        server's user list once: one :meth:`add_agent` per agent re-renders every user
        each time, which for a thousand agents (``ccc bench dispatch``) takes ~30 s
        instead of ~5. Returns the users created."""
        self._require()
        wanted = {agent_id: user_id("agent", ns, agent_id) for agent_id in agent_ids}  # all ids valid first
        users = self._users()
        created = []
        for agent_id, user in wanted.items():
            if user not in users:
                users[user] = self._add_user("agent", ns, agent_id)
                created.append(user)
        if created:
            self.render()
        return created

    def revoke_agent(self, ns: Namespace, agent_id: str) -> bool:
        """Remove the agent's user and kit. False if it was not registered."""
        self._require()
        user = user_id("agent", ns, agent_id)
        users = self._users()
        if user not in users:
            return False
        del users[user]
        self._save(users)
        shutil.rmtree(self.kit_dir(user), ignore_errors=True)
        self.render()
        return True

    def kit(self, role: Role, ns: Namespace | None = None, agent_id: str | None = None) -> KitFiles:
        self._require()
        user = user_id(role, ns, agent_id)
        if user not in self._users():
            raise ConfigError(f"no {role} credentials for namespace {ns.prefix if ns else ''!r} in {self.path}"
                              + (" (`ccc secure add-agent`)" if role == "agent" else " (`ccc secure init`)"))
        return KitFiles.load(self.kit_dir(user))

    def users(self) -> list[Kit]:
        return sorted(self._users().values(), key=lambda k: k.user)

    def agents(self) -> list[Kit]:
        return [k for k in self.users() if k.role == "agent"]

    def js_key(self) -> str:
        return self.js_key_file.read_text().strip()

    # -- the server's view ---------------------------------------------------------------
    def render(self) -> None:
        """Write ``auth.conf``: one nkey user per registered user, with its permissions."""
        blocks = []
        for kit in sorted(self._users().values(), key=lambda k: k.user):
            ns = Namespace(kit.namespace) if kit.namespace else Namespace()
            perms = permissions_for(kit.role, ns, kit.agent_id)
            blocks.append(f"    # {kit.user}\n    {{ nkey: {kit.public_key}, permissions: {_conf(perms)} }}")
        text = ("# Generated by `ccc secure` from users.json: edit with `ccc secure`, not by hand.\n"
                "authorization {\n  timeout: 2\n  users: [\n" + ",\n".join(blocks) + "\n  ]\n}\n")
        tmp = self.auth_conf.with_suffix(".tmp")
        write_private(tmp, text.encode())
        tmp.replace(self.auth_conf)

    def server_config(self) -> str:
        """The security part of the server config: mutual TLS (every client presents a
        certificate signed by this CA) and the users. ``include`` paths are relative
        to the including file, which lives in this directory."""
        return (
            "tls {\n"
            f'  cert_file: "{self.server_cert}"\n  key_file: "{self.server_key}"\n'
            f'  ca_file: "{self.ca_cert}"\n  verify: true\n  timeout: 3\n'
            "}\n"
            'include "auth.conf"\n'
        )

    # -- internals -----------------------------------------------------------------------
    def _require(self) -> None:
        if not self.exists():
            raise ConfigError(f"{self.path} holds no cluster credentials: run `ccc secure init`")

    def _ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_cert, self.ca_key)

    def _users(self) -> dict[str, Kit]:
        if not self.registry.is_file():
            return {}
        return {k.user: k for k in msgspec.json.decode(self.registry.read_bytes(), type=list[Kit])}

    def _save(self, users: dict[str, Kit]) -> None:
        tmp = self.registry.with_suffix(".tmp")
        write_private(tmp, msgspec.json.format(msgspec.json.encode(sorted(users.values(), key=lambda k: k.user))))
        tmp.replace(self.registry)

    def _add_user(self, role: Role, ns: Namespace | None, agent_id: str | None = None) -> Kit:
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}")
        user = user_id(role, ns, agent_id)
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
        public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        kit = Kit(user=user, role=role, namespace=ns.prefix if ns else "", agent_id=agent_id,
                  inbox_prefix=inbox_prefix(role, agent_id), public_key=public)
        d = self.kit_dir(user)
        d.parent.mkdir(mode=0o700, exist_ok=True)
        d.mkdir(mode=0o700, exist_ok=True)
        write_private(d / "user.nk", seed + b"\n")
        self._ca().issue(d / "cert.pem", d / "key.pem", common_name=user)
        shutil.copyfile(self.ca_cert, d / "ca.pem")
        write_private(d / "kit.json", msgspec.json.format(msgspec.json.encode(kit)))
        users = self._users()
        users[user] = kit
        self._save(users)
        return kit


def reload_server(data_dir: Path | str) -> list[int]:
    """Ask the embedded nats-server(s) of ``data_dir`` to reload their config (SIGHUP):
    added users may connect, removed ones are disconnected at once. Returns the pids
    signalled (none: no embedded server is running; the next start reads the files)."""
    pids = []
    for f in (Path(data_dir) / "ports").glob("*.ports"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            pid = int(f.stem.rsplit("_", 1)[-1])
            os.kill(pid, signal.SIGHUP)
            pids.append(pid)
    return pids


def _conf(p: Permissions) -> str:
    def section(allow: tuple[str, ...], deny: tuple[str, ...]) -> str:
        parts = [f"allow: {json.dumps(list(allow))}"]
        if deny:
            parts.append(f"deny: {json.dumps(list(deny))}")
        return "{ " + ", ".join(parts) + " }"

    return (f"{{ publish: {section(p.publish_allow, p.publish_deny)}, "
            f"subscribe: {section(p.subscribe_allow, p.subscribe_deny)} }}")
