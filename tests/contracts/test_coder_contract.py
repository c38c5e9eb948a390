"""The Coder contract: what the agent's pipeline may rely on from any coder backend
(the ``Coder`` port the actors declare in :mod:`actors.ports`).

One suite, run against every implementation (as eventsourcing runs one recorder suite
against every store). Each backend comes with a harness that knows how to make that
backend behave a certain way -- fix the issue, keep going forever, hang, overspend,
break, try to leave the workspace, print a secret -- through its real input channel:

- ``scripted``:    a recorded session (JSON) in a script directory;
- ``anthropic``:   the real ``anthropic`` client against ``tests/fakes/anthropic_api.py``,
                   scripted with Messages API responses (tool calls, usage);
- ``claude-code``: ``tests/fakes/claude_cli/claude`` on PATH, replaying a stream-json
                   scenario (edits, messages, exit code, sleep).

The suite then asserts the same things of all of them, on a real git clone:
a change and a complete outcome (status, summary, turns, usage, transcript); nothing
committed; every budget the backend can measure ends the session as
``budget_exhausted`` (work so far kept); a broken backend is a ``failed`` outcome, not
an exception; nothing lands outside the workspace, and commands run inside it with
the cluster's secrets scrubbed; secrets never reach the transcript, summary or reason.

Where a backend cannot honour a clause by design, its harness says so (``budgets``,
``own_file_tools``) and the test is skipped with the reason, rather than faked.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, get_args

import anthropic
import pytest

from actors.ports import Coder
from events.subjects import repo_token, task_id_for
from events.task import Usage
from events.work import Budget, CodeOutcome, CodeRequest, CodeStatus
from infra.adapters.coders.anthropic_coder import AnthropicCoder
from infra.adapters.coders.claude_cli import ClaudeCodeCoder
from infra.adapters.coders.scripted import ScriptedCoder
from infra.adapters.git import gitops
from infra.adapters.git.workspace import Workspace
from tests.fakes.anthropic_api import ApiError, FakeAnthropic, reply, tool_call, usage

pytestmark = pytest.mark.timeout(60)

REPO = "acme/calc"
NUMBER = 3
BUGGY = "def add(a, b):\n    return a - b\n"
FIXED = "def add(a, b):\n    return a + b\n"
SUMMARY = "add() now adds"
# a cluster secret in the agent's environment: commands must not see it, texts must mask it
PROBE_VAR = "CONTRACT_PROBE_TOKEN"
PROBE_SECRET = "probe-secret-value-0123456789"
# ("leaked", not "secret=": the masker rightly masks whatever follows "secret=")
PROBE_COMMAND = f"echo PROBE cwd=$(pwd) home=$HOME tmp=$TMPDIR leaked=${{{PROBE_VAR}:-unset}}"
_PROBE_LINE = re.compile(r'PROBE cwd=([^\s"]*) home=([^\s"]*) tmp=([^\s"]*) leaked=([^\s"]*)')


class Probe:
    def __init__(self, cwd: str, home: str, tmp: str, leaked: str) -> None:
        self.cwd, self.home, self.tmp = cwd, home, tmp
        self.leaked = leaked if leaked not in ("", "unset") else None


class CoderHarness(ABC):
    """One backend, and the means to make it behave. ``session_*`` set up what the
    next :meth:`Coder.implement` call will do."""

    name: str
    budgets: frozenset[str]  # which limits the backend enforces: turns, seconds, dollars, tokens
    own_file_tools: bool = True  # False: file access belongs to a tool the backend runs

    def __init__(self, ws: Workspace, tmp_path: Path) -> None:
        self.ws, self.tmp_path = ws, tmp_path

    @property
    @abstractmethod
    def coder(self) -> Coder: ...

    @abstractmethod
    def session_fixing(self, summary: str) -> None:
        """Replace ``a - b`` by ``a + b`` in calc.py, then finish with ``summary``."""

    @abstractmethod
    def session_without_end(self) -> None:
        """Keep working (reading, listing) turn after turn, never finishing."""

    @abstractmethod
    def session_fixing_then_hanging(self) -> None:
        """Fix calc.py, then get stuck in something slow (30 s)."""

    def session_overspending(self) -> None:
        """Spend well over three cents (about two a turn, or all of it at once)."""
        raise NotImplementedError

    def session_using_many_output_tokens(self) -> None:
        """Each turn writes ~7000 output tokens."""
        raise NotImplementedError

    @abstractmethod
    def session_breaking(self, detail: str) -> None:
        """The backend fails (an API error, a crash, a failing step), saying ``detail``."""

    def session_writing(self, path: str) -> None:
        """Try to write ``path`` (relative to the repository, or absolute)."""
        raise NotImplementedError

    @abstractmethod
    def session_probing(self) -> None:
        """Show where commands run and what they see (see :data:`PROBE_COMMAND`)."""

    def probe(self, outcome: CodeOutcome) -> Probe:
        found = _PROBE_LINE.findall(outcome.transcript)
        assert found, f"no probe output in the transcript:\n{outcome.transcript}"
        return Probe(*found[-1])

    @abstractmethod
    def session_revealing(self, secret: str) -> None:
        """Print ``secret`` in the session and end with a summary that contains it."""


# -- scripted ---------------------------------------------------------------------------
class ScriptedHarness(CoderHarness):
    name = "scripted"
    budgets = frozenset({"turns", "seconds"})  # a replay has no model: no tokens, no cost

    def __init__(self, ws: Workspace, tmp_path: Path) -> None:
        super().__init__(ws, tmp_path)
        self.script_dir = tmp_path / "scripts"
        self.script_dir.mkdir()
        self._coder = ScriptedCoder(self.script_dir)

    @property
    def coder(self) -> Coder:
        return self._coder

    def _record(self, steps: list[dict[str, Any]], summary: str = "") -> None:
        path = self.script_dir / f"{repo_token(REPO)}-{NUMBER}.json"
        path.write_text(json.dumps({"attempts": [{"steps": steps, "summary": summary}]}))

    _FIX = {"edit": {"path": "calc.py", "old": "a - b", "new": "a + b"}}

    def session_fixing(self, summary: str) -> None:
        self._record([self._FIX], summary)

    def session_without_end(self) -> None:
        self._record([{"run": {"command": "ls"}} for _ in range(20)])

    def session_fixing_then_hanging(self) -> None:
        self._record([self._FIX, {"run": {"command": "sleep 30"}}, {"run": {"command": "true"}}])

    def session_breaking(self, detail: str) -> None:
        self._record([{"run": {"command": f"echo {detail}; exit 3", "check": True}}])

    def session_writing(self, path: str) -> None:
        self._record([{"write": {"path": path, "content": "pwned"}}])

    def session_probing(self) -> None:
        self._record([{"run": {"command": PROBE_COMMAND}}])

    def session_revealing(self, secret: str) -> None:
        self._record([{"run": {"command": f"echo the secret is {secret}"}}], f"done; it was {secret}")


# -- the Anthropic Messages API tool loop ----------------------------------------------------
class AnthropicHarness(CoderHarness):
    name = "anthropic"
    budgets = frozenset({"turns", "seconds", "dollars", "tokens"})
    MODEL = "claude-sonnet-4-6"  # $3 in / $15 out per MTok

    def __init__(self, ws: Workspace, tmp_path: Path, fake: FakeAnthropic) -> None:
        super().__init__(ws, tmp_path)
        self.fake = fake
        client = anthropic.AsyncAnthropic(api_key="contract-api-key-0001", base_url=fake.base_url,
                                          max_retries=0)
        self._coder = AnthropicCoder(default_model=self.MODEL, client=client)

    @property
    def coder(self) -> Coder:
        return self._coder

    _FIX = tool_call("edit_file", {"path": "calc.py", "old_string": "a - b", "new_string": "a + b"})

    def session_fixing(self, summary: str) -> None:
        self.fake.add(tool_call("read_file", {"path": "calc.py"}), self._FIX,
                      tool_call("finish", {"summary": summary}))

    def session_without_end(self) -> None:
        self.fake.add(*[tool_call("list_files", {}) for _ in range(20)])

    def session_fixing_then_hanging(self) -> None:
        self.fake.add(self._FIX, tool_call("run_command", {"command": "sleep 30"}),
                      tool_call("finish", {"summary": "never reached"}))

    def session_overspending(self) -> None:
        # 4000 in, 500 out: $0.0195 a turn
        self.fake.add(*[tool_call("list_files", {}, use=usage(4000, 500)) for _ in range(10)])

    def session_using_many_output_tokens(self) -> None:
        def turn(body: dict[str, Any]) -> dict[str, Any]:  # as the API does: never above max_tokens
            return tool_call("list_files", {}, use=usage(100, min(7000, body["max_tokens"])))

        self.fake.add(*[turn for _ in range(10)])

    def session_breaking(self, detail: str) -> None:
        self.fake.add(ApiError(400, "invalid_request_error", f"messages: {detail}"))

    def session_writing(self, path: str) -> None:
        self.fake.add(tool_call("write_file", {"path": path, "content": "pwned"}), reply("could not write"))

    def session_probing(self) -> None:
        self.fake.add(tool_call("run_command", {"command": PROBE_COMMAND}), reply("probed"))

    def session_revealing(self, secret: str) -> None:
        self.fake.add(tool_call("run_command", {"command": f"echo the secret is {secret}"},
                                text=f"printing {secret}"),
                      reply(f"done; it was {secret}"))


# -- the Claude Code CLI ---------------------------------------------------------------------
FAKE_CLAUDE_DIR = Path(__file__).resolve().parents[1] / "fakes" / "claude_cli"


class ClaudeCodeHarness(CoderHarness):
    name = "claude-code"
    # --max-turns goes to the CLI; wall time is ours; the cost is checked on the result
    # (the CLI reports it at the end); tokens cannot be limited through the CLI
    budgets = frozenset({"turns", "seconds", "dollars"})
    # reading and writing files is the CLI's own business (cwd = the repository,
    # --permission-mode); what this backend controls is where and with what the CLI
    # runs, which the probe checks
    own_file_tools = False
    MODEL = "claude-sonnet-test"
    API_KEY = "sk-" "ant-contract-key-abcdefgh"

    def __init__(self, ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(ws, tmp_path)
        bin_dir = tmp_path / "bin"  # `python3` for the fake's shebang, whatever PATH holds
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(sys.executable)
        monkeypatch.setenv("PATH", os.pathsep.join([str(FAKE_CLAUDE_DIR), str(bin_dir),
                                                    os.environ.get("PATH", "")]))
        monkeypatch.setenv("ANTHROPIC_API_KEY", self.API_KEY)
        # in the workspace's home: the CLI runs in the workspace's sandbox, which shows
        # nothing of tmp_path but the workspace's own repo, home and tmp
        self.scenario = ws.home_dir / "scenario.json"
        self.argv = ws.home_dir / "argv.json"
        monkeypatch.setenv("FAKE_CLAUDE_SCENARIO", str(self.scenario))
        monkeypatch.setenv("FAKE_CLAUDE_ARGV", str(self.argv))
        self._coder = ClaudeCodeCoder(env_allow=("FAKE_CLAUDE_SCENARIO", "FAKE_CLAUDE_ARGV"))

    @property
    def coder(self) -> Coder:
        return self._coder

    def _play(self, *messages: Any, **scenario: Any) -> None:
        self.scenario.write_text(json.dumps({"messages": list(messages), **scenario}))

    def _init(self) -> dict[str, Any]:
        return {"type": "system", "subtype": "init", "session_id": "s-1", "model": self.MODEL,
                "tools": ["Read", "Edit", "Bash"], "permissionMode": "acceptEdits"}

    def _say(self, mid: str, text: str) -> dict[str, Any]:
        return {"type": "assistant", "message": {"id": mid, "role": "assistant", "model": self.MODEL,
                                                 "content": [{"type": "text", "text": text}]}}

    def _result(self, subtype: str = "success", *, text: str | None = None, turns: int = 2,
                cost: float = 0.01) -> dict[str, Any]:
        msg = {"type": "result", "subtype": subtype, "is_error": subtype != "success", "num_turns": turns,
               "total_cost_usd": cost, "usage": {"input_tokens": 900, "output_tokens": 120}}
        if text is not None:
            msg["result"] = text
        return msg

    _FIX_EDIT = {"path": "calc.py", "content": FIXED}

    def session_fixing(self, summary: str) -> None:
        self._play(self._init(), self._say("m1", "Fixing calc.py"), self._result(text=summary),
                   edits=[self._FIX_EDIT])

    def session_without_end(self) -> None:
        # what the CLI prints when --max-turns stops it
        self._play(self._init(), self._say("m1", "Looking around"), self._result("error_max_turns", turns=21))

    def session_fixing_then_hanging(self) -> None:
        self._play(self._init(), self._say("m1", "Fixed; now running everything"), edits=[self._FIX_EDIT],
                   sleep=30)

    def session_overspending(self) -> None:
        self._play(self._init(), self._result(text="done, expensively", cost=0.75))

    def session_breaking(self, detail: str) -> None:
        self._play(self._init(), stderr=f"Error: {detail}\n", exit_code=1)

    def session_probing(self) -> None:
        # the CLI runs the commands; the fake shows the environment it was started with
        self._play(self._init(), self._say("m1", f"PROBE cwd=- home=${{HOME}} tmp=${{TMPDIR}} "
                                                 f"leaked=${{{PROBE_VAR}}}"), self._result(text="probed"))

    def probe(self, outcome: CodeOutcome) -> Probe:
        found = super().probe(outcome)
        found.cwd = json.loads(self.argv.read_text())["cwd"]  # where the CLI process started
        return found

    def session_revealing(self, secret: str) -> None:
        self._play(self._init(), self._say("m1", f"the secret is {secret}"),
                   self._result(text=f"done; it was {secret}"), stderr=f"debug: {secret}\n")


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A fresh workspace holding a real clone of a small repository with a bug."""
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "calc.py").write_text(BUGGY)
    (origin / "README.md").write_text("# calc\n")
    gitops.run_git(origin, "init", "-q", "-b", "main")
    gitops.commit_all(origin, "initial", "t", "t@example.com")
    ws = Workspace.create(tmp_path / "ws", "agent-1", task_id_for(REPO, NUMBER), {})
    gitops.clone(str(origin), ws.repo_dir)
    return ws


