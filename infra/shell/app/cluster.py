"""The composition root: the one place that builds the concrete adapters (coder,
forge, workbench, artifacts, telemetry, analyser) and hands them to the actors through
the Protocols they declare (``actors.ports``). ``ccc up`` runs :class:`LocalCluster`,
``ccc agent`` runs one agent from :func:`build_agent`.

``ccc up`` as an object: the embedded nats-server (unless a URL is given), one
coordinator, N local agents and the status API, in one process.

Each part is the same actor a multi-host deployment runs; only the wiring is local.
Agents on other machines join with ``ccc agent --nats-url ...``.

Plugins (:mod:`infra.adapters.plugins`): a ``--coder``/``--forge``/``--analyser`` name that
is not built in is looked up in the ``ccc.coders``/``ccc.forges``/``ccc.analysers`` entry
points and checked against the actors' Protocol; the hook plugins the settings enable
run in one :class:`~infra.adapters.plugins.host.PluginHost` per process, handed to the
coordinator, the agents' pipelines and the forge sync as :class:`~actors.plugins.PluginHooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path

import msgspec
import structlog
from nats.aio.client import Client

from actors.agent import Agent, AgentConfig
from actors.analysis import Analyser, RuleAnalyser
from actors.coordinator import Coordinator, CoordinatorConfig
from actors.demand import DemandActor
from actors.forge_ci import ForgeCI
from actors.pipeline import PipelineSettings
from actors.plugins import NO_PLUGINS, PluginHooks
from actors.ports import Coder, ForgeClient
from events.errors import ConfigError, StoreUnavailable
from events.spend import Caps, parse_caps
from projections.fairness import FairnessPolicy
from projections.waits import Holds
from events.store import EventStore
from events.subjects import Namespace, check_repo
from events.task import SPECIALTIES
from events.trust import GITHUB, TrustPolicy

from infra.adapters.coders.scripted import ScriptedCoder
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from infra.adapters.forge.local_ci import LocalCIRunner
from infra.adapters.git.branches import GitBranches
from infra.adapters.git.sandbox import Sandbox, make_sandbox, parse_limits
from infra.adapters.git.workbench import GitWorkbench
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from infra.adapters.nats.cluster_config import BUDGET, FAIRNESS, update_setting, write_setting
from infra.adapters.nats.connection import connect, embedded_url_file
from infra.adapters.nats.demand import NatsDemandBoard
from infra.adapters.nats.permissions import Role
from infra.adapters.nats.provisioning import provision, provision_agent
from infra.adapters.nats.server import EmbeddedServer
from infra.adapters.nats.settings import Settings
from infra.adapters.obs.masking import mask_secrets, redact_url
from infra.adapters.obs.metrics import AgentMetrics
from infra.adapters.obs.telemetry import OtelTelemetry
from infra.adapters.plugins import discovery
from infra.adapters.plugins.host import PluginHost, process_key

log = structlog.get_logger("ccc.cluster")


class ClusterOptions(msgspec.Struct, frozen=True, kw_only=True):
    agents: int = 3
    specialties: tuple[str, ...] = ("backend", "frontend", "general")
    capacity: int = 1
    api_port: int | None = 8080  # None: no status API
    coder: str = "scripted"
    model: str | None = None
    analyser: str = "rules"
    forge: str = "local"
    script_dir: str | None = None
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    retry_base: float = 5.0
    retry_max: float = 300.0
    max_attempts: int = 3
    test_timeout: float = 600.0
    shutdown_grace: float = 10.0  # on stop, running tasks get this long before they are handed back
    agent_prefix: str = "agent"
    repos: tuple[str, ...] = ()  # the intake's allow-list (settings.repos, CCC_REPOS); empty: all
    max_ci_fixes: int = 2  # CI fix rounds per task, counted apart from its attempts
    merge_queue: tuple[str, ...] = ()  # repositories merging through the queue ("*": all)
    checks_timeout: float = 1800.0  # seconds a pull request's checks may take
    ci: bool = True  # follow the forge's CI (local: run it; GitHub: re-run failed jobs)
    fairness: FairnessPolicy | None = None  # fair admission: limits per repository/author, aging
    autoscale: tuple[int, int] | None = None  # (min, max) agents the autoscaler keeps, by demand
    autoscale_cooldown_up: float | None = None  # seconds between two scale-ups (None: the policy's)
    autoscale_cooldown_down: float | None = None  # seconds after a decision before a scale-down (None: ditto)
    forge_root: str | None = None  # the local forge's repositories (default: <data dir>/forge)
    # the spend caps given as flags (events.spend.parse_caps: task, day, repo, author), applied
    # on start over the caps the cluster keeps (so `ccc budget set` changes survive a restart
    # for every cap not given again)
    budget: tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]] | None = None

    def validate(self) -> None:
        if self.budget is not None:
            try:
                parse_caps(task=self.budget[0], day=self.budget[1], repo=self.budget[2], author=self.budget[3])
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.max_ci_fixes < 0:
            raise ConfigError("--max-ci-fixes must be >= 0")
        if self.checks_timeout <= 0:
            raise ConfigError("--checks-timeout must be > 0")
        for repo in self.merge_queue:
            if repo != "*":
                check_repo(repo, "--merge-queue repository")
        if self.agents < 0:
            raise ConfigError("--agents must be >= 0")
        if self.shutdown_grace < 0:
            raise ConfigError("--shutdown-grace must be >= 0")
        if self.autoscale is None and (self.autoscale_cooldown_up, self.autoscale_cooldown_down) != (None, None):
            raise ConfigError("--autoscale-cooldown-up/--autoscale-cooldown-down need --autoscale MIN:MAX")
        if self.heartbeat_interval >= self.heartbeat_timeout:
            # every agent would be declared lost between two of its own heartbeats
            raise ConfigError(f"--heartbeat-interval ({self.heartbeat_interval}s) must be shorter than "
                              f"--heartbeat-timeout ({self.heartbeat_timeout}s)")


def merge_queue_setting(repos: tuple[str, ...]) -> bool | frozenset[str]:
    """``--merge-queue`` values as the coordinator takes them: ``*`` is every repository."""
    return True if "*" in repos else frozenset(repos)


def parse_specialties(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in SPECIALTIES]
    if not items or bad:
        raise ConfigError(f"--specialties: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(SPECIALTIES)}")
    return items


CODERS = ("scripted", "anthropic", "claude-code")
ANALYSERS = ("rules", "claude")
FORGES = ("local", "github")


def _choices(kind: str, built_in: tuple[str, ...]) -> str:
    plugins = [n for n in discovery.names(discovery.GROUPS[kind]) if n not in built_in]
    return ", ".join(built_in) + (f", or a {kind} plugin: {', '.join(plugins)}" if plugins else "")


def make_coder(kind: str, script_dir: str | None, model: str | None = None, *, nc: Client | None = None,
               ns: Namespace | None = None, agent_id: str = "",
               plugin_env: tuple[tuple[str, str], ...] = ()) -> Coder:
    """The coder backend an agent uses; heavy SDKs are imported only when chosen. Given the
    agent's connection, the Anthropic coder shares rate limits with the cluster: a 429/529
    one agent gets pauses every agent using the same key (infra.adapters.coders.shared_limits),
    and reserves each call's cost in the cluster's spend ledger (infra.adapters.nats.spend_ledger)."""
    if kind == "scripted":
        return ScriptedCoder(Path(script_dir) if script_dir else None)
    if kind == "anthropic":
        key = os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")
        if not key:
            raise ConfigError("--coder anthropic needs ANTHROPIC_API_KEY (ANTHROPIC_BASE_URL is honoured)")
        from infra.adapters.coders.anthropic_coder import DEFAULT_MODEL, AnthropicCoder

        if nc is None or ns is None:
            return AnthropicCoder(default_model=model or DEFAULT_MODEL)
        import anthropic

        from infra.adapters.coders.shared_limits import shared_limits_http_client
        from infra.adapters.nats.spend_ledger import KVSpendLedger

        http = shared_limits_http_client(nc, ns, key, name=agent_id or "agent")
        return AnthropicCoder(default_model=model or DEFAULT_MODEL,
                              client=anthropic.AsyncAnthropic(http_client=http, max_retries=4),
                              ledger=KVSpendLedger(nc, ns, name=agent_id or "agent"))
    if kind == "claude-code":
        from infra.adapters.coders.claude_cli import ClaudeCodeCoder

        ledger = None
        if nc is not None and ns is not None:
            from infra.adapters.nats.spend_ledger import KVSpendLedger

            ledger = KVSpendLedger(nc, ns, name=agent_id or "agent")
        coder = ClaudeCodeCoder(default_model=model, ledger=ledger)
        if not coder.available():
            raise ConfigError("--coder claude-code: the `claude` CLI is not on PATH")
        return coder
    if discovery.find(discovery.GROUPS["coder"], kind) is not None:  # a ccc.coders plugin
        return discovery.build("coder", kind, Coder, plugin_env)
    raise ConfigError(f"--coder {kind!r}: choose one of {_choices('coder', CODERS)}")


async def close_coder(coder: Coder) -> None:
    """Release what a coder holds on the bus and the network (its ``close``, if any)."""
    close = getattr(coder, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            result = close()
            if asyncio.iscoroutine(result):
                await result


def make_analyser(kind: str, plugin_env: tuple[tuple[str, str], ...] = (), *, nc: Client | None = None,
                  ns: Namespace | None = None) -> Analyser:
    """The coordinator's analyser; given its connection, the Claude analyser's calls are
    charged to the spend ledger like the agents' (refused: the rules answer)."""
    if kind == "claude":
        from actors.claude_analysis import ClaudeAnalyser
        from infra.adapters.coders.claude_analyser import ClaudeToolModel

        ledger = None
        if nc is not None and ns is not None:
            from infra.adapters.nats.spend_ledger import KVSpendLedger

            ledger = KVSpendLedger(nc, ns, name="analyser")
        # falls back to the rules by itself, saying why (no credentials, API errors, a spent budget, …)
        return ClaudeAnalyser(ClaudeToolModel(ledger=ledger), mask=mask_secrets)
    if kind == "rules":
        return RuleAnalyser()
    if discovery.find(discovery.GROUPS["analyser"], kind) is not None:  # a ccc.analysers plugin
        return discovery.build("analyser", kind, Analyser, plugin_env)
    raise ConfigError(f"--analyser {kind!r}: choose one of {_choices('analyser', ANALYSERS)}")


