"""``ccc``: the command line of claude-code-cluster.

Every command that talks to NATS uses ``--nats-url`` / ``NATS_URL`` if given, otherwise
the embedded server of the data dir (the one ``ccc server`` runs, or one started for
the duration of the command), and provisions streams and buckets first (idempotent).

Errors the project raises on purpose (:class:`CccError`) are printed as one line,
``error: <message>``, on stderr: exit 2 for bad settings or input, 1 for everything
else. Click's own usage errors keep click's format and exit code 2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import click
import msgspec
import nats.errors

from events.errors import CccError, ConfigError, StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace

from infra.shell.cli.cluster import CLUSTER_COMMANDS
from infra.shell.cli.forge import FORGE_COMMANDS
from infra.shell.cli.read import READ_COMMANDS, emit_json, print_table
from infra.adapters.nats.settings import Settings, load_settings

LOG_LEVELS = ("debug", "info", "warning", "error")


# -- shared state and running -----------------------------------------------------
class CliState:
    """The global options, and how a command gets a provisioned connection."""

    def __init__(self, nats_url: str | None, data_dir: str | None, namespace: str, log_level: str) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.namespace = namespace
        self.log_level = log_level
        self._settings: Settings | None = None

    def settings(self, **overrides) -> Settings:
        if overrides:
            return load_settings(**{"nats_url": self.nats_url, "data_dir": self.data_dir, **overrides})
        if self._settings is None:
            self._settings = load_settings(nats_url=self.nats_url, data_dir=self.data_dir)
        return self._settings

    @property
    def ns(self) -> Namespace:
        return Namespace(self.namespace)  # validates: ConfigError

    def store(self, nc) -> EventStore:
        return EventStore(nc, self.ns, timeout=self.settings().request_timeout)

    def run(self, fn: Callable[[object], Awaitable]) -> object:
        """Connect (``NATS_URL`` or the embedded server), provision, ``await fn(nc)``."""
        from infra.adapters.nats.connection import open_nats
        from infra.adapters.nats.provisioning import provision

        settings, ns = self.settings(), self.ns

        async def go():
            if settings.nats_url:
                await probe(settings.nats_url, settings)
            else:
                await _drop_stale_url_file(settings)
            async with open_nats(settings) as nc:
                await provision(nc, ns, replicas=settings.replicas)
                return await fn(nc)

        return run_async(go())


async def probe(url: str, settings: Settings | None = None, timeout: float = 3.0) -> None:
    """Raise :class:`StoreUnavailable` quickly and quietly if ``url`` cannot be reached."""
    from infra.adapters.nats.connection import connect

    nc = await connect(url, name="ccc-probe", settings=settings, connect_timeout=timeout,
                       reconnect=False, quiet=True)
    await nc.close()


async def reachable(url: str, settings: Settings | None = None) -> bool:
    try:
        await probe(url, settings, timeout=1.0)
    except StoreUnavailable:
        return False
    return True


def run_async(coro: Awaitable) -> object:
    """``asyncio.run``, with failures of the NATS client that escaped as its own
    exception types turned into :class:`StoreUnavailable` (one line, exit 1)."""
    try:
        return asyncio.run(coro)
    except (nats.errors.Error, asyncio.TimeoutError) as e:
        raise StoreUnavailable(f"NATS: {type(e).__name__}: {e}") from None


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


class CccGroup(click.Group):
    """Turns the project's errors into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own (Exit and Abort are RuntimeErrors)
        except CccError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2 if isinstance(e, ConfigError) else 1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `ccc events | head`: the reader left; not an error
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - nothing more to say
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            ctx.exit(0)
        except Exception as e:  # noqa: BLE001 - a bug or an unwrapped library error
            if isinstance(ctx.obj, CliState) and ctx.obj.log_level == "debug":
                raise
            click.echo(f"error: unexpected {type(e).__name__}: {e} (--log-level debug shows the traceback)",
                       err=True)
            ctx.exit(1)


@click.group(cls=CccGroup, name="ccc", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nats-url", envvar="NATS_URL", metavar="URL",
              help="NATS server(s), comma-separated [env NATS_URL]. "
                   "Default: the embedded server of the data dir.")
