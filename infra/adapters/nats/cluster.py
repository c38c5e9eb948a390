"""A 3-node JetStream cluster on loopback, for fault tests (``ccc chaos``) and for
trying R3 streams on one machine.

Each node gets its own generated config (``server_name``, client ``listen``,
``cluster { name, listen, routes }``, JetStream with its own ``store_dir`` and
``sync_interval: always``), its own log and its own process. Ports are chosen once
(free loopback ports) and kept, so a killed node restarts on the same ports and data
dir and rejoins with its state, like a rebooted host.

    with NatsCluster(tmp) as c:            # starts 3 nodes, waits for a meta leader
        url = c.url                        # "nats://127.0.0.1:a,nats://127.0.0.1:b,..."
        leader = await stream_leader(nc, "CCC_EVENTS")
        c.kill(leader)                     # SIGKILL
        c.start_node(leader)               # same ports, same store

With ``secure=SecureDir`` (what ``ccc chaos`` runs by default) every node is as
secure as the embedded server: the client port requires mutual TLS (the secure
directory's server certificate and CA) and the users of its ``auth.conf``, the store
is encrypted with ``js_key``, and the routes between the nodes are TLS with mutual
verification too. The routes trust a CA of their own (``<root>/routes/``: one
certificate per node), not the clients' CA: every agent holds a client certificate
signed by the clients' CA, and with one CA for both an agent's kit could join the
cluster as a route and bypass its permissions. Adding or removing a user is
``SecureDir.add_agent`` / ``revoke_agent`` and :meth:`NatsCluster.reload` (SIGHUP to
every node), with no restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import msgspec
import nats.errors
from nats.aio.client import Client

from events.errors import ConfigError, StoreUnavailable

from infra.adapters.nats.pki import CertificateAuthority
from infra.adapters.nats.secure import SecureDir
from infra.adapters.nats.server import server_binary
from infra.adapters.git.processes import kill, terminate

# Every node listens on loopback: its route certificate is valid for these names.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class NodeSecurity(msgspec.Struct, frozen=True, kw_only=True):
    """What a secure node's config points at: the client side (the secure directory's
    server certificate, CA and users) and its route identity (a certificate of the
    routes' own CA). ``encrypted``: the store's cipher key is in ``$CCC_JS_KEY``."""

    secure: SecureDir
    route_cert: Path
    route_key: Path
    route_ca: Path
    encrypted: bool


class Node:
    def __init__(self, name: str, root: Path, port: int, cluster_port: int) -> None:
        self.name = name
        self.dir = root / name
        self.port = port
        self.cluster_port = cluster_port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "nats-server.conf"

    @property
    def log_file(self) -> Path:
        return self.dir / "nats-server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def write_config(self, cluster_name: str, route_ports: list[int], sync_interval: str,
                     security: NodeSecurity | None = None) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in route_ports)
        # the key itself is never written here: the node reads it from its environment
        cipher = "  cipher: chachapoly\n  key: $CCC_JS_KEY\n" if security and security.encrypted else ""
        client_tls = route_tls = ""
        if security is not None:
            s = security.secure
            # nats-server joins an include path to the including file's directory (an
            # absolute path would be joined too), so the users are named relative to it
            auth = os.path.relpath(s.auth_conf, self.dir)
            client_tls = (
                "tls {\n"
                f'  cert_file: "{s.server_cert}"\n  key_file: "{s.server_key}"\n'
                f'  ca_file: "{s.ca_cert}"\n  verify: true\n  timeout: 3\n'
                "}\n"
                f'include "{auth}"\n'
            )
            route_tls = (
                "  tls {\n"
                f'    cert_file: "{security.route_cert}"\n    key_file: "{security.route_key}"\n'
                f'    ca_file: "{security.route_ca}"\n    verify: true\n    timeout: 3\n'
                "  }\n"
            )
        self.config_path.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "127.0.0.1:{self.port}"\n'
            "max_payload: 1MB\n"
            "jetstream {\n"
            f'  store_dir: "{self.dir / "jetstream"}"\n'
            f"  sync_interval: {sync_interval}\n"
            f"{cipher}"
            "  max_memory_store: 256MB\n"
            "  max_file_store: 4GB\n"
            "}\n"
            f"{client_tls}"
            "cluster {\n"
            f'  name: "{cluster_name}"\n'
            f'  listen: "127.0.0.1:{self.cluster_port}"\n'
            f"  routes: [{routes}]\n"
            f"{route_tls}"
            "}\n"
        )


class NatsCluster:
    """Three (or ``size``) nats-server processes forming one JetStream cluster."""

    def __init__(self, root: Path | str, *, size: int = 3, name: str = "ccc-local",
                 sync_interval: str = "always", secure: SecureDir | None = None, js_key: str = "") -> None:
        """``secure``: mutual TLS and the users of that (initialised) secure directory on
        the client port, TLS on the routes; None: neither. ``js_key``: encrypt every
        node's store with it (empty: no encryption)."""
        if secure is not None and not secure.exists():
            raise ConfigError(f"{secure.path} holds no cluster credentials: SecureDir.init it first")
        self.root = Path(root)
        self.name = name
        self.sync_interval = sync_interval
        self.secure = secure
        self.js_key = js_key
        ports = free_ports(2 * size)
        self.nodes = [Node(f"n{i + 1}", self.root, ports[2 * i], ports[2 * i + 1]) for i in range(size)]
        routes = [n.cluster_port for n in self.nodes]
        for node in self.nodes:
            node.write_config(name, routes, sync_interval, self._node_security(node))

    @property
    def routes_dir(self) -> Path:
        return self.root / "routes"

    def _node_security(self, node: Node) -> NodeSecurity | None:
        """The node's route certificate, from the routes' CA (both made on first use and
        kept: a node restarted with a new ``NatsCluster`` on the same root still joins)."""
        if self.secure is None:
            return None
        d = self.routes_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_cert, ca_key = d / "ca.pem", d / "ca-key.pem"
        if ca_cert.is_file() and ca_key.is_file():
            ca = CertificateAuthority.load(ca_cert, ca_key)
        else:
            ca = CertificateAuthority.create(ca_cert, ca_key)
        cert, key = d / f"{node.name}.pem", d / f"{node.name}-key.pem"
        if not (cert.is_file() and key.is_file()):
            # server and client usages: a route is dialled by one node and accepted by another
            ca.issue(cert, key, common_name=f"ccc route {node.name}", server=True, hosts=LOOPBACK)
        return NodeSecurity(secure=self.secure, route_cert=cert, route_key=key, route_ca=ca_cert,
                            encrypted=bool(self.js_key))

    @property
    def url(self) -> str:
        """Every node, comma-separated: what ``--nats-url`` / ``NATS_URL`` takes
        (``tls://`` when the nodes require it, as :class:`EmbeddedServer` says too)."""
        urls = (n.url for n in self.nodes)
        if self.secure is not None:
            urls = (u.replace("nats://", "tls://", 1) for u in urls)
        return ",".join(urls)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- processes -------------------------------------------------------------------
    def start_node(self, name: str, timeout: float = 15.0) -> None:
        node = self.node(name)
        if node.running:
            return
        env = dict(os.environ)
        if self.js_key:
            env["CCC_JS_KEY"] = self.js_key  # the config names it; it is never on disk here
        node.proc = subprocess.Popen(
            [server_binary(), "-c", str(node.config_path), "-l", str(node.log_file)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not _port_open(node.port):
            if node.proc.poll() is not None:
                raise StoreUnavailable(f"nats-server {name} exited with {node.proc.returncode}: "
                                       f"{self._log_tail(node)}", retryable=False)
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"nats-server {name} did not listen in {timeout}s")
            time.sleep(0.02)

    def start(self, timeout: float = 30.0) -> str:
        for node in self.nodes:
            self.start_node(node.name, timeout)
        return self.url

    def kill(self, name: str) -> None:
        """SIGKILL one node: no flush, no goodbye to its peers."""
        node = self.node(name)
        proc, node.proc = node.proc, None
        kill(proc)

    def stop_node(self, name: str, timeout: float = 10.0) -> None:
        node = self.node(name)
        proc, node.proc = node.proc, None
        terminate(proc, timeout)

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node.name)

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid is not None]

    def reload(self) -> list[str]:
        """Every running node re-reads its config (SIGHUP): a user added to or removed
        from the secure directory's ``auth.conf`` is admitted or dropped without a
        restart. Returns the nodes signalled (a stopped node reads it when it starts).
        The reload is asynchronous: a user just added may be refused for a moment."""
        done = []
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGHUP)
                done.append(node.name)
        return done

    @staticmethod
    def _log_tail(node: Node) -> str:
        try:
            return " | ".join(node.log_file.read_text().splitlines()[-3:])
        except OSError:
            return ""

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- JetStream API -------------------------------------------------------------------------
async def _api(nc: Client, subject: str, timeout: float) -> dict:
    msg = await nc.request(subject, b"", timeout=timeout)
    return json.loads(msg.data or b"{}")


