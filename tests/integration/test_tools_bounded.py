"""No coder tool can freeze the agent (issue 11 §5): every call is bounded in time and
output, and the event loop (which also sends the heartbeats) keeps running meanwhile.

Real ripgrep, real processes, real files (FIFOs and symlink loops included); the ticker
is an asyncio task that measures the longest gap between its ticks during a call."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from infra.adapters.coders import ripgrep, tools
from infra.adapters.git.workspace import Workspace

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def _ripgrep_installed() -> None:
    # not a skip: a machine without rg must fail these tests loudly (the agent would refuse
    # every search there)
    assert shutil.which("rg"), ("ripgrep ('rg') is not installed: apt-get install ripgrep "
                                "(CI installs it through .ci/system-deps.sh)")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace.create(tmp_path / "ws", "agent-1", "acme-calc-1", {})
    (ws.repo_dir / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    return ws


async def call(ws: Workspace, name: str, args: dict[str, Any], *, max_output: int = 20_000,
               tool_timeout: float = tools.TOOL_TIMEOUT, command_timeout: float = 30.0) -> tools.ToolResult:
    return await tools.run_tool(ws, name, args, command_timeout=command_timeout, max_output=max_output,
                                log_name="t", tool_timeout=tool_timeout)


class Ticker:
    """Ticks every 10 ms on the event loop; ``max_gap`` is the longest wait between two."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now


async def while_ticking(work: Awaitable[Any]) -> tuple[Any, Ticker, float]:
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    try:
        result = await work
    finally:
        task.cancel()
    return result, ticker, time.monotonic() - started


# -- search: ripgrep, not Python re ---------------------------------------------------
async def test_a_catastrophic_regex_neither_hangs_nor_blocks_the_loop(ws: Workspace) -> None:
    # (a+)+$ over "aaa...!" backtracks exponentially in Python's re (2^n steps while holding
    # the GIL: 30 a's already take minutes); ripgrep's engine is linear
    for i in range(20):
        (ws.repo_dir / f"evil{i}.txt").write_text(("a" * 200_000 + "!\n") * 5)
    (ws.repo_dir / "hit.txt").write_text("aaaa\n")
    result, ticker, took = await while_ticking(
        call(ws, "search", {"pattern": "(a+)+$"}, tool_timeout=10.0))
    assert not result.is_error, result.content
    assert result.content == "hit.txt:1:aaaa"
    assert took < 10.0
    assert ticker.ticks > 0 and ticker.max_gap < 0.5, ticker.max_gap


async def test_search_is_killed_at_its_deadline_and_the_loop_keeps_running(ws: Workspace) -> None:
    # the kill path, deterministically: the bounded runner search uses, driving a command
    # that never ends by itself and forks a grandchild that must die with it (making rg
    # itself slow enough for a deadline would depend on the machine's speed)
    marker = ws.tmp_dir / "grandchild.pid"
    argv = ["/bin/sh", "-c", f"sleep 60 & echo $! > {marker}; echo started; sleep 60"]
    run, ticker, took = await while_ticking(ripgrep.run_bounded(
        argv, cwd=ws.repo_dir, env=ws.environment(), timeout=0.5, max_lines=10, max_bytes=1_000))
    assert run.timed_out and not run.complete and run.exit_code is None
    assert run.lines == ["started"]
    assert took < 3.0 and ticker.max_gap < 0.5
    grandchild = int(marker.read_text())
    await _gone(grandchild)


async def _gone(pid: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # a zombie still answers kill(0) until its parent (init, here) reaps it
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        except OSError:
            return
        await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"process {pid} outlived the bounded run")


async def test_endless_output_is_cut_at_the_byte_cap() -> None:
    run, ticker, took = await while_ticking(ripgrep.run_bounded(
        ["yes", "match"], cwd="/", env={"PATH": os.environ["PATH"]}, timeout=20, max_lines=5,
        max_bytes=200_000))
    assert run.lines == ["match"] * 5 and run.more_lines > 1_000
    assert not run.complete and not run.timed_out and took < 5 and ticker.max_gap < 0.5


