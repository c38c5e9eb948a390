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
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import nats.errors
from nats.aio.client import Client

from events.errors import StoreUnavailable

from infra.adapters.nats.server import server_binary
from infra.adapters.git.processes import kill, terminate


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

    def write_config(self, cluster_name: str, route_ports: list[int], sync_interval: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in route_ports)
        self.config_path.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "127.0.0.1:{self.port}"\n'
            "max_payload: 1MB\n"
            "jetstream {\n"
            f'  store_dir: "{self.dir / "jetstream"}"\n'
            f"  sync_interval: {sync_interval}\n"
            "  max_memory_store: 256MB\n"
            "  max_file_store: 4GB\n"
            "}\n"
            "cluster {\n"
            f'  name: "{cluster_name}"\n'
            f'  listen: "127.0.0.1:{self.cluster_port}"\n'
            f"  routes: [{routes}]\n"
            "}\n"
        )


class NatsCluster:
    """Three (or ``size``) nats-server processes forming one JetStream cluster."""

    def __init__(self, root: Path | str, *, size: int = 3, name: str = "ccc-local",
                 sync_interval: str = "always") -> None:
        self.root = Path(root)
        self.name = name
        self.sync_interval = sync_interval
        ports = free_ports(2 * size)
        self.nodes = [Node(f"n{i + 1}", self.root, ports[2 * i], ports[2 * i + 1]) for i in range(size)]
        routes = [n.cluster_port for n in self.nodes]
        for node in self.nodes:
            node.write_config(name, routes, sync_interval)

    @property
    def url(self) -> str:
        """Every node, comma-separated: what ``--nats-url`` / ``NATS_URL`` takes."""
        return ",".join(n.url for n in self.nodes)

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
        node.proc = subprocess.Popen(
            [server_binary(), "-c", str(node.config_path), "-l", str(node.log_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