@click.option("--data-dir", envvar="CCC_DATA_DIR", type=click.Path(file_okay=False), metavar="DIR",
              help="State dir of the embedded server [env CCC_DATA_DIR].")
@click.option("--namespace", envvar="CCC_NAMESPACE", default="ccc", show_default=True, metavar="NAME",
              help="Subject prefix / stream names: several clusters can share one NATS [env CCC_NAMESPACE].")
@click.option("--log-level", envvar="CCC_LOG_LEVEL", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="warning", show_default=True, help="Log level (logs go to stderr) [env CCC_LOG_LEVEL].")
@click.option("--log-format", envvar="CCC_LOG_FORMAT", type=click.Choice(["auto", "json", "console"]),
              default="auto", show_default=True,
              help="auto: JSON lines unless stderr is a terminal [env CCC_LOG_FORMAT].")
@click.version_option(package_name="claude-code-cluster", prog_name="ccc")
@click.pass_context
def cli(ctx: click.Context, nats_url, data_dir, namespace, log_level, log_format) -> None:
    """claude-code-cluster: coding agents coordinated through an event log on NATS
    JetStream."""
    from infra.adapters.obs.logs import configure_logging
    from infra.adapters.obs.tracing import setup_tracing

    configure_logging(log_level.lower(), json={"auto": None, "json": True, "console": False}[log_format])
    # spans are always created (so context flows through NATS headers); exported only
    # when OTEL_* says where (OTLP endpoint, or console)
    setup_tracing(f"ccc-{ctx.invoked_subcommand or 'cli'}")
    ctx.obj = CliState(nats_url, data_dir, namespace, log_level.lower())


for _command in (*READ_COMMANDS, *CLUSTER_COMMANDS, *FORGE_COMMANDS):
    cli.add_command(_command)

from infra.shell.chaos.suite import chaos_cmd  # noqa: E402 - the fault suite

cli.add_command(chaos_cmd)


# -- server -----------------------------------------------------------------------
async def _provision_at(url: str, settings: Settings, ns: Namespace) -> None:
    from infra.adapters.nats.connection import connect
    from infra.adapters.nats.provisioning import provision

    nc = await connect(url, name="ccc-server", settings=settings)
    try:
        await provision(nc, ns, replicas=settings.replicas)
    finally:
        await nc.close()


@cli.command("server")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Client port; 0 picks a free one.")
@click.option("--data-dir", "server_data_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Overrides the global --data-dir.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Monitoring port (/healthz, /jsz); 0 = off.")
@click.pass_obj
def server_cmd(obj: CliState, port: int, server_data_dir: str | None, http_port: int) -> None:
    """Run the embedded nats-server in the foreground.

    Provisions the streams and buckets, writes the URL to <data-dir>/nats.url
    (where every other ccc command with the same data dir and no --nats-url finds
    it) and runs until Ctrl-C / SIGTERM."""
    from infra.adapters.nats.connection import embedded_url_file
    from infra.adapters.nats.server import EmbeddedServer

    settings = obj.settings(data_dir=server_data_dir) if server_data_dir else obj.settings()
    ns = obj.ns
    data_dir = settings.data_dir
    url_file = embedded_url_file(data_dir)
    if url_file.is_file():
        existing = url_file.read_text().strip()
        if existing and run_async(reachable(existing, settings)):
            raise ConfigError(f"a server for {data_dir} is already running at {existing}")

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = EmbeddedServer(data_dir, port=port or None, http_port=http_port,
                            sync_interval=settings.sync_interval)
    url = ""
    try:
        url = server.start()
        run_async(_provision_at(url, settings, ns))
        tmp = url_file.with_suffix(".tmp")
        tmp.write_text(url + "\n")
        tmp.replace(url_file)  # atomic: a reader never sees half a URL
        _print_server_hints(url, data_dir, settings, ns, http_port)
        while not stop.wait(0.2):
            if not server.running:
                raise StoreUnavailable(f"nats-server exited unexpectedly (log: {server.log_file})")
    finally:
        try:
            if url and url_file.is_file() and url_file.read_text().strip() == url:
                url_file.unlink()
        finally:
            server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    click.echo("nats-server stopped", err=True)


