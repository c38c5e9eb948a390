"""Credentials in NATS URLs never reach an error or startup line: not in the connect
error, not in what ``ccc`` prints (in-process and as a real process, logs included),
not in what ``ccc up`` and ``ccc agent`` print when they start against a server that
really wants the password."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from events.errors import StoreUnavailable
from infra.adapters.nats.connection import connect
from infra.adapters.nats.server import server_binary
from infra.shell.cli.main import cli
from tests.support.e2e import Processes, wait_for

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-pw"
URL = f"nats://user:{SECRET}@127.0.0.1:1"  # nothing listens on port 1
TOKEN_URL = f"nats://{SECRET}@127.0.0.1:1"


@pytest.mark.parametrize("url", [URL, TOKEN_URL, f"nats://127.0.0.1:1,{URL}"])
async def test_a_connect_error_names_the_server_without_the_credentials(url):
    with pytest.raises(StoreUnavailable) as e:
        await connect(url, connect_timeout=1.0, reconnect=False, quiet=True)
    assert SECRET not in str(e.value)
    assert "cannot connect to NATS at " in str(e.value) and "***@127.0.0.1:1" in str(e.value)


@pytest.mark.parametrize("args", [
    ["tasks"],
    ["issue", "publish", "--repo", "a/b", "--title", "t"],
    ["agent", "--specialty", "backend"],
    ["up", "--agents", "0", "--no-api"],
    ["api", "--port", "0"],
])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_ccc_commands_print_no_secret(tmp_path, args, how):
    env = {"CCC_DATA_DIR": str(tmp_path), "NATS_URL": URL if how == "env" else None}
    flags = ["--nats-url", URL] if how == "flag" else []
    result = CliRunner().invoke(cli, [*flags, *args], env=env)
    assert result.exit_code == 1, result.output
    assert SECRET not in result.output
    last = result.stderr.splitlines()[-1]  # (log lines of earlier in-process runs may come first)
    assert last.startswith("error: cannot connect to NATS at nats://***@127.0.0.1:1"), result.stderr


def test_a_real_process_with_debug_logs_prints_no_secret(tmp_path):
    env = {**os.environ, "CCC_DATA_DIR": str(tmp_path), "NATS_URL": URL, "CCC_LOG_FORMAT": "json"}
    for args in (["agent", "--specialty", "backend"], ["up", "--agents", "0", "--no-api"]):
        p = subprocess.run([sys.executable, "-m", "infra.shell.cli.main", "--log-level", "debug", *args],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert p.returncode == 1, p.stderr
        assert SECRET not in p.stdout + p.stderr
        assert "nats://***@127.0.0.1:1" in p.stderr


def test_a_mistyped_url_is_refused_without_its_password(tmp_path):
    result = CliRunner().invoke(cli, ["--nats-url", f"http://user:{SECRET}@host:4222", "tasks"],
                                env={"CCC_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2 and SECRET not in result.output
    assert "NATS_URL: 'http://***@host:4222' is not a nats:// or tls:// URL" in result.stderr


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def password_server(tmp_path):
    """A nats-server of our own that wants a user and password: the URL must carry them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js",
                             "-sd", str(tmp_path / "store"), "--user", "user", "--pass", SECRET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(port), 10, "nats-server to listen")
        yield f"nats://user:{SECRET}@127.0.0.1:{port}", port
    finally:
        proc.terminate()
        proc.wait(10)


def test_startup_lines_show_the_server_without_the_password(tmp_path, password_server):
    url, port = password_server
    procs = Processes(tmp_path / "procs")
    try:
        up = procs.start("up", tmp_path / "data", "--nats-url", url, "--log-level", "info",
                         "--log-format", "json", "up", "--agents", "1", "--no-api")
        out = up.wait_for_output("Ctrl-C to stop.")
        assert f"NATS        nats://***@127.0.0.1:{port}" in out
        agent = procs.start("agent", tmp_path / "data", "--nats-url", url, "--log-level", "debug",
                            "agent", "--specialty", "backend", "--agent-id", "remote-1")
        agent.wait_for_output("agent remote-1 (backend) registered")
        assert up.stop(signal.SIGINT) == 0 and agent.stop(signal.SIGINT) == 0
        everything = procs.logs()
        assert "cluster.up" in up.stderr  # the startup log line was written, masked
        assert SECRET not in everything
    finally:
        procs.close()
