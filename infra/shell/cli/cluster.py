"""The running side of ``ccc``: ``up``, ``agent``, ``demo``, ``api``, ``webhook``
(the local forge's commands are in :mod:`.forge`)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import click
import msgspec

from events.errors import ConfigError, StoreUnavailable
from events.subjects import check_id

from actors.plugins import PluginHooks
from infra.shell.app.cluster import (
    ANALYSERS,
    CODERS,
    FORGES,
    ClusterOptions,
    LocalCluster,
    build_agent,
    close_coder,
    make_agent_sandbox,
    make_analyser,
    make_coder,
    make_forge,
    parse_specialties,
)
from infra.adapters.plugins.host import PluginHost, process_key
from infra.adapters.git.sandbox import NETWORK_MODES, SANDBOXES
from infra.adapters.nats.settings import load_settings
from infra.shell.app.signals import StopSignals, settle, until_signal
from infra.shell.cli.budget import budget_flags, caps_from_flags
from infra.shell.cli.context import nats_cli_flags, require_running_nats, run_async
from infra.shell.cli.output import console, emit_json, print_table

shutdown_grace_option = click.option(
    "--shutdown-grace", type=click.FloatRange(0), default=10.0, show_default=True,
    help="On Ctrl-C/SIGTERM, seconds running tasks get to finish before they are handed back.")


class BuiltInOrPlugin(click.ParamType):
    """A built-in name or an installed plugin of the entry point group ``ccc.<kind>s``,
    checked as the command line is parsed (like a ``click.Choice``; the group is read
    only then, not at every start of ``ccc``)."""

    name = "name"

    def __init__(self, built_in: tuple[str, ...], kind: str) -> None:
        self.built_in, self.kind = built_in, kind

    def choices(self) -> list[str]:
        from infra.adapters.plugins import discovery

        group = discovery.GROUPS[self.kind]
        return [*self.built_in, *(n for n in discovery.names(group) if n not in self.built_in)]

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.built_in) + f"|<{self.kind} plugin>]"

    def convert(self, value, param, ctx):
        choices = self.choices()
        if value not in choices:
            self.fail(f"{value!r} is not one of {', '.join(map(repr, choices))} (built in, or an installed "
                      f"`ccc.{self.kind}s` plugin)", param, ctx)
        return value


def coder_options(fn):
    """--coder/--model/--forge and --plugin, shared by `up` and `agent` (a coder or forge
    name that is not built in names a ``ccc.coders``/``ccc.forges`` plugin)."""
    fn = click.option("--plugin", "plugins", multiple=True, metavar="NAME",
                      help="Enable this hook plugin (a `ccc.hooks` entry point; repeat) [env CCC_PLUGINS, "
                           "comma-separated]; its options: env CCC_PLUGIN_<NAME>_<KEY>. `ccc plugins` lists "
                           "them.")(fn)
    fn = click.option("--forge", type=BuiltInOrPlugin(FORGES, "forge"), default="local", show_default=True,
                      help="Where repos live and PRs open: the local forge, or GitHub "
                           "(GITHUB_TOKEN or GITHUB_APP_*; GITHUB_API_URL for Enterprise), or an installed "
                           "`ccc.forges` plugin.")(fn)
    fn = click.option("--model", default=None, help="Claude model for the coder [default: the coder's].")(fn)
    fn = click.option("--coder", type=BuiltInOrPlugin(CODERS, "coder"), default="scripted", show_default=True,
                      help="scripted: replays recorded sessions (offline); anthropic: the Messages API "
                           "tool loop (ANTHROPIC_API_KEY); claude-code: the `claude` CLI, headless; or an "
                           "installed `ccc.coders` plugin.")(fn)
    return fn


def sandbox_options(fn):
    """--sandbox/--sandbox-network, shared by `up`, `agent` and `demo` (None: the setting)."""
    fn = click.option("--sandbox-network", type=click.Choice(NETWORK_MODES), default=None,
                      help="Network a repository may ask for in .ccc/sandbox.toml: none, allow-list (its hosts "
                           "through a filtering proxy), allow-full [env CCC_SANDBOX_NETWORK; default: "
                           "allow-list].")(fn)
    fn = click.option("--sandbox", type=click.Choice(SANDBOXES), default=None,
                      help="Where the coder's commands and the repositories' tests run: bwrap (bubblewrap), "
                           "podman, docker, or none (unsandboxed: a warning, and recorded on the agents' "
                           "events) [env CCC_SANDBOX; default: bwrap].")(fn)
    return fn


def check_sandbox(settings) -> None:
    """Before anything starts: refuse to run when no sandbox can be made here (the same
    check every agent makes, fail closed), and say it out loud when the operator chose none."""
    if settings.sandbox == "none":
        click.echo("warning: --sandbox none: the coder's commands and the repositories' own tests run "
                   "unsandboxed, as this user, seeing its files, processes and network (recorded as "
                   'sandbox "none" on the agents\' agent.registered events)', err=True)
        return
    make_agent_sandbox(settings).check()  # SandboxUnavailable: one line naming the way out


def fairness_options(fn):
    """Fair admission (``up``): projections.fairness."""
    fn = click.option("--aging", default="300", show_default=True, metavar="SECONDS|off",
                      help="A queued task's priority rises one level per this many seconds of waiting, "
                           "so nothing starves ('off': strict priority).")(fn)
    fn = click.option("--author-limit", "author_limit", multiple=True, metavar="N|AUTHOR=N",
                      help="Tasks of one issue author with an agent at once (repeat; AUTHOR=N for one).")(fn)
    fn = click.option("--repo-limit", "repo_limit", multiple=True, metavar="N|OWNER/NAME=N",
                      help="Tasks of one repository with an agent at once (repeat; OWNER/NAME=N for one).")(fn)
    return fn


def parse_autoscale(text: str) -> tuple[int, int]:
    from projections.autoscale import parse_autoscale as parse

    return parse(text)


def fairness_policy(repo_limit, author_limit, aging):
    from projections.fairness import FairnessPolicy, parse_limits

    try:
        rl, rls = parse_limits(repo_limit, "--repo-limit")
        al, als = parse_limits(author_limit, "--author-limit")
        seconds = None if aging.strip().lower() == "off" else float(aging)
        return FairnessPolicy(repo_limit=rl, repo_limits=rls, author_limit=al, author_limits=als, aging=seconds)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def pr_loop_options(fn):
    """How a task follows its pull request to green (``up`` and ``demo``)."""
    fn = click.option("--no-ci", is_flag=True,
                      help="Do not follow the forge's CI (the local forge then runs no checks: "
                           "pull requests wait in 'checking' until --checks-timeout).")(fn)
    fn = click.option("--checks-timeout", type=click.FloatRange(1), default=1800.0, show_default=True,
                      help="Seconds a pull request's checks may take before a human is asked.")(fn)
    fn = click.option("--merge-queue", "merge_queue", multiple=True, metavar="OWNER/NAME",
                      help="Merge approved, green pull requests of this repository one at a time, "
                           "each tested on the latest base first (repeat; '*' for every repository).")(fn)
    fn = click.option("--max-ci-fixes", type=click.IntRange(0, 20), default=2, show_default=True,
                      help="CI fix rounds per task when its checks fail because of the change "
                           "(counted apart from --max-attempts).")(fn)
    return fn


def api_access_options(fn):
    """The status API's access options, shared by `up` and `api`; each overrides its
    setting (None: the environment variable, then the default)."""
    fn = click.option("--rate-burst", type=click.IntRange(1, 1_000_000), default=None,
                      help="Status API: requests a client may burst "
                           "[env CCC_API_RATE_BURST; default: 100].")(fn)
    fn = click.option("--rate-limit", type=click.FloatRange(0), default=None,
                      help="Status API: requests/s per client address, or per token once authenticated; "
                           "0 turns it off [env CCC_API_RATE_LIMIT; default: 20].")(fn)
    fn = click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
                      help="A Host name the status API answers to, beside localhost and its bind address "
                           "(repeatable; *.example.com, or * for any) [env CCC_API_ALLOWED_HOSTS].")(fn)
    fn = click.option("--require-token", is_flag=True, default=None,
                      help="Status API: require a bearer token even on localhost (always required beyond "
                           "it; tokens from `ccc secure init` or CCC_API_TOKEN) "
                           "[env CCC_API_REQUIRE_TOKEN].")(fn)
    return fn


def _api_overrides(require_token, allowed_hosts, rate_limit, rate_burst) -> dict:
    return {"api_require_token": require_token, "api_allowed_hosts": allowed_hosts or None,
            "api_rate_limit": rate_limit, "api_rate_burst": rate_burst}


# -- ccc up ------------------------------------------------------------------------------
@click.command("up")
@click.option("--agents", type=click.IntRange(0, 64), default=3, show_default=True)
@click.option("--specialties", default="backend,frontend,general", show_default=True,
              help="Comma-separated; agent i gets the i-th (cycling).")
@click.option("--capacity", type=click.IntRange(1, 32), default=1, show_default=True,
              help="Tasks each agent works on at once.")
@click.option("--api-port", type=click.IntRange(0, 65535), default=None,
              help="Status API port [default: CCC_API_PORT or 8080]; 0 picks a free one.")
@click.option("--no-api", is_flag=True, help="Do not serve the status API.")
@click.option("--api-host", default=None,
              help="Status API bind address [env CCC_API_HOST; default: 127.0.0.1]; beyond localhost "
                   "it requires a token.")
@api_access_options
@coder_options
@sandbox_options
@click.option("--analyser", type=BuiltInOrPlugin(ANALYSERS, "analyser"), default="rules", show_default=True,
              help="claude: ask Claude for specialty, complexity, dependencies and a plan (falls back "
                   "to the rules when it fails or is not configured); or an installed `ccc.analysers` "
                   "plugin.")
@click.option("--script-dir", type=click.Path(file_okay=False), help="Recorded sessions for the scripted coder.")
@click.option("--heartbeat-timeout", type=click.FloatRange(0.5), default=10.0, show_default=True,
              help="Seconds of silence after which an agent is declared lost and its tasks re-queued.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.1), default=None,
              help="How often the local agents heartbeat [default: a quarter of --heartbeat-timeout, "
                   "at most 2s].")
@click.option("--retry-base", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds before the first retry of a failed task; doubles each attempt.")
@click.option("--max-attempts", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Attempts per task (new tasks).")
@pr_loop_options
@fairness_options
@click.option("--autoscale", default=None, metavar="MIN:MAX",
              help="Start and stop local agents by the bottleneck specialty (queue depth and oldest "
                   "wait per specialty), keeping MIN to MAX of them besides --agents; every decision "
                   "is an event on <ns>.cluster.>.")
@click.option("--autoscale-cooldown-up", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="With --autoscale: seconds between two scale-ups [default: 5].")
@click.option("--autoscale-cooldown-down", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="With --autoscale: seconds after the last scaling decision before an idle agent is "
                   "stopped, so a burst's tail does not thrash [default: 30].")
@click.option("--forge-root", type=click.Path(file_okay=False), default=None,
              help="The local forge's repositories [default: <data dir>/forge].")
@budget_flags
@shutdown_grace_option
@click.pass_obj
def up_cmd(obj, agents, specialties, capacity, api_port, no_api, api_host, require_token, allowed_hosts,
           rate_limit, rate_burst, coder, model, forge, plugins, sandbox, sandbox_network, analyser,
           script_dir, heartbeat_timeout, heartbeat_interval, retry_base, max_attempts, max_ci_fixes, merge_queue,
           checks_timeout, no_ci, repo_limit, author_limit, aging, autoscale, autoscale_cooldown_up,
           autoscale_cooldown_down, forge_root, budget_task, budget_day, budget_repo, budget_author,
           shutdown_grace) -> None:
    """Run the cluster on this machine until Ctrl-C: the embedded nats-server (unless
    --nats-url), one coordinator, N agents and the status API."""
    settings = obj.settings(api_host=api_host, sandbox=sandbox, sandbox_network=sandbox_network,
                            plugins=tuple(plugins) or None,
                            **_api_overrides(require_token, allowed_hosts, rate_limit, rate_burst))
    if heartbeat_interval is None:
        # several beats per timeout: one late beat must not get a healthy agent declared lost
        heartbeat_interval = min(2.0, heartbeat_timeout / 4)
    options = ClusterOptions(
        agents=agents, specialties=parse_specialties(specialties), capacity=capacity,
        api_port=None if no_api else (settings.api_port if api_port is None else api_port),
        coder=coder, model=model, forge=forge, analyser=analyser, script_dir=script_dir,
        heartbeat_timeout=heartbeat_timeout,
        heartbeat_interval=heartbeat_interval, retry_base=retry_base, max_attempts=max_attempts,
        shutdown_grace=shutdown_grace, agent_prefix=_agent_prefix(settings.nats_url),
        repos=settings.repos, max_ci_fixes=max_ci_fixes, merge_queue=tuple(merge_queue),
        checks_timeout=checks_timeout, ci=not no_ci, forge_root=forge_root,
        fairness=fairness_policy(repo_limit, author_limit, aging),
        autoscale=parse_autoscale(autoscale) if autoscale else None,
        autoscale_cooldown_up=autoscale_cooldown_up, autoscale_cooldown_down=autoscale_cooldown_down,
        budget=None if caps_from_flags(None, budget_task, budget_day, budget_repo, budget_author) is None
        else (budget_task, budget_day, tuple(budget_repo), tuple(budget_author)),
    )
    options.validate()
    # a bad --coder / missing key fails before anything starts, as does a bad --forge or --analyser
    make_coder(coder, script_dir, model, plugin_env=settings.plugin_env)
    make_forge(forge, Path(forge_root) if forge_root else settings.data_dir / "forge", settings.plugin_env)
    make_analyser(analyser, settings.plugin_env)
    check_sandbox(settings)
    if options.api_port is not None:  # as does a status API that needs a token and has none
        from infra.adapters.http.auth import ApiAccess

        ApiAccess.from_settings(settings).check(settings.api_host)

    async def main() -> None:
        cluster = LocalCluster(settings, obj.ns, options)
        started = False
        with StopSignals(cluster.hurry) as signals:
            try:
                await cluster.start()
                started = True
                _print_up(cluster, obj.ns)
                await signals.wait()
            except OSError as e:
                raise ConfigError(f"cannot start: {e.strerror or e}") from None
            except asyncio.CancelledError:
                if not signals.received:
                    raise  # not a signal of ours
            finally:
                if started:
                    click.echo("stopping: agents hand back their work (again: right now)...", err=True)
                await signals.cleanup(cluster.stop(), report_after=shutdown_grace + 15)

    run_async(main())


def _agent_prefix(nats_url: str | None) -> str:
    """``agent`` on the embedded server. On a shared NATS the ids carry the host: two
    machines running ``ccc up --nats-url`` must not both run ``agent-1-backend`` (one
    aggregate and one durable consumer, fed to two processes)."""
    if nats_url is None:
        return "agent"
    host = re.sub(r"[^A-Za-z0-9_-]", "-", os.uname().nodename.split(".")[0]) or "host"
    return f"{host}-agent"


def _print_up(cluster: LocalCluster, ns) -> None:
    from infra.adapters.obs.masking import redact_url

    url = redact_url(cluster.url)  # NATS_URL may carry a password: not on the screen
    click.echo(f"claude-code-cluster is up ({len(cluster.agents)} agents)")
    click.echo(f"  NATS        {url}")
    if cluster.api is not None:
        click.echo(f"  dashboard   {cluster.api.url}/   (live; actions need the write token: /ui/login)")
        click.echo(f"  status API  {cluster.api.url}/api/v1/tasks   (OpenAPI: {cluster.api.url}/schema)")
    click.echo(f"  local forge {cluster.forge_root}   (add a repo: ccc repo import OWNER/NAME PATH)")
    click.echo("  publish an issue:")
    click.echo("    ccc issue publish --repo OWNER/NAME --title 'Fix the bug' --label backend")
    click.echo(f"  watch:       ccc events --follow    |   nats --server {url}"
               f"{nats_cli_flags(cluster.settings, ns)} sub '{ns.prefix}.>'")
    if cluster.options.repos:
        click.echo(f"  repos       {', '.join(cluster.options.repos)} (issue facts about others are refused)")
    click.echo("Ctrl-C to stop.")


# -- ccc agent ----------------------------------------------------------------------------
@click.command("agent")
@click.option("--specialty", "specialty_list", multiple=True, required=True,
              help="A specialty (repeatable).")
@click.option("--agent-id", default=None, help="Default: <host>-<first specialty>-<random>.")
@click.option("--capacity", type=click.IntRange(1, 32), default=1, show_default=True)
@click.option("--clearance", type=click.Choice(["public", "internal", "confidential", "restricted"]),
              default="internal", show_default=True)
@coder_options
@sandbox_options
@click.option("--script-dir", type=click.Path(file_okay=False))
@click.option("--forge-root", type=click.Path(file_okay=False),
              help="Local forge [default: <data-dir>/forge].")
@click.option("--workspace-root", type=click.Path(file_okay=False),
              help="Where task workspaces go [default: <data-dir>/workspaces].")
@click.option("--heartbeat-interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve this agent's Prometheus metrics on /metrics (0: a free port) [env CCC_METRICS_PORT].")
@shutdown_grace_option
@click.pass_obj
def agent_cmd(obj, specialty_list, agent_id, capacity, clearance, coder, model, forge, plugins, sandbox,
              sandbox_network, script_dir, forge_root, workspace_root, heartbeat_interval, metrics_port,
              shutdown_grace) -> None:
    """Run one agent (how the cluster grows: point it at the cluster's NATS)."""
    specialties = parse_specialties(",".join(specialty_list))
    settings = obj.settings(sandbox=sandbox, sandbox_network=sandbox_network, plugins=tuple(plugins) or None)
    metrics_port = settings.metrics_port if metrics_port is None else metrics_port
    host = os.uname().nodename.split(".")[0]
    agent_id = check_id(agent_id or f"{host}-{specialties[0]}-{uuid.uuid4().hex[:6]}", "agent id")
    forge_client = make_forge(forge, Path(forge_root) if forge_root else settings.data_dir / "forge",
                              settings.plugin_env)

    # a bad --coder fails before connecting
    make_coder(coder, script_dir, model, plugin_env=settings.plugin_env)
    # its hook plugins (their pull-request policies): an unknown name fails before connecting;
    # their metrics go on the agent's /metrics
    from prometheus_client import REGISTRY

    plugin_host = PluginHost.from_settings(settings, role="agent", key=process_key("agent", agent_id),
                                           registry=REGISTRY if metrics_port is not None else None)
    check_sandbox(settings)  # as does a host where no sandbox can be made
    require_running_nats(obj)

    async def run(nc) -> None:
        from prometheus_client import REGISTRY

        from infra.adapters.http.metrics import serve_metrics
        from infra.adapters.obs.metrics import AgentMetrics

        metrics = AgentMetrics(REGISTRY) if metrics_port is not None else None
        # with the connection: the Anthropic coder shares the cluster's rate-limit pauses
        coder_live = make_coder(coder, script_dir, model, nc=nc, ns=obj.ns, agent_id=agent_id,
                                plugin_env=settings.plugin_env)
        await plugin_host.start(nc, obj.ns)  # its health under agent.<id>
        agent = build_agent(
            nc, obj.ns, agent_id=agent_id, specialties=specialties, coder=coder_live, forge=forge_client,
            workspace_root=workspace_root or settings.data_dir / "workspaces", capacity=capacity,
            clearance=clearance, heartbeat_interval=heartbeat_interval, shutdown_grace=shutdown_grace,
            metrics=metrics, sandbox=make_agent_sandbox(settings), plugins=PluginHooks(plugin_host))
        metrics_server = None
        if metrics_port is not None:
            try:
                metrics_server = await serve_metrics(metrics_port, registry=REGISTRY)
            except OSError as e:
                raise ConfigError(f"--metrics-port {metrics_port}: {e.strerror or e}") from None
            click.echo(f"metrics at {metrics_server.url}")
        with StopSignals(agent.hand_back_all) as signals:
            try:
                await agent.start()
                click.echo(f"agent {agent_id} ({', '.join(specialties)}) registered; "
                           "Ctrl-C / SIGTERM to stop")
                while not await signals.wait(0.5):
                    if nc.is_closed:  # given up after the server refused its credentials
                        raise StoreUnavailable(f"agent {agent_id}: the cluster refused its credentials "
                                               "(revoked?); stopped")
            except asyncio.CancelledError:
                if not signals.received:
                    raise  # not a signal of ours
            finally:
                await signals.cleanup(agent.stop(), report_after=shutdown_grace + 15)
                await close_coder(coder_live)  # its HTTP client, rate-limit watch and ledger
                await plugin_host.stop()
                if metrics_server is not None:
                    await metrics_server.stop()

    obj.run(run, role="agent", agent_id=agent_id)


# -- ccc demo -----------------------------------------------------------------------------
@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the demo's data dir (printed at the end).")
@click.option("--timeout", type=click.FloatRange(10), default=180.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON lines.")
@sandbox_options
@click.pass_obj
def demo_cmd(obj, keep, timeout, as_json, sandbox, sandbox_network) -> None:
    """Issues -> pull requests on a sample repository, offline, no API key."""
    from infra.shell.app.demo import ISSUES, run_demo

    # the demo always runs its own embedded server, whatever NATS_URL says
    settings = load_settings(sandbox=sandbox, sandbox_network=sandbox_network)
    check_sandbox(settings)  # before the temporary data dir exists: nothing to clean up
    data_dir = Path(tempfile.mkdtemp(prefix="ccc-demo-"))
    settings = msgspec.structs.replace(settings, data_dir=data_dir, nats_url=None)
    last: list = []
    bar = None  # a rich progress bar on a terminal; plain lines otherwise
    if not as_json and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=console(stderr=True), transient=True)
        bar_id = bar.add_task("tasks completed", total=len(ISSUES))

    def show(rows) -> None:
        nonlocal last
        if as_json:
            return
        states = [(r.task, r.state, r.attempt) for r in rows]
        if states == last:
            return
        last = states
        line = "  ".join(f"{r.task}:{r.state}" + (f"(try {r.attempt})" if r.attempt > 1 else "") for r in rows)
        if bar is not None:
            bar.update(bar_id, completed=sum(r.state == "completed" for r in rows))
            bar.console.print(line, highlight=False)
        else:
            click.echo("  " + line, err=True)

    if not as_json:
        click.echo(f"ccc demo: {len(ISSUES)} issues on demo/shop, 3 agents (backend, frontend, general), "
                   "scripted coder, the local forge's CI, a merge queue", err=True)
    if bar is not None:
        bar.start()
    try:
        try:
            summary: list = []
            ok, rows, cluster = asyncio.run(run_demo(settings, obj.ns, timeout=timeout, on_progress=show,
                                                     summary=summary))
        finally:
            if bar is not None:
                bar.stop()
        if as_json:
            for r in rows:
                emit_json(r)
        else:
            print_table(("TASK", "ISSUE", "AGENT", "STATE", "ATTEMPT", "TESTS", "CI"),
                        [(r.task, r.issue, r.agent, r.state, r.attempt, r.tests, r.ci) for r in rows])
            click.echo("")
            if summary:
                _print_demo_summary(summary[0])
            click.echo("Every step above is an event. Inspect them with:")
            click.echo(f"  ccc --data-dir {data_dir} events            # the log")
            click.echo(f"  ccc --data-dir {data_dir} replay --task demo_shop-4   # state after each event")
            click.echo(f"  ccc --data-dir {data_dir} tasks             # the board")
            click.echo(f"  git -C {data_dir}/forge/demo/shop.git branch  # the pushed branches")
            if not keep:
                click.echo("(run with --keep to keep that directory)")
    finally:
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    if not ok:
        click.echo("demo: not every task reached its expected state", err=True)
        sys.exit(1)


def _print_demo_summary(s) -> None:
    p = s.prediction
    if s.ci_fixed:
        click.echo(f"CI failed on the first push and a CI fix round made it green: {', '.join(s.ci_fixed)}")
    for task, reason in s.lease_waits.items():
        click.echo(f"waited for a file lease: {task} ({reason})")
    if s.merged_in_order:
        click.echo(f"merged by the merge queue, in order: {' -> '.join(s.merged_in_order)}")
    click.echo(f"file prediction: {p.hits} of {p.tasks} changes touched a predicted file "
               f"(hit rate {p.hit_rate:.0%}); {p.touched} of {p.changed} changed files were predicted "
               f"(recall {p.recall:.0%}), {p.touched} of {p.predicted} predictions touched "
               f"(precision {p.precision:.0%}); {p.unpredicted_tasks} change(s) had no prediction")
    click.echo("")


# -- ccc api ---------------------------------------------------------------------------
@click.command("api")
@click.option("--host", default=None,
              help="Bind address [env CCC_API_HOST; default: 127.0.0.1]; beyond localhost it "
                   "requires a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port [default: CCC_API_PORT or 8080]; 0 picks a free one.")
@api_access_options
@click.pass_obj
def api_cmd(obj, host: str | None, port: int | None, require_token, allowed_hosts, rate_limit,
            rate_burst) -> None:
    """Serve the status API.

    Task, agent and cluster views over a live projection of the event log. Callers
    send `Authorization: Bearer <token>` (read scope; tokens from `ccc secure init` or
    CCC_API_TOKEN), required beyond localhost or with --require-token; /health is open."""
    try:
        from infra.adapters.http.status_server import ApiServer
    except ModuleNotFoundError as e:
        if e.name not in ("infra.adapters.http.status_server", "uvicorn", "litestar"):
            raise
        raise ConfigError(f"the status API is not available: {e}") from None
    from infra.adapters.http.auth import ApiAccess

    settings = obj.settings(api_host=host,
                            **_api_overrides(require_token, allowed_hosts, rate_limit, rate_burst))
    host, port = settings.api_host, settings.api_port if port is None else port
    access = ApiAccess.from_settings(settings)
    access.check(host)  # needs a token and has none: say so before looking for a cluster
    require_running_nats(obj)

    async def serve(nc) -> None:
        from infra.adapters.nats.connection import open_nats

        # read-only credentials on a secure cluster: the KV views are the coordinator's to write;
        # the dashboard's actions publish issue facts as the CLI does, with the CLI's credentials
        async with open_nats(settings, name="ccc-dashboard-actions", role="cli", ns=obj.ns) as publisher:
            await serve_with(nc, publisher)

    async def serve_with(nc, publisher) -> None:
        from infra.adapters.nats.cluster_config import FAIRNESS, read_setting
        from projections.fairness import FairnessPolicy

        forge_root = settings.data_dir / "forge"
        # the admission policy `ccc up` published (None: none, no fairness wait reasons)
        fairness = await read_setting(nc, obj.ns, FAIRNESS, FairnessPolicy, timeout=settings.request_timeout)
        server = ApiServer(obj.store(nc), host, port, materialize=settings.insecure, access=access,
                           publisher=publisher, forge_root=forge_root if forge_root.is_dir() else None,
                           fairness=fairness)
        with StopSignals() as signals:  # a second Ctrl-C must not cut the shutdown short
            serving = stopped = None
            try:
                try:
                    await server.start()
                except OSError as e:
                    raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
                click.echo(f"status API at {server.url}  (dashboard: {server.url}/; Ctrl-C to stop)")
                serving = asyncio.ensure_future(server.serve_forever())  # ends if uvicorn stops by itself
                stopped = asyncio.ensure_future(signals.wait())
                await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if not signals.received:
                    raise  # not a signal of ours
            finally:
                for t in (serving, stopped):
                    if t is not None:
                        t.cancel()
                await signals.cleanup(settle(serving, server.stop()))

    obj.run(serve, role="status")


# -- ccc webhook -------------------------------------------------------------------------
@click.command("webhook")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option("--trigger-label", default="ccc", show_default=True,
              help="Issues with this label (or an @mention of the bot) start work.")
@click.option("--bot-name", default="ccc", show_default=True)
@click.option("--max-age", type=click.FloatRange(min=0, max=720, min_open=True), default=15.0, show_default=True,
              help="Refuse deliveries older than this many minutes (by their own timestamps): a "
                   "replayed body does nothing. Widen it to redeliver after a long outage.")
@click.option("--rate-limit", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Requests per second per client address (0: no limit); past it, 429 before any "
                   "body is read or signature computed.")
@click.option("--rate-burst", type=click.IntRange(min=1), default=100, show_default=True,
              help="Requests a client may send at once before the rate applies.")
@click.pass_obj
def webhook_cmd(obj, host, port, trigger_label, bot_name, max_age, rate_limit, rate_burst) -> None:
    """Receive GitHub webhooks (HMAC-verified with CCC_WEBHOOK_SECRET) and publish
    them as issue facts; a redelivered or replayed webhook is a no-op. With GitHub
    credentials (GITHUB_TOKEN or GITHUB_APP_*) each author's write permission on the
    repository is checked; without, their association alone decides."""
    from datetime import timedelta

    from events.trust import GITHUB, TrustPolicy
    from infra.adapters.forge.github_checks import GitHubChecks
    from infra.adapters.http.ratelimit import RateLimit
    from infra.adapters.http.webhook import ASSOCIATION_ONLY, WebhookServer, webhook_secret

    secret = webhook_secret()  # a ConfigError before anything starts
    forge = None
    if os.environ.get("GITHUB_TOKEN") or os.environ.get("GITHUB_APP_ID"):
        from infra.adapters.forge.github import GitHubForge

        forge = GitHubForge()  # incomplete App settings: a ConfigError, not a silent fallback
    else:
        click.echo(f"warning: {ASSOCIATION_ONLY}", err=True)
    # the same policy the intake re-checks (which requires the permission on GitHub facts
    # when the cluster runs with --forge github)
    trust = TrustPolicy(repos=obj.settings().repos,
                        permission_required_for=frozenset({GITHUB}) if forge else frozenset())

    async def serve(nc) -> None:
        server = WebhookServer(nc, obj.ns, host, port, secret=secret, trigger_label=trigger_label,
                               bot_name=bot_name, trust=trust, max_age=timedelta(minutes=max_age),
                               permissions=forge.author_permission if forge else None,
                               rate_limit=RateLimit(rate_limit, rate_burst),
                               checks=GitHubChecks(forge) if forge else None)
        try:
            try:
                await server.start()
            except OSError as e:
                raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
            click.echo(f"webhook receiver at {server.url}/webhook  (Ctrl-C to stop)")
            await until_signal(server.serve_forever())
        finally:
            if forge is not None:
                forge.close()

    obj.run(serve, role="webhook")


CLUSTER_COMMANDS = (up_cmd, agent_cmd, demo_cmd, api_cmd, webhook_cmd)