def make_forge(kind: str, forge_root: Path, plugin_env: tuple[tuple[str, str], ...] = ()):
    """The forge agents push to and open pull requests on (a ``ccc.forges`` plugin: its
    CI is not followed, and issues are not synced: those are the built-in forges')."""
    if kind == "local":
        return LocalForgeClient(forge_root)
    if kind == "github":
        from infra.adapters.forge.github import GitHubForge

        return GitHubForge()  # GITHUB_TOKEN / GITHUB_APP_* / GITHUB_API_URL; ConfigError if none
    if discovery.find(discovery.GROUPS["forge"], kind) is not None:  # a ccc.forges plugin
        return discovery.build("forge", kind, ForgeClient, plugin_env)
    raise ConfigError(f"--forge {kind!r}: choose one of {_choices('forge', FORGES)}")


def make_agent_sandbox(settings: Settings) -> Sandbox:
    """Where agents run commands (``--sandbox``, ``CCC_SANDBOX``), not probed yet. Beside
    the agent's home and virtualenv (always hidden), the data dir and every credential
    file the settings name are hidden from commands even when they lie under a system
    path the sandbox shows."""
    s = settings
    hide = [s.data_dir, *(p for p in (s.nats_creds, s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key, s.creds,
                                      s.api_tokens_file) if p)]
    return make_sandbox(s.sandbox, executable=s.sandbox_bin, image=s.sandbox_image,
                        network_mode=s.sandbox_network, limits=parse_limits(s.sandbox_limits), hide=hide,
                        read_only=s.sandbox_read_only)