async def test_many_matches_are_limited_and_long_output_clipped(ws: Workspace) -> None:
    (ws.repo_dir / "many.txt").write_text("".join(f"needle {i}\n" for i in range(5_000)))
    r = await call(ws, "search", {"pattern": "needle", "limit": 3})
    assert r.content.splitlines() == ["many.txt:1:needle 0", "many.txt:2:needle 1", "many.txt:3:needle 2",
                                      "[... at least 1 more matches; narrow the pattern, path or glob ...]"]
    r = await call(ws, "search", {"pattern": "needle", "limit": 10**9}, max_output=2_000)
    assert len(r.content) < 2_200 and "characters truncated" in r.content
    # the limit is capped, too
    assert f"many.txt:{tools.MAX_SEARCH_LIMIT}:needle {tools.MAX_SEARCH_LIMIT - 1}\n[... at least 1 more" in r.content
    (ws.repo_dir / "wide.txt").write_text("x" * 50_000 + "needle" + "y" * 50_000 + "\n")
    r = await call(ws, "search", {"pattern": "needle", "path": "wide.txt"})
    assert r.content.startswith("wide.txt:1:xxx") and "[... omitted end of long line]" in r.content
    assert len(r.content) < 500


async def test_search_keeps_the_tool_format_and_options(ws: Workspace) -> None:
    (ws.repo_dir / "src").mkdir()
    (ws.repo_dir / "src" / "app.ts").write_text("const Needle = 1;\n")
    (ws.repo_dir / ".github").mkdir()
    (ws.repo_dir / ".github" / "ci.yml").write_text("needle: ci\n")
    (ws.repo_dir / "node_modules").mkdir()
    (ws.repo_dir / "node_modules" / "dep.js").write_text("needle\n")
    (ws.repo_dir / "re.txt").write_text("a.b\naxb\n")
    r = await call(ws, "search", {"pattern": "needle", "ignore_case": True})
    assert r.content == ".github/ci.yml:1:needle: ci\nsrc/app.ts:1:const Needle = 1;"
    r = await call(ws, "search", {"pattern": "needle", "ignore_case": True, "glob": "src/**/*.ts"})
    assert r.content == "src/app.ts:1:const Needle = 1;"
    assert (await call(ws, "search", {"pattern": "needle", "path": "src"})).content == "(no matches)"
    assert (await call(ws, "search", {"pattern": "a.b"})).content == "re.txt:1:a.b\nre.txt:2:axb"
    assert (await call(ws, "search", {"pattern": "a.b", "literal": True})).content == "re.txt:1:a.b"