@pytest.fixture
def fake_api() -> FakeAnthropic:
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture(params=["scripted", "anthropic", "claude-code"])
def backend(request: pytest.FixtureRequest, ws: Workspace, tmp_path: Path) -> CoderHarness:
    if request.param == "scripted":
        return ScriptedHarness(ws, tmp_path)
    if request.param == "anthropic":
        return AnthropicHarness(ws, tmp_path, request.getfixturevalue("fake_api"))
    return ClaudeCodeHarness(ws, tmp_path, request.getfixturevalue("monkeypatch"))


def code_request(ws: Workspace, budget: Budget | None = None) -> CodeRequest:
    return CodeRequest(task_id=ws.task_id, attempt=1, title="add() subtracts", body="add(2, 3) returns -1",
                       specialty="backend", labels=("bug",), repo=REPO, repo_dir=str(ws.repo_dir),
                       issue_number=NUMBER, budget=budget or Budget(max_seconds=30))


async def implement(backend: CoderHarness, ws: Workspace, budget: Budget | None = None) -> CodeOutcome:
    outcome = await backend.coder.implement(code_request(ws, budget), ws)
    assert_well_formed(outcome)
    return outcome


def assert_well_formed(out: CodeOutcome) -> None:
    assert isinstance(out, CodeOutcome)
    assert out.status in get_args(CodeStatus)
    assert isinstance(out.summary, str) and isinstance(out.reason, str) and isinstance(out.transcript, str)
    assert isinstance(out.turns, int) and out.turns >= 0
    assert isinstance(out.usage, Usage) and out.usage.dollars >= 0
    if out.status != "done":
        assert out.reason, "a session that did not finish says why"


