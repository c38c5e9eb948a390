"""``ccc up`` as an object: the embedded nats-server (unless a URL is given), one
coordinator, N local agents and the status API, in one process.

Each part is the same actor a multi-host deployment runs; only the wiring is local.
Agents on other machines join with ``ccc agent --nats-url ...``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import structlog
from nats.aio.client import Client

from actors.agent import Agent, AgentConfig
from actors.coordinator import Coordinator, CoordinatorConfig
from actors.pipeline import PipelineSettings
from events.errors import ConfigError
from events.subjects import Namespace
from events.task import SPECIALTIES

from .coders.base import Coder
from .coders.scripted import ScriptedCoder
from .forge import LocalForgeClient
from .nats_conn import connect, embedded_url_file
from .nats_server import EmbeddedServer
from .provision import provision
from .settings import Settings

log = structlog.get_logger("ccc.cluster")


class ClusterOptions(msgspec.Struct, frozen=True, kw_only=True):
    agents: int = 3
    specialties: tuple[str, ...] = ("backend", "frontend", "general")
    capacity: int = 1
    api_port: int | None = 8080  # None: no status API
    coder: str = "scripted"
    script_dir: str | None = None
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    retry_base: float = 5.0
    retry_max: float = 300.0
    max_attempts: int = 3
    test_timeout: float = 600.0
    agent_prefix: str = "agent"


def parse_specialties(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in SPECIALTIES]
    if not items or bad:
        raise ConfigError(f"--specialties: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(SPECIALTIES)}")
    return items


def make_coder(kind: str, script_dir: str | None) -> Coder:
    if kind == "scripted":
        return ScriptedCoder(Path(script_dir) if script_dir else None)
    raise ConfigError(f"--coder {kind!r}: this build has 'scripted'")


class LocalCluster:
    def __init__(self, settings: Settings, ns: Namespace, options: ClusterOptions) -> None:
        if options.agents < 0:
            raise ConfigError("--agents must be >= 0")
        self.settings = settings
        self.ns = ns
        self.options = options
        self.server: EmbeddedServer | None = None
        self.nc: Client | None = None
        self.coordinator: Coordinator | None = None
        self.agents: list[Agent] = []
        self.api = None
        self.url = settings.nats_url or ""
        self._url_file: Path | None = None

    @property
    def forge_root(self) -> Path:
        return self.settings.data_dir / "forge"

    @property
    def workspace_root(self) -> Path:
        return self.settings.data_dir / "workspaces"

    async def start(self) -> None:
        s, o = self.settings, self.options
        if s.nats_url is None:
            self.server = EmbeddedServer(s.data_dir, sync_interval=s.sync_interval)
            self.url = self.server.start()
            self._url_file = embedded_url_file(s.data_dir)
            tmp = self._url_file.with_suffix(".tmp")
            tmp.write_text(self.url + "\n")
            tmp.replace(self._url_file)
        self.nc = await connect(self.url, name="ccc-up", settings=s)
        await provision(self.nc, self.ns, replicas=s.replicas)
        self.coordinator = Coordinator(self.nc, self.ns, CoordinatorConfig(
            heartbeat_timeout=o.heartbeat_timeout, retry_base=o.retry_base, retry_max=o.retry_max,
            max_attempts=o.max_attempts))
        await self.coordinator.start()
        for i in range(o.agents):
            specialty = o.specialties[i % len(o.specialties)]
            agent = Agent(self.nc, self.ns, AgentConfig(
                agent_id=f"{o.agent_prefix}-{i + 1}-{specialty}", specialties=(specialty,),
                capacity=o.capacity, heartbeat_interval=o.heartbeat_interval,
                pipeline=PipelineSettings(workspace_root=str(self.workspace_root),
                                          test_timeout=o.test_timeout),
            ), coder=make_coder(o.coder, o.script_dir), forge=LocalForgeClient(self.forge_root))
            await agent.start()
            self.agents.append(agent)
        if o.api_port is not None:
            from .api_server import ApiServer

            self.api = ApiServer(self.coordinator.store, s.api_host, o.api_port, materialize=True)
            await self.api.start()
        log.info("cluster.up", nats=self.url, agents=len(self.agents),
                 api=self.api.url if self.api else None)

    async def stop(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.stop()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.stop()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                await self.coordinator.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self._url_file is not None and self._url_file.is_file():
            with contextlib.suppress(OSError):
                if self._url_file.read_text().strip() == self.url:
                    self._url_file.unlink()
        if self.server is not None:
            self.server.stop()

    async def __aenter__(self) -> "LocalCluster":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
