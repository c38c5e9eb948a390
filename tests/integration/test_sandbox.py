"""The sandbox, from inside a real one (bubblewrap): what a command the coder or the
repository runs can see, write, reach and leave behind, and what stops it. Plus the
network allow-list through the real proxy, the Claude Code CLI (the fake one) in its
sandbox, the repository's setting read at clone time, fail-closed when no sandbox can
be made, and the agent's events saying which sandbox it runs.

These need bubblewrap (``bwrap``) and ``prlimit``: ``bash .ci/system-deps.sh`` installs
them. A machine without them fails here, loudly; it does not skip."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import pytest
from click.testing import CliRunner

from events.errors import ConfigError
from events.work import Budget, CodeRequest
from infra.adapters.coders.claude_cli import ClaudeCodeCoder
from infra.adapters.git import gitops
from infra.adapters.git.runner import run_command
from infra.adapters.git.sandbox import (
    BwrapSandbox,
    Limits,
    NetworkPolicy,
    NoSandbox,
    SandboxUnavailable,
)
from infra.adapters.git.test_output import parse_test_counts
from infra.adapters.git.workbench import GitWorkbench, repo_network_policy
from infra.adapters.git.workspace import Workspace

pytestmark = pytest.mark.timeout(60)

FAKE_CLAUDE_DIR = Path(__file__).resolve().parents[1] / "fakes" / "claude_cli"
AGENT_SECRET = "agent-only-secret-value-4242"


@pytest.fixture(autouse=True, scope="module")
def _needs_bubblewrap() -> None:
    for tool in ("bwrap", "prlimit"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the sandbox tests need it (bash .ci/system-deps.sh)")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir as the agent has it: credentials, the NATS URL, workspaces."""
    d = tmp_path / "data"
    (d / "secure").mkdir(parents=True)
    (d / "secure" / "agent.creds").write_text(AGENT_SECRET)
    (d / "nats.url").write_text(f"tls://user:{AGENT_SECRET}@127.0.0.1:4222\n")
    return d


def make_ws(data_dir: Path, sandbox=None, task: str = "acme_app-7") -> Workspace:
    return Workspace.create(data_dir / "workspaces", "agent-1", task, {"attempt": 1},
                            sandbox=sandbox or BwrapSandbox(hide=[data_dir]))


@pytest.fixture
def ws(data_dir: Path) -> Workspace:
    return make_ws(data_dir)


def limited(data_dir: Path, **limits) -> Workspace:
    return make_ws(data_dir, BwrapSandbox(hide=[data_dir], limits=Limits(**limits)))