async def wait_for_jetstream(nc: Client, timeout: float = 30.0) -> None:
    """Wait until the cluster has a JetStream meta leader (``$JS.API.INFO`` answers
    without an error), so streams can be created."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            info = await _api(nc, "$JS.API.INFO", 2.0)
            if "error" not in info:
                return
            last = str(info["error"])
        except (TimeoutError, nats.errors.Error) as e:
            last = f"{type(e).__name__}: {e}"
        await asyncio.sleep(0.2)
    raise StoreUnavailable(f"no JetStream meta leader after {timeout}s: {last}")


async def stream_leader(nc: Client, stream: str, timeout: float = 2.0) -> str | None:
    """The server name leading ``stream`` (``cluster.leader`` of
    ``$JS.API.STREAM.INFO.<stream>``), or None while there is none (an election)."""
    try:
        info = await _api(nc, f"$JS.API.STREAM.INFO.{stream}", timeout)
    except (TimeoutError, nats.errors.Error):
        return None
    if "error" in info:
        return None
    return (info.get("cluster") or {}).get("leader") or None


async def wait_for_leader(nc: Client, stream: str, *, not_: str | None = None,
                          timeout: float = 30.0) -> str:
    """Wait until ``stream`` has a leader (other than ``not_``); returns its name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader = await stream_leader(nc, stream)
        if leader and leader != not_:
            return leader
        await asyncio.sleep(0.1)
    raise StoreUnavailable(f"stream {stream} has no leader after {timeout}s")