SECRET = "contract-deploy-secret-42"

def requires_budget(backend: CoderHarness, kind: str) -> None:
    if kind not in backend.budgets:
        pytest.skip(f"{backend.name} cannot measure a {kind} budget")


# -- the contract ----------------------------------------------------------------------------------
def test_is_a_coder(backend: CoderHarness) -> None:
    assert isinstance(backend.coder, Coder) and backend.coder.name == backend.name


async def test_a_finished_session_leaves_the_change_uncommitted_with_a_full_outcome(
    backend: CoderHarness, ws: Workspace
) -> None:
    base = gitops.head_sha(ws.repo_dir)
    backend.session_fixing(SUMMARY)
    out = await implement(backend, ws)
    assert out.status == "done", out.reason
    assert out.summary == SUMMARY and out.reason == ""
    assert out.turns >= 1 and out.usage.model and out.transcript.strip()
    assert (ws.repo_dir / "calc.py").read_text() == FIXED
    assert gitops.changed_files(ws.repo_dir) == ["calc.py"]
    assert gitops.head_sha(ws.repo_dir) == base  # committing is the pipeline's phase, not the coder's


async def test_the_turn_budget_ends_the_session(backend: CoderHarness, ws: Workspace) -> None:
    requires_budget(backend, "turns")
    backend.session_without_end()
    out = await implement(backend, ws, Budget(max_turns=2, max_seconds=30))
    assert out.status == "budget_exhausted" and "turn" in out.reason
    assert out.turns >= 2