async def test_search_cannot_leave_the_repository_or_take_options(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("needle-secret\n")
    (ws.repo_dir / "linked").symlink_to(outside)  # a directory symlink out of the tree
    (ws.repo_dir / "secret-link.txt").symlink_to(outside / "secret.txt")
    (ws.repo_dir / ".git").mkdir()
    (ws.repo_dir / ".git" / "config").write_text("needle-git\n")
    for args in ({"pattern": "needle"}, {"pattern": "needle", "glob": "*"}):
        r = await call(ws, "search", args)
        assert r.content == "(no matches)", (args, r.content)
    r = await call(ws, "search", {"pattern": "needle", "glob": ".git/*"})  # the model's glob cannot undo it
    assert r.content == "(no matches: no file was searched; check the path and the glob)"
    r = await call(ws, "search", {"pattern": "needle", "path": "linked"})
    assert r.is_error and r.content.startswith("refused:")
    # an option-looking pattern is a pattern: nothing is listed, no preprocessor runs
    (ws.repo_dir / "opts.txt").write_text("use --files here\n")
    assert (await call(ws, "search", {"pattern": "--files"})).content == "opts.txt:1:use --files here"
    flag = tmp_path / "pre-ran"
    r = await call(ws, "search", {"pattern": f"--pre=touch {flag}"})
    assert r.content == "(no matches)" and not flag.exists()


async def test_bad_search_input_gets_a_clear_error(ws: Workspace) -> None:
    r = await call(ws, "search", {"pattern": "(?<=a)b"})
    assert r.is_error and "regex parse error" in r.content and "look-around" in r.content
    assert "literal=true" in r.content
    r = await call(ws, "search", {"pattern": "x", "path": "missing"})
    assert r.is_error and r.content == "missing: no such file or directory"
    for args, why in (({"pattern": ""}, "empty pattern"), ({"pattern": "a\nb"}, "one line"),
                      ({"pattern": "x" * 5_000}, "pattern too long"),
                      ({"pattern": "x", "glob": "*" * 5_000}, "glob too long"),
                      ({"pattern": "a{1000}{1000}"}, "size limit")):
        r = await call(ws, "search", args)
        assert r.is_error and why in r.content, (args, r.content)


async def test_search_without_ripgrep_fails_clearly(ws: Workspace, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # the agent's PATH without rg
    r = await call(ws, "search", {"pattern": "add"})
    assert r.is_error and "ripgrep ('rg')" in r.content and "install" in r.content


# -- the other tools -----------------------------------------------------------------
async def test_listing_a_huge_tree_is_bounded(ws: Workspace) -> None:
    for d in range(30):
        sub = ws.repo_dir / f"d{d:02}"
        sub.mkdir()
        for f in range(100):
            (sub / f"f{f:03}.txt").touch()
    text = tools.list_files(ws, tools.ListFiles(limit=10), 20_000, max_visits=1_000)
    lines = text.splitlines()
    assert lines[:2] == ["calc.py", "d00/f000.txt"] and len(lines) == 12
    assert "more files" in lines[10] and "[listing stopped after 1001 files" in lines[11]  # whole directories
    result, ticker, _ = await while_ticking(call(ws, "list_files", {"limit": 10**9}, max_output=5_000))
    assert not result.is_error and "characters truncated" in result.content and len(result.content) < 5_200
    assert ticker.max_gap < 0.5


async def test_reading_huge_files_is_bounded(ws: Workspace) -> None:
    (ws.repo_dir / "one-line.txt").write_text("z" * 4_000_000)
    r = await call(ws, "read_file", {"path": "one-line.txt"})
    assert r.content.startswith("1\tzzz") and "[... line truncated]" in r.content and len(r.content) < 2_100
    (ws.repo_dir / "lines.txt").write_text("w" * 1_999 + "\n" * 100_000)
    r = await call(ws, "read_file", {"path": "lines.txt"}, max_output=10_000)
    assert "characters truncated" in r.content and "[lines 1-2000 of 100000]" in r.content
    assert len(r.content) < 10_200
    with open(ws.repo_dir / "huge.bin", "wb") as f:
        f.truncate(tools.MAX_FILE_BYTES + 1)
    r = await call(ws, "read_file", {"path": "huge.bin"})
    assert r.is_error and "file too large" in r.content and "head/tail" in r.content


async def test_fifos_and_symlink_loops_do_not_hang_or_crash(ws: Workspace) -> None:
    os.mkfifo(ws.repo_dir / "pipe")  # what `mkfifo pipe` in a run_command leaves behind
    (ws.repo_dir / "loop-a").symlink_to("loop-b")
    (ws.repo_dir / "loop-b").symlink_to("loop-a")
    calls = [("read_file", {"path": "pipe"}), ("write_file", {"path": "pipe", "content": "x"}),
             ("edit_file", {"path": "pipe", "old_string": "a", "new_string": "b"}),
             ("search", {"pattern": "x", "path": "pipe"}), ("read_file", {"path": "loop-a"}),
             ("write_file", {"path": "loop-a", "content": "x"})]
    for name, args in calls:
        r, ticker, took = await while_ticking(call(ws, name, args, tool_timeout=5.0))
        assert r.is_error and took < 2.0 and ticker.max_gap < 0.5, (name, args, r.content)
        assert "not a regular file" in r.content or "failed" in r.content, (name, r.content)
    listing = (await call(ws, "list_files", {})).content  # the loop is skipped, the FIFO listed
    assert listing.splitlines() == ["calc.py", "pipe"]
    found = await call(ws, "search", {"pattern": "add"})  # ripgrep skips special files
    assert found.content == "calc.py:1:def add(a, b):"


async def test_write_and_edit_still_work(ws: Workspace) -> None:
    assert (await call(ws, "write_file", {"path": "pkg/new.py", "content": "x = 1\n"})).content == \
        "created pkg/new.py (6 bytes)"
    r = await call(ws, "edit_file", {"path": "calc.py", "old_string": "a - b", "new_string": "a + b"})
    assert not r.is_error and (ws.repo_dir / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"


async def test_run_command_passes_its_timeout_and_output_cap(ws: Workspace) -> None:
    r, ticker, took = await while_ticking(call(ws, "run_command", {"command": "sleep 30", "timeout": 1}))
    assert "timed out after 1s" in r.content and took < 10 and ticker.max_gap < 0.5
    r = await call(ws, "run_command", {"command": "yes output | head -n 200000"}, max_output=3_000)
    assert "exit code 0" in r.content and "truncated" in r.content and len(r.content) < 3_500