def host_processes_with(marker: str) -> list[int]:
    """Live processes on the host whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


async def gone(marker: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while host_processes_with(marker):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# -- what it sees ------------------------------------------------------------------------------
async def test_only_its_own_processes_and_environment(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_TEST_DEPLOY_TOKEN", AGENT_SECRET)  # the agent's, scrubbed from commands
    monkeypatch.setenv("HARMLESS_SETTING", AGENT_SECRET + "-harmless")
    r = await ws.run(f"ls -d /proc/[0-9]*; cat /proc/*/environ | tr '\\0' '\\n'; "
                     f"cat /proc/{os.getpid()}/environ /proc/{os.getppid()}/environ; "
                     "tr '\\0' ' ' < /proc/1/cmdline", timeout=20)
    assert AGENT_SECRET not in r.output
    pids = [line for line in r.output.splitlines() if line.startswith("/proc/")]
    assert 1 <= len(pids) <= 6, pids  # bwrap's init, the shell and its children: nothing of the host
    assert "bwrap" in r.output and f"HOME={ws.home_dir}" in r.output
    r = await ws.run(["env"], timeout=20, env_allow=["HARMLESS_SETTING"])  # what is passed does arrive
    assert f"HARMLESS_SETTING={AGENT_SECRET}-harmless" in r.output


async def test_data_dir_home_venv_and_other_workspaces_are_absent(data_dir: Path, ws: Workspace) -> None:
    other = make_ws(data_dir, task="other_app-1")
    (other.repo_dir / "secret.txt").write_text(AGENT_SECRET)
    (Path.home() / ".ccc-sandbox-test").mkdir(exist_ok=True)
    try:
        targets = [data_dir / "secure" / "agent.creds", data_dir / "nats.url", other.repo_dir / "secret.txt",
                   ws.metadata_path, Path.home() / ".ccc-sandbox-test", Path(sys.prefix) / "bin",
                   Path(sys.executable)]
        script = "; ".join(f"if [ -e '{t}' ]; then echo 'VISIBLE {t}'; fi" for t in targets)
        r = await ws.run(script + "; echo checked; cat " + " ".join(f"'{t}'" for t in targets[:3]), timeout=20)
        assert "checked" in r.output and "VISIBLE" not in r.output, r.output
        assert AGENT_SECRET not in r.output
    finally:
        (Path.home() / ".ccc-sandbox-test").rmdir()


@pytest.fixture
def var_data_dir() -> Path:
    """A data dir outside /tmp (whose private copy in the sandbox is writable)."""
    d = Path(tempfile.mkdtemp(prefix="ccc-sandbox-test-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("where", ["var", "tmp"])
async def test_only_the_workspace_is_writable(where: str, data_dir: Path, var_data_dir: Path, tmp_path: Path) -> None:
    data = var_data_dir if where == "var" else data_dir
    ws = make_ws(data)
    outside = [Path("/usr/ccc-x"), Path("/etc/ccc-x"), Path("/ccc-x"), data / "ccc-x", ws.logs_dir / "x",
               ws.path / "ccc-x", tmp_path / "ccc-x"]
    script = "; ".join(f"if touch '{p}' 2>/dev/null; then echo 'WROTE {p}'; fi" for p in outside)
    r = await ws.run(script + "; echo r > in-repo; echo h > \"$HOME/h\"; echo t > \"$TMPDIR/t\"; "
                              "echo p > /tmp/private && echo ok", timeout=20)
    assert r.output.strip().endswith("ok"), r.output
    # outside /tmp nothing is writable; under /tmp a write lands in the sandbox's own /tmp
    wrote = [line.split(" ", 1)[1] for line in r.output.splitlines() if line.startswith("WROTE ")]
    assert all(w.startswith("/tmp/") for w in wrote), wrote
    assert not any(p.exists() for p in outside)  # and nothing reached the host
    assert (ws.repo_dir / "in-repo").read_text() == "r\n" and (ws.home_dir / "h").exists()
    assert (ws.tmp_dir / "t").exists() and not Path("/tmp/private").exists()  # its /tmp is its own
    r = await ws.run("echo x > ../metadata.json", timeout=20)
    assert json.loads(ws.metadata_path.read_text())["attempt"] == 1  # the network policy lives there
    assert r.exit_code != 0 or where == "tmp"


async def test_no_network_not_even_the_hosts_loopback(ws: Workspace) -> None:
    connections = []
    server = await asyncio.start_server(lambda r, w: (connections.append(1), w.close()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await ws.run(["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 3)"],
                         timeout=20)
        assert r.exit_code != 0 and "Connection refused" in r.output
        r = await ws.run(["python3", "-c", "import socket; socket.getaddrinfo('example.com', 443)"], timeout=20)
        assert r.exit_code != 0  # no DNS either
        assert connections == []
    finally:
        server.close()


# -- what it leaves behind and what stops it --------------------------------------------------------
async def test_a_setsid_daemon_does_not_outlive_the_command(ws: Workspace) -> None:
    r = await ws.run("setsid sleep 107.25 & nohup sleep 107.5 >/dev/null 2>&1 & echo started", timeout=20)
    assert r.ok and "started" in r.output and r.duration < 10
    assert await gone("107.25") and await gone("107.5")


async def test_a_timeout_ends_everything_it_started(ws: Workspace) -> None:
    r = await ws.run("setsid sleep 108.25 & sleep 108.5", timeout=1.0)
    assert r.timed_out and r.duration < 10
    assert await gone("108.25") and await gone("108.5")


async def test_a_fork_bomb_is_stopped_by_the_process_limit(data_dir: Path) -> None:
    ws = limited(data_dir, processes=40)
    script = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
              "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
              "except OSError as e:\n    print(f'fork failed after {n}: {e}', flush=True)\n")
    started = time.monotonic()
    r = await ws.run(["python3", "-c", script], timeout=30)
    assert "fork failed after" in r.output and "Resource temporarily unavailable" in r.output, r.output
    assert int(r.output.split("fork failed after ")[1].split(":")[0]) <= 40
    assert time.monotonic() - started < 15  # it ended with the command, not with the timeout
    # the classic one: its shell exits at once, and the PID namespace takes the rest with it
    r = await ws.run("bomb() { bomb | bomb & }; bomb; echo lit", timeout=10)
    assert not r.timed_out and "lit" in r.output


async def test_a_memory_hog_fails_inside_its_limit(data_dir: Path) -> None:
    r = await limited(data_dir, memory_bytes=256 << 20).run(["python3", "-c", "x = bytearray(1 << 30)"],
                                                             timeout=30)
    assert r.exit_code == 1 and "MemoryError" in r.output


async def test_a_huge_file_is_cut_at_the_file_size_limit(data_dir: Path) -> None:
    ws = limited(data_dir, file_size_bytes=1 << 20)
    r = await ws.run("head -c 20000000 /dev/zero > big", timeout=30, log_name="big")
    assert r.exit_code != 0 and (ws.repo_dir / "big").stat().st_size == 1 << 20
    assert "[sandbox: stopped by the sandbox's file size limit (1 MiB per file)]" in r.output
    assert "file size limit" in Path(r.log_path).read_text()  # the log says it too


async def test_cpu_time_is_limited(data_dir: Path) -> None:
    r = await limited(data_dir, cpu_seconds=1).run(["python3", "-c", "while True: pass"], timeout=30)
    assert not r.timed_out and r.duration < 15
    assert "[sandbox: stopped by the sandbox's CPU time limit (1 s per process)]" in r.output


async def test_the_repositorys_own_tests_run_and_pass_inside(ws: Workspace) -> None:
    (ws.repo_dir / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (ws.repo_dir / "test_calc.py").write_text(
        "import os, tempfile, unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
        "    def test_tmp(self):\n        with tempfile.NamedTemporaryFile() as f:\n"
        "            self.assertTrue(f.name.startswith(os.environ['TMPDIR']))\n")
    r = await ws.run(["python", "-m", "unittest", "-v"], timeout=60, log_name="tests")
    counts = parse_test_counts(r.output, r.exit_code)
    assert r.ok, r.output
    assert (counts.passed, counts.failed, counts.framework) == (2, 0, "unittest")


async def test_a_toolchain_outside_the_system_paths_is_shown_read_only(data_dir: Path, tmp_path: Path) -> None:
    tool = tmp_path / "toolchain"
    (tool / "bin").mkdir(parents=True)
    (tool / "bin" / "mytool").write_text("#!/bin/sh\necho tool ran\n")
    (tool / "bin" / "mytool").chmod(0o755)
    ws = make_ws(data_dir, BwrapSandbox(hide=[data_dir], read_only=[tool]))
    r = await ws.run(f"{tool}/bin/mytool && touch {tool}/x || echo read-only", timeout=20)
    assert "tool ran" in r.output and "read-only" in r.output and not (tool / "x").exists()
    with pytest.raises(ConfigError, match="it contains"):  # never a way to show what is hidden
        await make_ws(data_dir, BwrapSandbox(hide=[data_dir], read_only=[data_dir.parent]),
                      task="acme_app-9").run("true", timeout=20)


# -- network through the filtering proxy --------------------------------------------------------------
class Origin:
    """A tiny HTTP server on the host's loopback: what an allowed host would be."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                w.close()
                return
            self.requests.append(head)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            await w.drain()
            w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