def _print_server_hints(url: str, data_dir: Path, settings: Settings, ns: Namespace, http_port: int) -> None:
    lines = [
        f"nats-server ready at {url}",
        f"  data dir       {data_dir}  (sync_interval {settings.sync_interval})",
        f"  streams        {ns.events_stream}, {ns.issues_stream}, {ns.heartbeats_stream}",
        "  other ccc commands with the same data dir find this server by themselves;",
        f"  elsewhere:     export NATS_URL={url}",
        f"  watch events:  nats --server {url} sub '{ns.prefix}.>'",
        f"  the log:       nats --server {url} stream view {ns.events_stream}",
        f"  task view:     nats --server {url} kv ls {ns.tasks_bucket}",
    ]
    if http_port:
        lines.append(f"  monitoring:    http://127.0.0.1:{http_port}/jsz")
    lines.append("Ctrl-C to stop.")
    for line in lines:
        click.echo(line)


# -- issues -------------------------------------------------------------------------
@cli.group("issue")
def issue_group() -> None:
    """Issue facts for the local forge.

    What a webhook would deliver for a GitHub repository."""


@issue_group.command("publish")
@click.option("--repo", required=True, metavar="OWNER/NAME", help="Repository: 'owner/name' or 'name'.")
@click.option("--title", required=True, help="Issue title (non-empty).")
@click.option("--body", default="", help="Issue body; '-' reads it from stdin.")
@click.option("--label", "labels", multiple=True, metavar="LABEL", help="A label (repeatable).")
@click.option("--number", type=click.IntRange(min=1), default=None,
              help="Issue number; default: the next free one for the repo. A repeat is a no-op.")
