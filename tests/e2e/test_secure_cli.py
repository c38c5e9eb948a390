"""``ccc secure`` and the secure defaults, through the command line."""

from __future__ import annotations

import asyncio
import json
import uuid

from click.testing import CliRunner

from events.subjects import Namespace
from infra.adapters.nats.secure import SecureDir
from infra.shell.cli.main import cli


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_init_add_list_revoke(tmp_path) -> None:
    d = str(tmp_path / "data")
    r = run("--data-dir", d, "secure", "init", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["users_created"]) == {"admin", "ccc.coordinator", "ccc.webhook", "ccc.cli", "ccc.status", "ccc.ci"}
    assert set(out["api_tokens"]) == {"read", "write"}
    again = json.loads(run("--data-dir", d, "secure", "init", "--json").stdout)
    assert again["users_created"] == [] and again["api_tokens"] == {}  # idempotent: nothing replaced

    kit_out = tmp_path / "kit"
    r = run("--data-dir", d, "secure", "add-agent", "remote-1", "--out", str(kit_out))
    assert r.exit_code == 0, r.output
    assert "remote-1 registered" in r.output and "--creds" in r.output
    assert sorted(p.name for p in kit_out.iterdir()) == ["ca.pem", "cert.pem", "key.pem", "kit.json", "user.nk"]
    assert (kit_out / "user.nk").stat().st_mode & 0o077 == 0
    listed = [json.loads(line) for line in run("--data-dir", d, "secure", "list", "--json").stdout.splitlines()]
    assert {"user": "ccc.agent.remote-1", "role": "agent"}.items() <= next(
        u for u in listed if u["user"] == "ccc.agent.remote-1").items()
    assert "ccc.agent.remote-1" in (tmp_path / "data" / "secure" / "auth.conf").read_text()

    r = run("--data-dir", d, "secure", "revoke-agent", "remote-1")
    assert r.exit_code == 0 and "revoked" in r.output
    assert "ccc.agent.remote-1" not in (tmp_path / "data" / "secure" / "auth.conf").read_text()
    r = run("--data-dir", d, "secure", "revoke-agent", "remote-1")
    assert r.exit_code == 2 and "not registered" in r.output


def test_insecure_is_explicit_and_warns(tmp_path) -> None:
    r = run("--data-dir", str(tmp_path), "--insecure", "tasks")
    assert r.exit_code == 0, r.output
    assert "warning: --insecure" in r.output
    assert not (tmp_path / "secure").exists()
    r = run("--data-dir", str(tmp_path / "s"), "tasks")  # the default: secure, generated on first use
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output and SecureDir.of(tmp_path / "s").exists()


async def test_an_agent_without_its_streams_exits_naming_the_stream(nats_server, nats_url) -> None:
    """Provisioning is the admin's: an agent (no admin rights) on a namespace nobody
    provisioned stops at once with one line naming the missing stream."""
    ns = Namespace("u" + uuid.uuid4().hex[:8])
    kit = SecureDir.of(nats_server.data_dir).add_agent(ns, "a1")
    nats_server.reload()
    await asyncio.sleep(0.3)  # the reload (SIGHUP) is asynchronous
    r = await asyncio.to_thread(run, "--nats-url", nats_url, "--creds", str(kit.seed.parent), "--namespace",
                                ns.prefix, "agent", "--agent-id", "a1", "--specialty", "backend")
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: stream {ns.events_stream} is missing: provisioning is an admin step "
                     "(`ccc server`, `ccc up` or `ccc secure init` on the server's machine)"]