FETCH = ("import sys, urllib.request\nfor url in sys.argv[1:]:\n    try:\n"
         "        print(url, urllib.request.urlopen(url, timeout=10).read().decode())\n"
         "    except Exception as e:\n        print(url, 'ERROR', e)\n")


async def test_an_allow_list_reaches_only_its_hosts_and_no_private_address(ws: Workspace) -> None:
    async with Origin() as origin:
        ws.set_network(NetworkPolicy(mode="hosts", hosts=(f"localhost:{origin.port}",)))
        listed, unlisted = f"http://localhost:{origin.port}/ok", f"http://127.0.0.1:{origin.port}/no"
        r = await ws.run(["python3", "-c", FETCH, listed, unlisted, "http://example.com/"], timeout=30)
        # listed by the repository, but it resolves to the host's loopback: refused
        assert f"{listed} ERROR HTTP Error 403" in r.output, r.output
        assert f"{unlisted} ERROR HTTP Error 403" in r.output and "http://example.com/ ERROR" in r.output
        assert f"[sandbox: network refused: localhost:{origin.port}: resolves to 127.0.0.1" in r.output
        assert f"[sandbox: network refused: 127.0.0.1:{origin.port}: not in the repository's network " \
               "allow-list" in r.output
        assert origin.requests == []


