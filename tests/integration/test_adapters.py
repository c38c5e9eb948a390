"""Workspace (confinement, commands, environment, cleanup). No NATS, no network: real
processes in tmp dirs."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from events.errors import CccError, ConfigError
from infra.adapters.git.cleanup import cleanup_expired
from infra.adapters.git.sandbox import NoSandbox
from infra.adapters.git.workspace import Workspace, WorkspaceEscape

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    # the runner's own mechanics (process groups, seen from outside by pid; the agent's
    # interpreter): no sandbox here. The same guarantees inside one: tests/integration/test_sandbox.py
    return Workspace.create(tmp_path / "ws", "agent-1", "acme_app-7", {"attempt": 1}, sandbox=NoSandbox())


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# -- layout and metadata -------------------------------------------------------------
def test_create_layout_and_fresh_retry(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path, "agent-1", "t-1", {"attempt": 1})
    assert ws.path == (tmp_path / "agent-1" / "tasks" / "task-t-1").resolve()
    assert ws.repo_dir.is_dir() and ws.logs_dir.is_dir()
    assert ws.read_metadata()["attempt"] == 1
    (ws.repo_dir / "leftover.txt").write_text("half-applied edit")
    ro = ws.home_dir / "cache"
    ro.mkdir()
    (ro / "f").write_text("x")
    ro.chmod(0o500)  # like Go's module cache
    again = Workspace.create(tmp_path, "agent-1", "t-1", {"attempt": 2})
    assert not (again.repo_dir / "leftover.txt").exists()
    assert again.read_metadata()["attempt"] == 2
    again.update_metadata(branch="ccc/x")
    assert again.read_metadata()["branch"] == "ccc/x"
    assert Workspace.open(tmp_path, "agent-1", "t-1").read_metadata()["attempt"] == 2


def test_ids_cannot_escape_the_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Workspace(tmp_path, "../evil", "t-1")
    with pytest.raises(ConfigError):
        Workspace(tmp_path, "a", "t/../../x")


# -- confinement ---------------------------------------------------------------------
def test_confine(ws: Workspace, tmp_path: Path) -> None:
    assert ws.confine("src/app.py") == ws.repo_dir.resolve() / "src" / "app.py"
    assert ws.confine(".") == ws.repo_dir.resolve()
    for bad in ("../x", "src/../../x", "/etc/passwd", "", ".git/hooks/pre-commit", "~/x"):
        with pytest.raises(WorkspaceEscape):
            ws.confine(bad)
    err = pytest.raises(WorkspaceEscape, ws.confine, "../x").value
    assert isinstance(err, CccError) and not err.retryable


def test_confine_refuses_symlinks_pointing_outside(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws.repo_dir / "link").symlink_to(outside)
    (ws.repo_dir / "file-link").symlink_to(outside / "secret.txt")
    (ws.repo_dir / "git-link").symlink_to(ws.repo_dir / ".git")
    (ws.repo_dir / "inner").mkdir()
    (ws.repo_dir / "ok-link").symlink_to(ws.repo_dir / "inner")
    for bad in ("link", "link/x.txt", "file-link", "git-link/config"):
        with pytest.raises(WorkspaceEscape):
            ws.confine(bad)
    assert ws.confine("ok-link/x") == ws.repo_dir.resolve() / "inner" / "x"


# -- commands ------------------------------------------------------------------------
async def test_run_captures_output_and_exit_code(ws: Workspace) -> None:
    r = await ws.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, log_name="first")
    assert r.exit_code == 3 and not r.timed_out and not r.ok
    assert "out" in r.output and "err" in r.output
    assert r.log_path and Path(r.log_path).read_text() == r.output
    assert Path(r.log_path).parent == ws.logs_dir
    r = await ws.run("pwd", timeout=10)
    assert r.ok and r.output.strip() == str(ws.repo_dir.resolve())
    r = await ws.run(["definitely-not-a-command-xyz"], timeout=10)
    assert r.exit_code == 127


async def test_run_cwd_is_confined(ws: Workspace) -> None:
    (ws.repo_dir / "sub").mkdir()
    r = await ws.run("pwd", timeout=10, cwd="sub")
    assert r.output.strip().endswith("/repo/sub")
    with pytest.raises(WorkspaceEscape):
        await ws.run("pwd", timeout=10, cwd="..")
    with pytest.raises(WorkspaceEscape):
        await ws.run("pwd", timeout=10, cwd="/tmp")


async def test_timeout_kills_the_whole_process_group(ws: Workspace) -> None:
    task = asyncio.create_task(ws.run("echo $$ > leader.pid; sleep 30 & sleep 30", timeout=1.0))
    pidfile = ws.repo_dir / "leader.pid"
    await _until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    pgid = int(pidfile.read_text())
    await _until(lambda: len(_group_members(pgid)) >= 3)  # sh + two sleeps
    r = await task
    assert r.timed_out and r.exit_code != 0 and r.duration < 10
    await _until(lambda: not _group_members(pgid))


async def test_background_leftovers_are_killed_after_a_normal_exit(ws: Workspace) -> None:
    started = time.monotonic()
    r = await ws.run("echo $$ > leader.pid; sleep 30 & echo done", timeout=20)
    assert r.ok and not r.timed_out and "done" in r.output
    assert time.monotonic() - started < 10  # did not wait for the background sleep
    pgid = int((ws.repo_dir / "leader.pid").read_text())
    await _until(lambda: not _group_members(pgid))


async def test_cancellation_kills_the_group_and_propagates(ws: Workspace) -> None:
    task = asyncio.create_task(ws.run("echo $$ > leader.pid; sleep 30 & sleep 30", timeout=30))
    pidfile = ws.repo_dir / "leader.pid"
    await _until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    pgid = int(pidfile.read_text())
    await _until(lambda: len(_group_members(pgid)) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: not _group_members(pgid))


async def test_environment_is_scrubbed(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOO_TOKEN", "tok-123456789")
    monkeypatch.setenv("NATS_URL", "nats://user:pw@host:4222")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-" "ant-abcdefghijkl")
    monkeypatch.setenv("CCC_WEBHOOK_SECRET", "hook-secret")
    monkeypatch.setenv("DB_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("HARMLESS_SETTING", "visible")
    monkeypatch.setenv("NOT_ALLOWED", "hidden")
    r = await ws.run(["env"], timeout=10, env_allow=["HARMLESS_SETTING"], env={"EXPLICIT": "yes"})
    env = dict(line.split("=", 1) for line in r.output.splitlines() if "=" in line)
    hidden = ("FOO_TOKEN", "NATS_URL", "ANTHROPIC_API_KEY", "CCC_WEBHOOK_SECRET", "DB_PASSWORD",
              "NOT_ALLOWED")
    for name in hidden:
        assert name not in env
    assert env["HARMLESS_SETTING"] == "visible" and env["EXPLICIT"] == "yes"
    assert env["HOME"] == str(ws.home_dir) and env["TMPDIR"] == str(ws.tmp_dir)
    assert Path(env["HOME"]).is_relative_to(ws.path) and "PATH" in env
    with pytest.raises(ConfigError):
        await ws.run(["env"], timeout=10, env_allow=["FOO_TOKEN"])


async def test_output_is_truncated_with_a_marker(ws: Workspace) -> None:
    script = "import sys; sys.stdout.write('H' * 5000 + 'x' * 50000 + 'T' * 5000)"
    r = await ws.run([sys.executable, "-c", script], timeout=20, log_name="big", max_output=1000)
    assert r.output.startswith("H" * 500) and r.output.endswith("T" * 500)
    assert "[... 59000 bytes of output truncated (60000 total) ...]" in r.output
    assert len(r.output) < 1100 and r.output_bytes == 60000
    assert len(Path(r.log_path).read_text()) == 60000  # the log keeps everything


# -- cleanup -------------------------------------------------------------------------
def test_cleanup_expired(tmp_path: Path) -> None:
    now = datetime(2025, 1, 10, tzinfo=UTC)
    old = Workspace.create(tmp_path, "a1", "old-1", {})
    old.mark_finished(now - timedelta(days=3))
    recent = Workspace.create(tmp_path, "a1", "recent-2", {})
    recent.mark_finished(now - timedelta(hours=1))
    running = Workspace.create(tmp_path, "a1", "running-3", {})
    broken = Workspace.create(tmp_path, "a1", "broken-4", {})
    broken.metadata_path.write_text("{not json")
    other_agent = Workspace.create(tmp_path, "a2", "old-5", {})
    other_agent.mark_finished(now - timedelta(days=3))

    removed = cleanup_expired(tmp_path, "a1", retention_seconds=86400, now=now)
    assert removed == [old.path]
    assert not old.path.exists()
    assert recent.path.exists() and running.path.exists() and broken.path.exists()
    assert other_agent.path.exists()
    assert cleanup_expired(tmp_path, "a1", 86400, now=now.timestamp()) == []
    assert cleanup_expired(tmp_path, "nobody", 0) == []
