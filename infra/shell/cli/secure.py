"""``ccc secure``: the cluster's credentials and certificates, from one command.

``init`` writes, into ``<data-dir>/secure`` (0700; secrets 0600): a CA, the server
certificate, the JetStream encryption key, one nkey user with a client certificate per
role, and the status API's bearer tokens (printed once). ``add-agent ID`` registers an
agent and writes the kit a remote machine needs; ``revoke-agent ID`` removes it: a running
embedded server reloads its users at once, so the agent is disconnected within seconds and
refused afterwards, and the health monitor re-queues its tasks. ``ccc up``, ``ccc server``
and ``ccc demo`` run ``init`` by themselves when nothing exists yet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from events.errors import ConfigError
from events.subjects import Namespace

from infra.shell.cli.context import CliState, run_async
from infra.shell.cli.output import emit_json


def _secure(obj: CliState):
    from infra.adapters.nats.secure import SecureDir

    settings = obj.settings()
    if settings.insecure:
        raise ConfigError("ccc secure manages the credentials of a secure cluster: drop --insecure")
    return SecureDir.of(settings.data_dir), Namespace(settings.namespace)


async def _provision_if_running(obj: CliState, ns: Namespace, agent_id: str | None = None) -> bool:
    """With the embedded server of this data dir running: reload its users and, as admin,
    provision the namespace's streams (so new roles can work at once), or with
    ``agent_id`` that agent's artifact bucket. Otherwise the next ``ccc server``/``up``
    does. True if a server was running."""
    from infra.adapters.nats.connection import connect_when_admitted, embedded_url_file
    from infra.adapters.nats.provisioning import provision, provision_agent
    from infra.adapters.nats.secure import reload_server

    settings = obj.settings()
    if not reload_server(settings.data_dir):
        return False
    url_file = embedded_url_file(settings.data_dir)
    url = settings.nats_url or (url_file.read_text().strip() if url_file.is_file() else "")
    if not url:
        return False
    nc = await connect_when_admitted(url, name="ccc-secure", settings=settings, role="admin", reconnect=False)
    try:
        if agent_id is None:
            await provision(nc, ns, replicas=settings.replicas)
        else:
            await provision_agent(nc, ns, agent_id, replicas=settings.replicas)
    finally:
        await nc.close()
    return True


@click.group("secure")
def secure_group() -> None:
    """Credentials and certificates: CA, mutual TLS, per-role nkey users, API tokens."""


@secure_group.command("init")
@click.option("--host", "hosts", multiple=True, metavar="NAME",
              help="Another name or address the server certificate is valid for (remote agents "
                   "connect to it); repeatable. Loopback and this host's name are always in.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secure_init(obj: CliState, hosts: tuple[str, ...], as_json: bool) -> None:
    """Create what is missing (idempotent; existing keys are kept)."""
    from infra.adapters.http.auth import create_api_tokens

    secure, ns = _secure(obj)
    created = secure.init(ns, hosts=hosts)
    running = run_async(_provision_if_running(obj, ns))  # new users admitted, streams there
    tokens: dict[str, str] = {}
    try:
        tokens = create_api_tokens(secure.path)
    except ConfigError:
        pass  # the tokens exist and may be deployed: never replaced behind the operator's back
    if as_json:
        emit_json({"secure_dir": str(secure.path), "users_created": created, "api_tokens": tokens,
                   "server_reloaded": running})
        return
    click.echo(f"credentials in {secure.path} (mode 0700)")
    for user in created:
        click.echo(f"  user {user}")
    if tokens:
        click.echo("status API bearer tokens (shown once; stored hashed):")
        for scope, token in tokens.items():
            click.echo(f"  {scope:5}  {token}")
    if hosts:
        click.echo(f"server certificate valid for: {', '.join(hosts)} (and loopback)")


@secure_group.command("add-agent")
@click.argument("agent_id")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR",
              help="Also copy the agent's kit here (to hand to the remote machine).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secure_add_agent(obj: CliState, agent_id: str, out: str | None, as_json: bool) -> None:
    """Register an agent and write the kit a remote machine needs: its nkey seed, its
    client certificate and key, and the CA. Run it there as
    `ccc --nats-url tls://HOST:PORT --creds KIT agent --agent-id ID`."""
    secure, ns = _secure(obj)
    if not secure.exists():
        secure.init(ns)
    kit = secure.add_agent(ns, agent_id)
    live = run_async(_provision_if_running(obj, ns, agent_id))
    kit_dir = kit.seed.parent
    if out:
        dest = Path(out)
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        for f in (kit.seed, kit.cert, kit.key, kit.ca, kit_dir / "kit.json"):
            shutil.copy2(f, dest / f.name)
        kit_dir = dest
    if as_json:
        emit_json({"agent_id": agent_id, "kit": str(kit_dir), "user": kit.kit.user,
                   "server_reloaded": live})
        return
    click.echo(f"agent {agent_id} registered ({kit.kit.user}); its kit: {kit_dir}")
    click.echo("  " + ("the running server admits it now" if live else
                       "the server admits it at its next start (none is running for this data dir)"))
    click.echo(f"  on the agent's machine: ccc --nats-url tls://HOST:PORT --creds {kit_dir} "
               f"agent --agent-id {agent_id}")


@secure_group.command("revoke-agent")
@click.argument("agent_id")
@click.pass_obj
def secure_revoke_agent(obj: CliState, agent_id: str) -> None:
    """Remove an agent's user and kit; a running server drops its connection at once."""
    from infra.adapters.nats.secure import reload_server

    secure, ns = _secure(obj)
    if not secure.revoke_agent(ns, agent_id):
        raise ConfigError(f"agent {agent_id!r} is not registered in {secure.path}")
    pids = reload_server(obj.settings().data_dir)
    click.echo(f"agent {agent_id} revoked" + ("; the server dropped its connection" if pids else ""))


@secure_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secure_list(obj: CliState, as_json: bool) -> None:
    """The registered users: role, namespace, agent id, public nkey."""
    secure, _ = _secure(obj)
    if not secure.exists():
        raise ConfigError(f"{secure.path} holds no credentials: run `ccc secure init`")
    from infra.shell.cli.output import print_table

    users = secure.users()
    if as_json:
        for k in users:
            emit_json({"user": k.user, "role": k.role, "namespace": k.namespace, "agent_id": k.agent_id,
                       "public_key": k.public_key})
        return
    print_table(["USER", "ROLE", "NAMESPACE", "NKEY"],
                [[k.user, k.role, k.namespace or "-", k.public_key] for k in users])