async def test_a_trusted_host_is_reached_by_connect_and_by_plain_http(ws: Workspace) -> None:
    async with Origin() as origin:
        entry = f"localhost:{origin.port}"
        tunnel = ("import http.client\nc = http.client.HTTPConnection('127.0.0.1', 3128, timeout=10)\n"
                  f"c.set_tunnel('localhost', {origin.port})\nc.request('GET', '/tunnelled')\n"
                  "print('TUNNEL', c.getresponse().read().decode())\n")
        async with ws.sandboxed(["/bin/sh", "-c", 'python3 -c "$1" && python3 -c "$2" "$3"', "sh", tunnel,
                                 FETCH, f"http://{entry}/plain"],
                                env=ws.environment(), network=NetworkPolicy(mode="hosts", hosts=(entry,),
                                                                             trusted=(entry,))) as launch:
            r = await run_command(launch.argv, shown="fetch", cwd=ws.repo_dir, env=launch.env, timeout=30)
        assert "TUNNEL hello" in r.output and f"http://{entry}/plain hello" in r.output, r.output
        assert [h.split(b"\r\n")[0] for h in origin.requests] == [b"GET /tunnelled HTTP/1.1",
                                                                    b"GET /plain HTTP/1.1"]
        assert b"Connection: close" in origin.requests[1]  # the origin connection is fixed to one request