async def test_the_wall_time_budget_ends_the_session_and_keeps_the_work(
    backend: CoderHarness, ws: Workspace
) -> None:
    requires_budget(backend, "seconds")
    backend.session_fixing_then_hanging()
    started = time.monotonic()
    out = await implement(backend, ws, Budget(max_seconds=1))
    assert time.monotonic() - started < 10, "the hung step was not cut off"
    assert out.status == "budget_exhausted" and "time" in out.reason
    # the pipeline opens a draft pull request with what was done so far
    assert (ws.repo_dir / "calc.py").read_text() == FIXED


async def test_the_dollar_budget_ends_the_session(backend: CoderHarness, ws: Workspace) -> None:
    requires_budget(backend, "dollars")
    backend.session_overspending()
    out = await implement(backend, ws, Budget(max_dollars=0.03, max_seconds=30))
    assert out.status == "budget_exhausted" and "$" in out.reason
    assert out.usage.dollars > 0  # what was spent is reported, to ride on the event


async def test_the_output_token_budget_ends_the_session(backend: CoderHarness, ws: Workspace) -> None:
    requires_budget(backend, "tokens")
    backend.session_using_many_output_tokens()
    out = await implement(backend, ws, Budget(max_output_tokens=9000, max_seconds=30))
    assert out.status == "budget_exhausted" and "token" in out.reason
    assert out.usage.output_tokens <= 9000