def build_agent(
    nc: Client,
    ns: Namespace,
    *,
    agent_id: str,
    specialties: tuple[str, ...],
    coder: Coder,
    forge: ForgeClient,
    workspace_root: Path | str,
    capacity: int = 1,
    clearance: str = "internal",
    heartbeat_interval: float = 2.0,
    shutdown_grace: float = 10.0,
    test_timeout: float = 600.0,
    metrics: AgentMetrics | None = None,
    sandbox: Sandbox | None = None,
    plugins: PluginHooks = NO_PLUGINS,
) -> Agent:
    """One agent with its adapters: task workspaces under ``workspace_root`` whose
    commands run in ``sandbox`` (default: bubblewrap; see :func:`make_agent_sandbox`),
    artifacts in the namespace's object store, spans (and ``metrics``, if this process
    serves them), the process's hook plugins' pull-request policies."""
    config = AgentConfig(
        agent_id=agent_id, specialties=specialties, capacity=capacity, clearance=clearance,
        heartbeat_interval=heartbeat_interval, shutdown_grace=shutdown_grace,
        pipeline=PipelineSettings(test_timeout=test_timeout, plugins=plugins),
    )
    return Agent(nc, ns, config, workbench=GitWorkbench(workspace_root, sandbox=sandbox), coder=coder, forge=forge,
                 artifacts=ObjectStoreArtifacts(nc, ns.agent_artifacts_bucket(agent_id)), telemetry=OtelTelemetry(metrics))


