"""``ccc server``: the embedded nats-server in the foreground, for other commands (and
machines) to share."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from events.errors import ConfigError, StoreUnavailable
from events.subjects import Namespace

from infra.adapters.nats.settings import Settings
from infra.shell.app.signals import StopSignals
from infra.shell.cli.context import CliState, nats_cli_flags, reachable, run_async


async def _provision_at(url: str, settings: Settings, ns: Namespace) -> None:
    """Provisioning is the admin's step: the streams and buckets, and the artifact bucket
    of every agent registered in the secure directory."""
    from infra.adapters.nats.connection import connect
    from infra.adapters.nats.provisioning import provision, provision_agent
    from infra.adapters.nats.secure import SecureDir

    nc = await connect(url, name="ccc-server", settings=settings, role="admin")
    try:
        await provision(nc, ns, replicas=settings.replicas)
        secure = SecureDir.of(settings.data_dir)
        if not settings.insecure and secure.exists():
            for kit in secure.agents():
                if kit.namespace == ns.prefix and kit.agent_id:
                    await provision_agent(nc, ns, kit.agent_id, replicas=settings.replicas)
    finally:
        await nc.close()


@click.command("server")
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
    ns = Namespace(settings.namespace)  # validates: ConfigError
    data_dir = settings.data_dir
    url_file = embedded_url_file(data_dir)
    if url_file.is_file():
        existing = url_file.read_text().strip()
        if existing and run_async(reachable(existing, settings)):
            from infra.adapters.obs.masking import redact_url

            raise ConfigError(f"a server for {data_dir} is already running at {redact_url(existing)}")

    server = EmbeddedServer.for_settings(settings, ns, port=port or None, http_port=http_port)
    url = ""

    def stop_server() -> None:
        try:
            if url and url_file.is_file() and url_file.read_text().strip() == url:
                url_file.unlink()
        finally:
            server.stop()

    async def serve() -> None:
        nonlocal url
        with StopSignals() as signals:
            try:
                url = server.start()  # blocks the loop: a signal meanwhile is seen at the next await
                await _provision_at(url, settings, ns)
                tmp = url_file.with_suffix(".tmp")
                tmp.write_text(url + "\n")
                tmp.replace(url_file)  # atomic: a reader never sees half a URL
                _print_server_hints(url, data_dir, settings, ns, http_port)
                while not await signals.wait(0.2):
                    if not server.running:
                        raise StoreUnavailable(f"nats-server exited unexpectedly (log: {server.log_file})")
            except asyncio.CancelledError:
                if not signals.received:
                    raise  # not a signal of ours
            finally:
                await signals.cleanup(asyncio.to_thread(stop_server))

    run_async(serve())
    click.echo("nats-server stopped", err=True)


def _print_server_hints(url: str, data_dir: Path, settings: Settings, ns: Namespace, http_port: int) -> None:
    from infra.adapters.obs.masking import redact_url

    url = redact_url(url)  # startup lines never show a credential (the nats.url file may)
    auth = nats_cli_flags(settings, ns)
    secure = data_dir / "secure"
    lines = [
        f"nats-server ready at {url}" + ("  (INSECURE: no TLS, no users)" if settings.insecure else
                                         "  (mutual TLS, nkey users, encrypted store)"),
        f"  data dir       {data_dir}  (sync_interval {settings.sync_interval})",
        f"  streams        {ns.events_stream}, {ns.issues_stream}, {ns.heartbeats_stream}",
        "  other ccc commands with the same data dir find this server by themselves;",
        f"  elsewhere:     export NATS_URL={url}",
        f"  watch events:  nats --server {url}{auth} sub '{ns.prefix}.>'",
        f"  the log:       nats --server {url}{auth} stream view {ns.events_stream}",
        f"  task view:     nats --server {url}{auth} kv ls {ns.tasks_bucket}",
    ]
    if not settings.insecure:
        lines.append(f"  credentials:   {secure}  (a remote agent: ccc secure add-agent ID)")
    if http_port:
        lines.append(f"  monitoring:    http://127.0.0.1:{http_port}/jsz")
    lines.append("Ctrl-C to stop.")
    for line in lines:
        click.echo(line)