# -- the Claude Code CLI in its sandbox ----------------------------------------------------------------
async def test_the_claude_cli_runs_sandboxed_with_the_model_api_only(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    key = "sk-" "ant-sandbox-test-abcdefgh"
    async with Origin() as api:
        monkeypatch.setenv("PATH", os.pathsep.join([str(FAKE_CLAUDE_DIR), os.environ.get("PATH", "")]))
        monkeypatch.setenv("ANTHROPIC_API_KEY", key)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{api.port}")
        monkeypatch.setenv("AGENT_TEST_DEPLOY_TOKEN", AGENT_SECRET)
        scenario, record = ws.home_dir / "scenario.json", ws.home_dir / "argv.json"
        scenario.write_text(json.dumps({
            "run": ["cat /proc/*/environ | tr '\\0' '\\n' | grep -c AGENT_TEST_DEPLOY_TOKEN",
                    f"cat '{data_dir / 'nats.url'}'", "ls -d /proc/[0-9]* | wc -l"],
            "fetch": [f"http://127.0.0.1:{api.port}/v1/models", "http://example.com/"],
            "edits": [{"path": "app.py", "content": "x = 1\n"}],
            "messages": [{"type": "result", "subtype": "success", "is_error": False, "num_turns": 1,
                          "result": "done", "total_cost_usd": 0.01}]}))
        coder = ClaudeCodeCoder(env={"FAKE_CLAUDE_SCENARIO": str(scenario), "FAKE_CLAUDE_ARGV": str(record)})
        request = CodeRequest(task_id=ws.task_id, attempt=1, title="t", body="b", specialty="backend",
                              repo="acme/app", repo_dir=str(ws.repo_dir), budget=Budget(max_dollars=0.75))
        out = await coder.implement(request, ws)
    assert out.status == "done", out.reason
    argv = json.loads(record.read_text())["argv"]
    assert argv[argv.index("--max-budget-usd") + 1] == "0.75"
    transcript = out.transcript
    assert "AGENT_TEST_DEPLOY_TOKEN -> 1: 0" in transcript  # the agent's secret: nowhere in /proc
    assert "nats.url' -> 1:" in transcript and AGENT_SECRET not in transcript  # the data dir: absent
    assert f"FETCH http://127.0.0.1:{api.port}/v1/models -> 200 hello" in transcript  # the model API
    assert "FETCH http://example.com/ -> error HTTP Error 403" in transcript  # nothing else
    assert (ws.repo_dir / "app.py").read_text() == "x = 1\n"
    assert [h.split(b"\r\n")[0] for h in api.requests] == [b"GET /v1/models HTTP/1.1"]


# -- the repository's setting, read once at clone time --------------------------------------------------
def origin_repo(tmp_path: Path, files: dict[str, str], symlink: tuple[str, str] | None = None) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir(parents=True)
    for name, text in {"README.md": "# app\n", **files}.items():
        (origin / name).parent.mkdir(parents=True, exist_ok=True)
        (origin / name).write_text(text)
    if symlink:
        (origin / symlink[0]).parent.mkdir(parents=True, exist_ok=True)
        (origin / symlink[0]).symlink_to(symlink[1])
    gitops.run_git(origin, "init", "-q", "-b", "main")
    gitops.commit_all(origin, "initial", "t", "t@example.com")
    return origin


def test_the_repositorys_network_is_fixed_at_clone_time(tmp_path: Path) -> None:
    origin = origin_repo(tmp_path, {".ccc/sandbox.toml": 'network = ["pypi.org"]\n'})
    bench = GitWorkbench(tmp_path / "ws", sandbox=BwrapSandbox())
    ws = bench.create_workspace("agent-1", "acme_app-1", {})
    bench.clone(str(origin), ws.repo_dir)
    assert ws.network() == NetworkPolicy(mode="hosts", hosts=("pypi.org",))
    # the coder (or a command) rewriting the file changes nothing for this attempt
    (ws.repo_dir / ".ccc" / "sandbox.toml").write_text('network = "full"\n')
    assert ws.network().hosts == ("pypi.org",) and repo_network_policy(ws.repo_dir).hosts == ("pypi.org",)


def test_the_operator_decides_and_a_symlinked_setting_is_refused(tmp_path: Path) -> None:
    origin = origin_repo(tmp_path, {".ccc/sandbox.toml": 'network = "full"\n'})
    for mode, ok in (("allow-list", False), ("allow-full", True)):
        bench = GitWorkbench(tmp_path / f"ws-{mode}", sandbox=BwrapSandbox(network_mode=mode))
        ws = bench.create_workspace("agent-1", "acme_app-1", {})
        if ok:
            bench.clone(str(origin), ws.repo_dir)
            assert ws.network().mode == "full"
        else:
            with pytest.raises(ConfigError, match="--sandbox-network allow-full"):
                bench.clone(str(origin), ws.repo_dir)
    linked = origin_repo(tmp_path / "l", {}, symlink=(".ccc/sandbox.toml", "/etc/hostname"))
    bench = GitWorkbench(tmp_path / "ws-l", sandbox=BwrapSandbox())
    ws = bench.create_workspace("agent-1", "acme_app-1", {})
    with pytest.raises(ConfigError, match="must be a regular file"):
        bench.clone(str(linked), ws.repo_dir)


# -- fail closed ------------------------------------------------------------------------------------------
async def test_no_command_runs_when_no_sandbox_can_be_made(data_dir: Path, tmp_path: Path) -> None:
    ws = make_ws(data_dir, BwrapSandbox("/nonexistent/bwrap"))
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap \(/nonexistent/bwrap\) not found.*--sandbox none"):
        await ws.run("touch ran", timeout=10)
    assert not (ws.repo_dir / "ran").exists()
    # bwrap is there but cannot make a sandbox (user namespaces denied): its own words
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    ws = make_ws(data_dir, BwrapSandbox(str(fake)), task="acme_app-8")
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace.*--sandbox none") as e:
        await ws.run("touch ran", timeout=10)
    assert e.value.retryable  # another agent, on another host, may have a sandbox
    assert not (ws.repo_dir / "ran").exists()


async def test_the_agent_records_its_sandbox_and_fails_attempts_without_one(nc, ns, store, tmp_path: Path) -> None:
    from actors.agent import Agent, AgentConfig
    from actors.coordinator import Coordinator, CoordinatorConfig
    from actors.pipeline import PipelineSettings
    from infra.adapters.coders.scripted import ScriptedCoder
    from infra.adapters.forge.local import LocalForge, LocalForgeClient
    from infra.adapters.nats.artifacts import ObjectStoreArtifacts
    from tests.conftest import eventually
    from tests.integration.test_coordinator import opened, publish_issue

    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/box", {"calc.py": "x = 1\n", ".ccc/test-command": "python3 -c pass\n"})
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "acme_box-1.json").write_text(json.dumps({"attempts": [{"summary": "s", "steps": [
        {"edit": {"path": "calc.py", "old": "x = 1", "new": "x = 2"}}]}]}))
    coordinator = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=5, retry_base=0.05, retry_max=0.1,
                                                        max_attempts=1))
    await coordinator.start()
    agents = []
    for agent_id, sandbox in (("agent-nobox", BwrapSandbox("/nonexistent/bwrap")), ("agent-none", NoSandbox())):
        config = AgentConfig(agent_id=agent_id, specialties=("backend",), heartbeat_interval=0.2,
                             shutdown_grace=0.5, pipeline=PipelineSettings(test_timeout=30))
        agent = Agent(nc, ns, config, workbench=GitWorkbench(tmp_path / "ws", sandbox=sandbox),
                      coder=ScriptedCoder(scripts), forge=LocalForgeClient(forge.root),
                      artifacts=ObjectStoreArtifacts(nc, ns.artifacts_bucket))
        await agent.start()
        agents.append(agent)
    try:
        registered = {}
        for agent_id in ("agent-nobox", "agent-none"):
            loaded = await store.load(ns.agent_filter(agent_id))
            registered[agent_id] = next(e.event for e in loaded.events
                                        if e.event.__struct_config__.tag == "agent.registered")
        assert registered["agent-nobox"].sandbox == "bwrap" and registered["agent-none"].sandbox == "none"
        await agents[1].stop()  # only the agent without a sandbox takes the task
        await publish_issue(nc, ns, opened(1, "Fix x", labels=["backend"], repo="acme/box"))

        async def failure():
            loaded = await store.load(ns.agent_filter("agent-nobox"))
            return next((e.event for e in loaded.events if e.event.__struct_config__.tag == "agent.work_failed"),
                        None)

        await eventually(failure, timeout=30)
        failed = await failure()
        assert failed.phase == "testing" and "no sandbox" in failed.reason and "--sandbox none" in failed.reason
        assert "acme_box-1" not in "".join(forge.branches("acme/box"))  # nothing was pushed
    finally:
        for agent in agents:
            await agent.stop()
        await coordinator.stop()