async def test_a_broken_backend_is_a_failed_outcome_not_an_exception(
    backend: CoderHarness, ws: Workspace
) -> None:
    backend.session_breaking("the backend broke down")
    out = await implement(backend, ws)
    assert out.status == "failed" and "the backend broke down" in out.reason  # the reason says why
    assert gitops.changed_files(ws.repo_dir) == []


@pytest.mark.parametrize("target", [
    "../outside.txt", "ABSOLUTE", "link/outside.txt", ".git/hooks/pre-commit"])
async def test_nothing_is_written_outside_the_repository(
    backend: CoderHarness, ws: Workspace, tmp_path: Path, target: str
) -> None:
    if not backend.own_file_tools:
        pytest.skip(f"{backend.name}: file access is the CLI's (its cwd and home are checked by the probe)")
    outside = tmp_path / "outside"
    outside.mkdir()
    (ws.repo_dir / "link").symlink_to(outside)  # a symlink in the clone pointing out of it
    path = str(outside / "absolute.txt") if target == "ABSOLUTE" else target
    backend.session_writing(path)
    out = await implement(backend, ws)
    assert out.status in ("done", "failed")
    assert not (ws.path / "outside.txt").exists()
    assert list(outside.iterdir()) == []
    assert not (ws.repo_dir / ".git" / "hooks" / "pre-commit").exists()


async def test_commands_run_in_the_workspace_without_the_clusters_secrets(
    backend: CoderHarness, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROBE_VAR, PROBE_SECRET)
    backend.session_probing()
    out = await implement(backend, ws)
    assert out.status == "done", out.reason
    probe = backend.probe(out)
    assert Path(probe.cwd).resolve() == ws.repo_dir.resolve()
    assert Path(probe.home).resolve().is_relative_to(ws.path.resolve())
    assert Path(probe.tmp).resolve().is_relative_to(ws.path.resolve())
    assert probe.leaked is None, "a cluster secret reached the session's commands"


async def test_secrets_are_masked_in_transcript_and_summary(
    backend: CoderHarness, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTRACT_DEPLOY_TOKEN", SECRET)  # the agent's environment holds it
    backend.session_revealing(SECRET)
    out = await implement(backend, ws)
    assert out.status == "done", out.reason
    assert SECRET not in out.transcript and "***" in out.transcript
    assert SECRET not in out.summary and "***" in out.summary  # it becomes the PR text and an event


async def test_secrets_are_masked_in_a_failures_reason(
    backend: CoderHarness, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTRACT_DEPLOY_TOKEN", SECRET)
    backend.session_breaking(f"could not use {SECRET}")
    out = await implement(backend, ws)
    assert out.status == "failed"
    assert SECRET not in out.reason and "could not use ***" in out.reason  # the reason goes into an event
    assert SECRET not in out.transcript and SECRET not in out.summary
