"""The Claude Code CLI coder, driven against a stand-in executable (tests/fake_claude/claude)
that replays a recorded stream-json session, edits the workspace and records its argv."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from events.subjects import task_id_for
from events.task import Usage
from actors.ports import Coder
from events.work import Budget, CodeRequest
from infra.adapters.coders.claude_cli import ClaudeCodeCoder
from infra.adapters.git.sandbox import NoSandbox
from infra.adapters.git.workspace import Workspace

pytestmark = pytest.mark.timeout(60)

REPO = "acme/app"
KEY = "sk-" "ant-test-abcdefghijkl"
FAKE_DIR = Path(__file__).resolve().parents[1] / "fakes" / "claude_cli"
MODEL = "claude-sonnet-test"

INIT = {"type": "system", "subtype": "init", "cwd": "/repo", "session_id": "s-1", "model": MODEL,
        "tools": ["Read", "Edit", "Bash"], "permissionMode": "acceptEdits", "apiKeySource": "ANTHROPIC_API_KEY"}
EDIT = {"type": "tool_use", "id": "tu-1", "name": "Edit",
        "input": {"file_path": "app.py", "old_string": "return a - b", "new_string": "return a + b"}}
TOOL_RESULT = {"type": "user", "session_id": "s-1", "message": {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "tu-1", "content": "The file app.py has been updated."}]}}
FIXED = "def add(a, b):\n    return a + b\n"


def assistant(mid: str, *blocks: dict[str, Any]) -> dict[str, Any]:
    return {"type": "assistant", "session_id": "s-1", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": MODEL, "content": list(blocks),
        "usage": {"input_tokens": 10, "output_tokens": 5}}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def result(subtype: str = "success", *, is_error: bool = False, res: str | None = "Fixed add.",
           turns: int = 3, cost: float = 0.0123, **extra: Any) -> dict[str, Any]:
    msg = {"type": "result", "subtype": subtype, "is_error": is_error, "duration_ms": 1200,
           "duration_api_ms": 900, "num_turns": turns, "session_id": "s-1", "total_cost_usd": cost,
           "usage": {"input_tokens": 1200, "output_tokens": 340, "cache_creation_input_tokens": 500,
                     "cache_read_input_tokens": 7000},
           "modelUsage": {MODEL: {"costUSD": cost}}, **extra}
    if res is not None:
        msg["result"] = res
    return msg


SESSION = [INIT, assistant("m1", text("Looking at app.py")), assistant("m1", EDIT), TOOL_RESULT,
           assistant("m2", text("Done: add now adds.")), result()]


class Fake:
    def __init__(self, scenario: Path, argv: Path) -> None:
        self.scenario, self.argv_file = scenario, argv

    def write(self, **scenario: Any) -> None:
        self.scenario.write_text(json.dumps(scenario))

    def info(self) -> dict[str, Any]:
        return json.loads(self.argv_file.read_text())


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    bin_dir = tmp_path / "bin"  # `python3` for the fake's shebang, whatever PATH holds
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", os.pathsep.join([str(FAKE_DIR), str(bin_dir), os.environ.get("PATH", "")]))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    f = Fake(tmp_path / "scenario.json", tmp_path / "argv.json")
    monkeypatch.setenv("FAKE_CLAUDE_SCENARIO", str(f.scenario))
    monkeypatch.setenv("FAKE_CLAUDE_ARGV", str(f.argv_file))
    f.write(messages=SESSION)
    return f


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    # the CLI's launch, stream and process group, seen from outside (pids, files in
    # tmp_path): no sandbox here. The CLI in its sandbox: tests/integration/test_sandbox.py
    ws = Workspace.create(tmp_path / "ws", "agent-1", task_id_for(REPO, 7), {}, sandbox=NoSandbox())
    (ws.repo_dir / "app.py").write_text("def add(a, b):\n    return a - b\n")
    return ws


def make_coder(events: list[dict[str, Any]] | None = None, **kw: Any) -> ClaudeCodeCoder:
    kw.setdefault("model_by_specialty", {"python": MODEL})
    kw.setdefault("default_model", "claude-haiku-test")
    return ClaudeCodeCoder(env_allow=("FAKE_CLAUDE_SCENARIO", "FAKE_CLAUDE_ARGV"),
                           on_progress=events.append if events is not None else None, **kw)


def request(ws: Workspace, specialty: str = "python", **budget: Any) -> CodeRequest:
    return CodeRequest(task_id=ws.task_id, attempt=1, title="Fix add", body="add() subtracts instead of adding",
                       specialty=specialty, labels=("bug",), repo=REPO, repo_dir=str(ws.repo_dir),
                       instructions="Run `pytest -q` before finishing.",
                       budget=Budget(**{"max_turns": 12, "max_seconds": 30, **budget}))


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped


async def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


async def test_success_edits_parses_usage_and_passes_flags(fake: Fake, ws: Workspace) -> None:
    fake.write(edits=[{"path": "app.py", "content": FIXED}], messages=SESSION)
    events: list[dict[str, Any]] = []
    coder = make_coder(events)
    assert isinstance(coder, Coder) and coder.name == "claude-code" and coder.available()
    out = await coder.implement(request(ws), ws)
    assert out.status == "done", out.reason
    assert out.summary == "Fixed add." and out.turns == 3 and out.reason == ""
    assert out.usage == Usage(model=MODEL, input_tokens=1200, output_tokens=340, cache_read_tokens=7000,
                              cache_write_tokens=500, dollars=0.0123)
    assert (ws.repo_dir / "app.py").read_text() == FIXED
    info = fake.info()
    argv = info["argv"]
    assert Path(info["cwd"]).resolve() == ws.repo_dir.resolve()
    assert argv[0] == "-p" and "Fix add" in argv[1] and "add() subtracts" in argv[1] and "#7" in argv[1]
    assert flag(argv, "--output-format") == "stream-json" and "--verbose" in argv
    assert flag(argv, "--max-turns") == "12" and flag(argv, "--model") == MODEL
    assert flag(argv, "--allowedTools") == "Read,Edit,Write,Glob,Grep,Bash"
    assert flag(argv, "--permission-mode") == "acceptEdits"
    assert flag(argv, "--max-budget-usd") == "5"  # the CLI enforces the dollar budget during the run
    system = flag(argv, "--append-system-prompt")
    assert "Run `pytest -q` before finishing." in system and "python" in system and "Do not commit" in system
    assert [e["kind"] for e in events] == ["init", "text", "tool_use", "text"]
    assert events[0]["model"] == MODEL and events[0]["session_id"] == "s-1"
    assert events[2]["tool"] == "Edit" and "return a + b" in events[2]["input"] and events[2]["turn"] == 1
    assert events[3]["turn"] == 2
    assert '"subtype": "success"' in out.transcript
    assert (ws.logs_dir / "coder-attempt1-claude.jsonl").read_text().count("\n") >= len(SESSION)


async def test_models_async_progress_and_failing_callback(fake: Fake, ws: Workspace) -> None:
    seen: list[str] = []

    async def progress(event: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(event["kind"])
        if event["kind"] == "text":
            raise RuntimeError("a broken progress sink does not stop the session")

    coder = ClaudeCodeCoder(model_by_specialty={"python": MODEL}, default_model="claude-haiku-test",
                            env_allow=("FAKE_CLAUDE_SCENARIO", "FAKE_CLAUDE_ARGV"), on_progress=progress,
                            allowed_tools=("Read",), extra_args=("--no-session-persistence",))
    out = await coder.implement(request(ws, specialty="go"), ws)
    assert out.status == "done" and seen == ["init", "text", "tool_use", "text"]
    argv = fake.info()["argv"]
    assert flag(argv, "--model") == "claude-haiku-test" and flag(argv, "--allowedTools") == "Read"
    assert argv[-1] == "--no-session-persistence"
    await ClaudeCodeCoder(env_allow=("FAKE_CLAUDE_SCENARIO", "FAKE_CLAUDE_ARGV")).implement(request(ws), ws)
    assert "--model" not in fake.info()["argv"]  # no model configured: the CLI's default


async def test_max_turns_is_budget_exhausted(fake: Fake, ws: Workspace) -> None:
    fake.write(messages=[INIT, assistant("m1", EDIT), result("error_max_turns", is_error=True, res=None, turns=13)])
    out = await make_coder().implement(request(ws), ws)
    assert out.status == "budget_exhausted" and out.reason == "turn limit: 12" and out.turns == 13
    assert out.usage.dollars == 0.0123 and out.usage.model == MODEL


@pytest.mark.parametrize("res", [
    result(is_error=True, res="Invalid API key · Please run /login", turns=1),
    result("error_during_execution", res=None, errors=["Invalid API key"], turns=1),
])
async def test_error_result_is_failed(fake: Fake, ws: Workspace, res: dict[str, Any]) -> None:
    fake.write(messages=[INIT, res], exit_code=1)
    out = await make_coder().implement(request(ws), ws)
    assert out.status == "failed" and "Invalid API key" in out.reason and out.turns == 1


async def test_cost_over_budget_is_budget_exhausted(fake: Fake, ws: Workspace) -> None:
    fake.write(messages=[INIT, result(cost=0.75)])
    out = await make_coder().implement(request(ws, max_dollars=0.5), ws)
    assert out.status == "budget_exhausted" and "$0.75" in out.reason and "$0.50" in out.reason
    assert out.summary == "Fixed add." and out.usage.dollars == 0.75


async def test_garbage_lines_are_tolerated(fake: Fake, ws: Workspace) -> None:
    events: list[dict[str, Any]] = []
    fake.write(messages=["warning: not json at all", INIT, "[1, 2]", "{broken", '"a string"', "",
                         {"type": "assistant", "message": "odd"}, {"type": "stream_event", "x": 1},
                         assistant("m1", "not a block", text("hi")), result()])
    out = await make_coder(events).implement(request(ws), ws)
    assert out.status == "done" and out.summary == "Fixed add."
    assert "warning: not json at all" in out.transcript and "{broken" in out.transcript
    assert [e["kind"] for e in events] == ["init", "text"]
    # odd shapes in the result: no init (model from modelUsage), usage not an object
    fake.write(messages=[result(usage="n/a", num_turns="x", errors="x",
                                modelUsage={"weird": 3, "claude-opus-test": {"costUSD": 0.01}})])
    out = await make_coder().implement(request(ws), ws)
    assert out.status == "done" and out.turns == 0
    assert out.usage == Usage(model="claude-opus-test", dollars=0.0123)


async def test_no_result_and_nonzero_exit_is_failed_with_stderr(fake: Fake, ws: Workspace) -> None:
    fake.write(messages=[INIT, assistant("m1", text("working"))], stderr="Error: something broke\n", exit_code=1)
    out = await make_coder().implement(request(ws), ws)
    assert out.status == "failed" and "code 1" in out.reason and "something broke" in out.reason
    assert out.turns == 1 and out.usage.model == MODEL and "something broke" in out.transcript
    fake.write(messages=[INIT])  # exit 0 but no result: still not a success
    out = await make_coder().implement(request(ws), ws)
    assert out.status == "failed" and "without a result" in out.reason


async def test_wall_time_kills_the_process_group(fake: Fake, ws: Workspace) -> None:
    events: list[dict[str, Any]] = []
    fake.write(messages=[INIT], sleep=30, spawn_child=True)
    started = time.monotonic()
    out = await make_coder(events).implement(request(ws, max_seconds=1), ws)
    assert time.monotonic() - started < 10
    assert out.status == "budget_exhausted" and out.reason.startswith("wall time: 1s")
    assert [e["kind"] for e in events] == ["init"]  # what came before the timeout was processed
    info = fake.info()
    assert await gone(info["pid"]) and await gone(info["child_pid"])


async def test_cancellation_kills_the_process_group(fake: Fake, ws: Workspace) -> None:
    fake.write(messages=[INIT], sleep=30, spawn_child=True)
    task = asyncio.create_task(make_coder().implement(request(ws), ws))
    deadline = time.monotonic() + 20
    while not fake.argv_file.exists():
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    info = fake.info()
    assert await gone(info["pid"]) and await gone(info["child_pid"])


async def test_secrets_in_the_stream_are_masked(fake: Fake, ws: Workspace) -> None:
    events: list[dict[str, Any]] = []
    fake.write(messages=[INIT, assistant("m1", text("my key is ${ANTHROPIC_API_KEY}")),
                         assistant("m2", {"type": "tool_use", "id": "t", "name": "Bash",
                                          "input": {"command": "echo ${ANTHROPIC_API_KEY}"}}),
                         result(res="done; key ${ANTHROPIC_API_KEY}")],
               stderr="debug: key=${ANTHROPIC_API_KEY}\n")
    out = await make_coder(events).implement(request(ws), ws)
    assert out.status == "done"
    dumped = json.dumps(events) + out.summary + out.reason + out.transcript
    assert KEY not in dumped and "***" in out.transcript and "***" in out.summary
    assert "my key is ***" in events[1]["text"] and "***" in events[2]["input"]
    assert "debug: key=***" in out.transcript  # stderr too, so the key did reach the CLI
    assert KEY not in (ws.logs_dir / "coder-attempt1-claude.jsonl").read_text()


async def test_not_available_when_not_on_path(fake: Fake, ws: Workspace, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert not ClaudeCodeCoder(executable="claude-not-installed-anywhere").available()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    coder = ClaudeCodeCoder()
    assert not coder.available()
    out = await coder.implement(request(ws), ws)
    assert out.status == "failed" and "not found" in out.reason


# -- the cluster's spend ledger: the session's maximum reserved, the reported cost settled ----------
async def test_the_session_reserves_its_budget_and_settles_what_the_cli_reports(fake, ws, nc) -> None:
    from events.spend import Caps, Entry, Scope, period_of
    from events.subjects import Namespace
    from infra.adapters.nats.cluster_config import BUDGET, write_setting
    from infra.adapters.nats.provisioning import provision, spend_bucket
    from infra.adapters.nats.spend_ledger import KVSpendLedger

    ns = Namespace("tcli" + os.urandom(4).hex())
    await provision(nc, ns)
    await write_setting(nc, ns, BUDGET, Caps(repo=1.0))
    ledger = KVSpendLedger(nc, ns, name="agent-1")
    coder = make_coder(ledger=ledger)
    try:
        out = await coder.implement(request(ws, max_dollars=0.5), ws)  # fits in the $1 repository cap
        assert out.status == "done" and out.usage.dollars == pytest.approx(0.0123)
        kv = await nc.jetstream().key_value(spend_bucket(ns))
        entry = msgspec.json.decode((await kv.get(Scope("repo", REPO).key(period_of(time.time())))).value,
                                    type=Entry)
        assert entry.spent == 12_300 and entry.holds == {}  # the reported cost, the hold gone
        # a session whose budget does not fit what is left: refused, the CLI never started
        fake.argv_file.unlink()
        out = await coder.implement(request(ws, max_dollars=2.0), ws)
        assert out.status == "budget_exhausted" and out.budget_scope == f"repo:{REPO}"
        assert out.reason.startswith(f"budget:repo:{REPO} exhausted") and not fake.argv_file.exists()
    finally:
        await coder.close()