def build_coordinator(
    nc: Client, ns: Namespace, config: CoordinatorConfig, *, analyser: str = "rules",
    forge: ForgeClient | None = None, cache_dir: Path | None = None, plugins: PluginHooks = NO_PLUGINS,
    plugin_env: tuple[tuple[str, str], ...] = (),
) -> Coordinator:
    """A coordinator with the ``analyser`` of that kind, its spans in the process's traces;
    with a ``forge``, it follows the open pull requests' branches (conflicts, the merge
    queue) through git against the forge, in a cache under ``cache_dir``; it follows the
    spend ledger (queued tasks of an exhausted scope wait)."""
    branches = None
    if forge is not None and cache_dir is not None:
        branches = GitBranches(forge.clone_url, forge.git_env, cache_dir)
    from infra.adapters.nats.spend_ledger import SpendWatch

    return Coordinator(nc, ns, config, analyser=make_analyser(analyser, plugin_env, nc=nc, ns=ns),
                       telemetry=OtelTelemetry(),
                       branches=branches, spend=SpendWatch(nc, ns), plugins=plugins)


def build_forge_ci(nc: Client, ns: Namespace, forge_kind: str, forge, *, forge_root: Path, sandbox: Sandbox,
                   work_dir: Path, timeout: float, live=None) -> ForgeCI:
    """The forge's CI as the cluster follows it: the local forge runs each pushed commit's
    ``.ccc/test-command`` in ``sandbox``; GitHub runs its own (results come by webhook)
    and is asked to re-run failed jobs."""
    if forge_kind == "github":
        from infra.adapters.forge.github_checks import GitHubChecks

        runner = GitHubChecks(forge)
    else:
        runner = LocalCIRunner(LocalForge(forge_root), sandbox, ObjectStoreArtifacts(nc, ns.artifacts_bucket),
                               mask_secrets, work_dir=work_dir, timeout=timeout)
    return ForgeCI(nc, ns, [runner], live=live, telemetry=OtelTelemetry())