@click.option("--source", default="local", show_default=True, help="Where the issue lives.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def issue_publish(obj: CliState, repo, title, body, labels, number, source, as_json) -> None:
    """Publish an IssueOpened to the intake stream.

    Prints its subject, stream sequence and the id of the task it becomes."""
    from infra.adapters.nats.issue_publisher import new_issue, open_issue

    if body == "-":
        body = sys.stdin.read()
    new_issue(repo=repo, title=title, body=body, labels=labels, number=number or 1, source=source)
    ns = obj.ns
    timeout = obj.settings().request_timeout
    published = obj.run(lambda nc: open_issue(
        nc, ns, repo=repo.strip(), title=title, body=body, labels=labels, number=number,
        source=source, timeout=timeout,
    ))
    e = published.event
    if as_json:
        emit_json({"subject": published.subject, "stream": published.stream, "seq": published.seq,
                   "duplicate": published.duplicate, "source": e.source, "repo": e.repo,
                   "number": e.number, "event_id": e.event_id, "task_id": published.task_id})
        return
    what = f"{e.source}:{e.repo}#{e.number}"
    if published.duplicate:
        click.echo(f"duplicate: {what} was already published; nothing new written")
    else:
        click.echo(f"opened {what}: {e.title}")
    click.echo(f"  subject  {published.subject}")
    click.echo(f"  seq      {published.seq} ({published.stream})")
    click.echo(f"  task id  {published.task_id}")


# -- bench ---------------------------------------------------------------------------
@cli.group("bench")
def bench_group() -> None:
    """Benchmarks against the client ceiling."""


APPEND_TARGET, REBUILD_TARGET = 0.5, 0.75


@bench_group.command("store")
@click.option("--events", "n_events", type=click.IntRange(min=7), default=20000, show_default=True,
              help="Events per round.")
@click.option("--rounds", type=click.IntRange(1, 50), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def bench_store(obj: CliState, n_events: int, rounds: int, as_json: bool) -> None:
    """Event store append and rebuild vs raw nats-py.

    Targets: append >= 0.5 of raw pipelined publish, rebuild >= 0.75 of a raw
    ordered-consumer replay. Uses its own temporary nats-server."""
    from infra.shell.bench.store import run_store_bench

    sync_interval = obj.settings().sync_interval
    result = _with_progress(rounds, lambda progress: run_async(run_store_bench(
        n_events=n_events, rounds=rounds, sync_interval=sync_interval, progress=progress)))
    if as_json:
        emit_json({**msgspec.to_builtins(result), "append_target": APPEND_TARGET,
                   "rebuild_target": REBUILD_TARGET})
        return

    def row(name, raw, ours, ratio, target):
        return (name, f"{raw:,.0f}/s", f"{ours:,.0f}/s", f"{ratio:.3f}", f">= {target}",
                "ok" if ratio >= target else "BELOW")

    print_table(
        ("METRIC", "RAW", "PROJECT", "RATIO", "TARGET", "RESULT"),
        [row("append", result.raw_publish_per_s, result.append_per_s, result.append_ratio, APPEND_TARGET),
         row("rebuild", result.raw_replay_per_s, result.rebuild_per_s, result.rebuild_ratio, REBUILD_TARGET)],
        footer=[f"{result.events} events x {result.rounds} rounds (median), "
                f"{result.avg_event_bytes} B/event, sync_interval {result.sync_interval}"],
    )


@bench_group.command("dispatch")
@click.option("--agents", "agents", type=click.IntRange(min=1), default=None,
              help="Registered idle agents for the latency runs (one run). Default: 10, 100 and 1000.")
@click.option("--tasks", type=click.IntRange(min=1), default=200, show_default=True,
              help="Issues per latency run, published one at a time.")
@click.option("--throughput-tasks", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Issues for the throughput run, published pipelined (0: skip it).")
@click.option("--throughput-agents", type=click.IntRange(min=1), default=10, show_default=True,
              help="Null agents in the throughput run.")
@click.option("--sync-interval", default="always", show_default=True, metavar="INTERVAL",
              help='The throwaway server\'s JetStream sync_interval ("always" fsyncs every write; e.g. "1s").')
@click.option("--immediate-reports", is_flag=True,
              help="Null agents report back to back instead of after the coordinator's previous reaction.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Run the coordinator under cProfile; write its stats to DIR (inflates the figures).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench_dispatch(agents: int | None, tasks: int, throughput_tasks: int, throughput_agents: int,
                   sync_interval: str, immediate_reports: bool, profile_dir: str | None, as_json: bool) -> None:
    """Coordinator dispatch latency and orchestration throughput vs raw JetStream.

    Latency: issue published -> TaskAssigned observed, one issue at a time, with N idle
    agents. Throughput: issues -> completed through the whole task state machine with
    null agents that do no work. Targets: p50 <= 3 ms, p99 <= 10 ms (100 agents),
    >= 1,000 tasks/s. Uses its own temporary nats-server; the coordinator runs in its
    own process."""
    from infra.shell.bench.dispatch import run_dispatch_bench
    from infra.shell.bench.report import footer, rows

    counts = (agents,) if agents else (10, 100, 1000)
    steps = 1 + len(counts) + (1 if throughput_tasks else 0)
    result = _with_progress(steps, lambda progress: run_async(run_dispatch_bench(
        agent_counts=counts, tasks=tasks, throughput_tasks=throughput_tasks, sync_interval=sync_interval,
        progress=progress, throughput_agents=throughput_agents, profile_dir=profile_dir,
        immediate_reports=immediate_reports)))
    if as_json:
        emit_json(msgspec.to_builtins(result))
        return
    print_table(("METRIC", "VALUE", "BASELINE", "RATIO", "TARGET", "RESULT"), rows(result),
                footer=footer(result))


def _with_progress(rounds: int, fn):
    if sys.stderr.isatty():
        from rich.progress import Progress

        from infra.shell.cli.read import console

        with Progress(console=console(stderr=True), transient=True) as progress:
            bar = progress.add_task("benchmarking", total=rounds)
            return fn(lambda done, total: progress.update(bar, completed=done))
    return fn(lambda done, total: click.echo(f"bench: round {done}/{total} done", err=True))


# -- status API -------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="ccc")


if __name__ == "__main__":
    main()