def test_the_cli_refuses_to_start_without_a_sandbox_and_warns_about_none(tmp_path: Path) -> None:
    from infra.shell.cli.main import cli

    env = {"CCC_DATA_DIR": str(tmp_path / "data"), "CCC_SANDBOX_BIN": "/nonexistent/bwrap"}
    r = CliRunner().invoke(cli, ["agent", "--specialty", "backend"], env=env)
    assert r.exit_code != 0 and "bubblewrap (/nonexistent/bwrap) not found" in r.output
    r = CliRunner().invoke(cli, ["up", "--no-api", "--agents", "1"], env=env)
    assert r.exit_code != 0 and "--sandbox none" in r.output


def test_ccc_demo_with_sandbox_none_warns_and_still_works() -> None:
    import subprocess

    ccc = Path(sys.executable).with_name("ccc")
    r = subprocess.run([str(ccc), "demo", "--sandbox", "none", "--json"], check=False, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CCC_SANDBOX_BIN": "/nonexistent/bwrap"})
    assert r.returncode == 0, r.stderr
    assert "warning: --sandbox none" in r.stderr and "unsandboxed" in r.stderr


async def test_the_bench_measures_both_sides() -> None:
    from infra.shell.bench.sandbox import run_sandbox_bench

    result = await run_sandbox_bench(runs=2)
    assert {(r.side, r.command) for r in result.results} == {
        (s, c) for s in ("plain", "bwrap", "bwrap+proxy") for c in ("true", "python3 -c pass")}
    assert all(r.median_ms > 0 for r in result.results)
    assert set(result.ratios["true"]) == {"bwrap", "bwrap+proxy"}