class LocalCluster:
    def __init__(self, settings: Settings, ns: Namespace, options: ClusterOptions) -> None:
        options.validate()
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
        self._lock_fd: int | None = None
        self.forge = None
        self.forge_sync = None
        self.forge_ci: ForgeCI | None = None
        self.autoscaler = None  # infra.shell.app.autoscale.Autoscaler, with --autoscale
        self.demand: DemandActor | None = None  # the tasks waiting per specialty (<NS>_DEMAND), for KEDA
        self.sandbox = make_agent_sandbox(settings)  # one for all local agents: one probe
        self._connections: list[Client] = []  # one per role (and per agent)
        # the hook plugins the settings enable (an unknown name fails here, before anything
        # starts), one host for the whole process: coordinator, agents and forge sync
        self.plugins = PluginHost.from_settings(settings, role="coordinator", key=process_key("coordinator"))
        self.hooks = PluginHooks(self.plugins)

    def trust_policy(self) -> TrustPolicy:
        """What the intake acts on. With ``--forge github`` the cluster has GitHub
        credentials, and ``ccc webhook`` run with them asks GitHub for each author's
        permission: a GitHub fact must then carry it (events.trust), so one that did not
        come through a receiver that asked starts nothing (a dead letter says why)."""
        o = self.options
        return TrustPolicy(repos=o.repos,
                           permission_required_for=frozenset({GITHUB}) if o.forge == "github" else frozenset())

    @property
    def forge_root(self) -> Path:
        return Path(self.options.forge_root) if self.options.forge_root else self.settings.data_dir / "forge"

    @property
    def workspace_root(self) -> Path:
        return self.settings.data_dir / "workspaces"

    async def start(self) -> None:
        s, o = self.settings, self.options
        api_access = None
        if o.api_port is not None:
            from infra.adapters.http.auth import ApiAccess

            # a status API that would refuse to start (a token needed, none configured)
            # fails before the server, the coordinator and the agents start
            api_access = ApiAccess.from_settings(s)
            api_access.check(s.api_host)
        agent_ids = [f"{o.agent_prefix}-{i + 1}-{o.specialties[i % len(o.specialties)]}" for i in range(o.agents)]
        if s.nats_url is None:
            await self._claim_data_dir()
            self.server = EmbeddedServer.for_settings(s, self.ns)  # secure unless --insecure
            if self.server.secure is not None:  # registered before the server reads its users
                # (every id the autoscaler could ever start, too: no reload when it does)
                self.server.secure.add_agents(self.ns, [*agent_ids, *self._autoscale_ids()])
            self.url = self.server.start()
            self._url_file = embedded_url_file(s.data_dir)
            tmp = self._url_file.with_suffix(".tmp")
            tmp.write_text(self.url + "\n")
            tmp.replace(self._url_file)
        # Every part connects with its own role's credentials (on a secure server): the
        # admin provisions, the coordinator writes task events, each agent its own
        # aggregate, the status API reads.
        self.nc = await self._connect("admin", "ccc-up")
        await provision(self.nc, self.ns, replicas=s.replicas)
        if o.budget is not None:  # before any agent reserves against the caps
            task, day, repo, author = o.budget
            await update_setting(self.nc, self.ns, BUDGET, Caps, lambda current: parse_caps(
                task=task, day=day, repo=repo, author=author, base=current))
        for agent_id in agent_ids:
            await provision_agent(self.nc, self.ns, agent_id, replicas=s.replicas)
        self.forge = make_forge(o.forge, self.forge_root, s.plugin_env)
        coordinator_nc = await self._connect("coordinator", "ccc-coordinator")
        # loaded before any actor asks them; their health under coordinator.<host>-<pid>
        await self.plugins.start(coordinator_nc, self.ns)
        self.coordinator = build_coordinator(coordinator_nc, self.ns, CoordinatorConfig(
            heartbeat_timeout=o.heartbeat_timeout, retry_base=o.retry_base, retry_max=o.retry_max,
            max_attempts=o.max_attempts, trust=self.trust_policy(), materialize_kv=True,
            max_ci_fixes=o.max_ci_fixes, checks_timeout=o.checks_timeout,
            merge_queue=merge_queue_setting(o.merge_queue), fairness=o.fairness),
            analyser=o.analyser, forge=self.forge, cache_dir=s.data_dir / "branches", plugins=self.hooks,
            plugin_env=s.plugin_env)
        # the policy this coordinator applies (the default too: no earlier run's limits linger),
        # for `ccc tasks` and `ccc api` to explain fairness waits with, wherever they run
        await write_setting(coordinator_nc, self.ns, FAIRNESS, self.coordinator.config.fairness)
        await self.coordinator.start()
        # the demand board follows the coordinator's read model, with its credentials
        self.demand = DemandActor(NatsDemandBoard(coordinator_nc, self.ns), self.coordinator.live,
                                  budget=self.coordinator.budget)
        await self.demand.start()
        # the forge's CI (a built-in forge's): each pushed commit's checks become facts on the issue stream
        if o.ci and o.forge in FORGES:
            ci_nc = await self._connect("ci", "ccc-ci")
            self.forge_ci = build_forge_ci(ci_nc, self.ns, o.forge, self.forge, forge_root=self.forge_root,
                                           sandbox=self.sandbox, work_dir=s.data_dir / "ci",
                                           timeout=o.test_timeout, live=self.coordinator.live)
            await self.forge_ci.start()
        if o.forge == "github":  # labels and the tracking comment follow the task events
            from actors.forge_sync import ForgeSync

            self.forge_sync = ForgeSync(coordinator_nc, self.ns, self.forge, mask=mask_secrets,
                                        live=self.coordinator.live, telemetry=OtelTelemetry(), plugins=self.hooks)
            await self.forge_sync.start()
        for i, agent_id in enumerate(agent_ids):
            specialty = o.specialties[i % len(o.specialties)]
            agent_nc = await self._connect("agent", f"ccc-{agent_id}", agent_id)
            coder = make_coder(o.coder, o.script_dir, o.model, nc=agent_nc, ns=self.ns, agent_id=agent_id,
                               plugin_env=s.plugin_env)
            agent = build_agent(
                agent_nc, self.ns, agent_id=agent_id,
                specialties=(specialty,), coder=coder, forge=self.forge,
                workspace_root=self.workspace_root, capacity=o.capacity,
                heartbeat_interval=o.heartbeat_interval, shutdown_grace=o.shutdown_grace,
                test_timeout=o.test_timeout, sandbox=self.sandbox, plugins=self.hooks,
            )
            await agent.start()
            self.agents.append(agent)
        if o.autoscale is not None:
            await self._start_autoscaler(coordinator_nc)
        if o.api_port is not None:
            from infra.adapters.http.metrics import metrics_endpoint
            from infra.adapters.http.status_server import ApiServer

            status_nc = await self._connect("status", "ccc-status-api")
            # the dashboard's actions publish issue facts as `ccc` does, with the CLI's credentials
            actions_nc = await self._connect("cli", "ccc-dashboard-actions")
            # this process's plugin metrics beside the log's: /metrics/plugins
            plugin_metrics = [metrics_endpoint(self.plugins.metrics.registry, path="/metrics/plugins")] \
                if self.plugins.names else []
            self.api = ApiServer(EventStore(status_nc, self.ns), s.api_host, o.api_port, materialize=False,
                                 access=api_access, publisher=actions_nc,
                                 forge_root=self.forge_root if o.forge == "local" else None,
                                 fairness=o.fairness, route_handlers=plugin_metrics,
                                 holds=self.holds)
            try:
                await self.api.start()
            except OSError as e:
                raise ConfigError(f"cannot serve the status API on {s.api_host}:{o.api_port}: "
                                  f"{e.strerror or e}") from None
        log.info("cluster.up", nats=redact_url(self.url), agents=len(self.agents),
                 api=self.api.url if self.api else None)

    def holds(self) -> Holds:
        """What holds queued tasks back beyond the log, as this process's coordinator sees it."""
        c = self.coordinator
        return Holds(c.budget(), c.plugin_waits()) if c is not None else Holds()

    def _autoscale_policy(self):
        from projections.autoscale import AutoscalePolicy

        o = self.options
        lo, hi = o.autoscale
        cooldowns = {k: v for k, v in (("cooldown_up", o.autoscale_cooldown_up),
                                       ("cooldown_down", o.autoscale_cooldown_down)) if v is not None}
        return AutoscalePolicy(min_agents=lo, max_agents=hi, specialties=o.specialties, **cooldowns).validate()

    def _autoscale_ids(self) -> list[str]:
        if self.options.autoscale is None:
            return []
        from infra.shell.app.autoscale import agent_ids

        return agent_ids(self._autoscale_policy(), self.options.specialties)

    async def spawn_agent(self, agent_id: str, specialty: str) -> Agent:
        """Start one more local agent (the autoscaler's scale-up); the caller keeps it."""
        o = self.options
        await provision_agent(self.nc, self.ns, agent_id, replicas=self.settings.replicas)
        agent_nc = await self._connect("agent", f"ccc-{agent_id}", agent_id)
        agent = build_agent(
            agent_nc, self.ns, agent_id=agent_id, specialties=(specialty,),
            coder=make_coder(o.coder, o.script_dir, o.model, nc=agent_nc, ns=self.ns, agent_id=agent_id,
                             plugin_env=self.settings.plugin_env),
            forge=self.forge, workspace_root=self.workspace_root, capacity=o.capacity,
            heartbeat_interval=o.heartbeat_interval, shutdown_grace=o.shutdown_grace,
            test_timeout=o.test_timeout, sandbox=self.sandbox, plugins=self.hooks)
        await agent.start()
        return agent

    async def _agent_stopped(self, agent: Agent) -> None:
        """After a scale-down: the stopped agent's coder and connection go too."""
        await close_coder(agent.coder)
        nc = agent.nc
        if nc in self._connections:
            self._connections.remove(nc)
        with contextlib.suppress(Exception):
            await nc.drain()

    async def _start_autoscaler(self, nc: Client) -> None:
        from infra.shell.app.autoscale import Autoscaler

        coordinator = self.coordinator
        self.autoscaler = Autoscaler(
            nc, self.ns, self._autoscale_policy(),
            view=lambda: (coordinator.model.tasks, coordinator.model.agents),
            agents=self.agents, spawn=self.spawn_agent, on_stopped=self._agent_stopped,
            budget=coordinator.budget)
        await self.autoscaler.start()

    async def _connect(self, role: Role, name: str, agent_id: str | None = None) -> Client:
        nc = await connect(self.url, name=name, settings=self.settings, role=role, agent_id=agent_id, ns=self.ns)
        self._connections.append(nc)
        return nc

    def hurry(self) -> None:
        """A second Ctrl-C while stopping: hand running tasks back now."""
        for agent in self.agents:
            agent.hand_back_all()

    async def _claim_data_dir(self) -> None:
        """One embedded server per data dir. nats-server does not lock its store dir, so
        a second ``ccc up`` (or one next to ``ccc server``, or next to the server an
        earlier ``ccc up`` left behind when it was SIGKILLed) would run a second server
        on the same JetStream files. An flock (released by the kernel however this
        process ends) guards against another ``ccc up``; the URL file against a live
        server started by anything else."""
        data_dir = self.settings.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # the store, the URL file, the workspaces: the operator's only
        fd = os.open(data_dir / "up.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another `ccc up` is already running with data dir {data_dir}") from None
        self._lock_fd = fd
        url_file = embedded_url_file(data_dir)
        url = url_file.read_text().strip() if url_file.is_file() else ""
        if url:
            try:
                nc = await connect(url, name="ccc-up-probe", settings=self.settings, role="cli", ns=self.ns,
                                   connect_timeout=1.0,
                                   reconnect=False)
            except StoreUnavailable:
                url_file.unlink(missing_ok=True)  # left by a server that is gone
            else:
                await nc.close()
                pids = sorted(f.stem.rsplit("_", 1)[-1] for f in (data_dir / "ports").glob("*.ports"))
                which = f" (pid {', '.join(pids)})" if pids else ""
                url = redact_url(url)  # an error line: no credentials, whatever the file holds
                raise ConfigError(f"a nats-server for {data_dir} is already running at {url}{which}: "
                                  f"stop it, or join it with --nats-url {url}")

    def _release_data_dir(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    async def _drain_reports(self, timeout: float = 5.0) -> None:
        """Let the coordinator handle what the stopping agents just reported (hand-backs,
        going offline) before it stops too, so the log shows those tasks queued again
        instead of leaving it to the next start."""
        assert self.coordinator is not None and self.nc is not None
        jsm = self.nc.jsm()
        durable = f"{self.coordinator.config.name}-reports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await jsm.consumer_info(self.ns.events_stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)
        log.warning("cluster.reports_not_drained", timeout=timeout)

    async def stop(self) -> None:
        if self.autoscaler is not None:  # no agent started or stopped while the cluster stops
            with contextlib.suppress(Exception):
                await self.autoscaler.stop()
        # every agent stops taking work before any hands a task back (else the handed-back
        # task goes to the next agent in line, which is stopping too); then all of them
        # share one grace period instead of waiting for each other's
        await asyncio.gather(*(agent.drain() for agent in self.agents), return_exceptions=True)
        await asyncio.gather(*(agent.stop() for agent in self.agents), return_exceptions=True)
        for agent in self.agents:  # a coder's HTTP client (its shared rate-limit watch, its ledger)
            await close_coder(agent.coder)
        if self.agents and self.coordinator is not None:
            with contextlib.suppress(Exception):
                await self._drain_reports()
        if self.api is not None:
            with contextlib.suppress(Exception):
                await self.api.stop()
        if self.forge_sync is not None:
            with contextlib.suppress(Exception):
                await self.forge_sync.stop()
        if self.forge_ci is not None:
            with contextlib.suppress(Exception):
                await self.forge_ci.stop()
        if self.forge is not None and hasattr(self.forge, "close"):
            with contextlib.suppress(Exception):
                self.forge.close()
        if self.demand is not None:  # (the board stays as it is: the next start reconciles it)
            with contextlib.suppress(Exception):
                await self.demand.stop()
        if self.coordinator is not None:
            with contextlib.suppress(Exception):
                await self.coordinator.stop()
        with contextlib.suppress(Exception):  # after every actor that asks them; before the connections
            await self.plugins.stop()
        for nc in reversed(self._connections):
            with contextlib.suppress(Exception):
                await nc.drain()
        if self._url_file is not None and self._url_file.is_file():
            with contextlib.suppress(OSError):
                if self._url_file.read_text().strip() == self.url:
                    self._url_file.unlink()
        if self.server is not None:
            self.server.stop()
        self._release_data_dir()

    async def __aenter__(self) -> "LocalCluster":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
