"""The Anthropic coder against a local server speaking the Messages API, through the
real ``anthropic`` client: tool loop, confinement, budgets, retries, errors, masking."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import pytest
from tests.fakes.anthropic_api import ApiError, FakeAnthropic, fake_anthropic, reply, tool_call, tool_calls, usage  # noqa: F401

from events.subjects import task_id_for
from infra.adapters.git import gitops
from actors.ports import Coder
from events.work import Budget, CodeRequest
from infra.adapters.coders import prices
from infra.adapters.coders.anthropic_coder import AnthropicCoder
from infra.adapters.git.workspace import Workspace

pytestmark = pytest.mark.timeout(60)

REPO = "acme/calc"
MODEL = "claude-sonnet-4-6"
BUGGY = "def add(a, b):\n    return a - b\n\n\ndef double(x):\n    return x + x\n"
TESTS = ("import unittest\n\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n"
         "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n\n"
         "if __name__ == '__main__':\n    unittest.main()\n")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A real clone of a small repository with a bug, in a fresh workspace."""
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "calc.py").write_text(BUGGY)
    (origin / "test_calc.py").write_text(TESTS)
    (origin / "README.md").write_text("# calc\n")
    gitops.run_git(origin, "init", "-q")
    gitops.commit_all(origin, "initial", "t", "t@example.com")
    ws = Workspace.create(tmp_path / "ws", "agent-1", task_id_for(REPO, 3), {})
    gitops.clone(str(origin), ws.repo_dir)
    return ws


@pytest.fixture
def fake(fake_anthropic: tuple[FakeAnthropic, str]) -> FakeAnthropic:  # noqa: F811
    return fake_anthropic[0]


def coder_for(fake: FakeAnthropic, *, max_retries: int = 4, **kw) -> AnthropicCoder:
    client = anthropic.AsyncAnthropic(api_key="test-key", base_url=fake.base_url, max_retries=max_retries)
    return AnthropicCoder(default_model=MODEL, client=client, **kw)


def request(ws: Workspace, budget: Budget | None = None, **kw) -> CodeRequest:
    return CodeRequest(task_id=ws.task_id, attempt=1, title="add() subtracts", body="add(2, 3) returns -1",
                       specialty=kw.pop("specialty", "backend"), labels=("bug",), repo=REPO,
                       repo_dir=str(ws.repo_dir), issue_number=3, budget=budget or Budget(), **kw)


async def test_full_fix_of_a_small_repo(ws: Workspace, fake: FakeAnthropic) -> None:
    turn_usage = [usage(1200, 80, cache_write=900), usage(300, 60, cache_read=2100),
                  usage(200, 70, cache_read=2400), usage(250, 40, cache_read=2600), usage(100, 50, cache_read=2900)]
    fake.add(
        tool_call("list_files", {}, text="Let me look around.", use=turn_usage[0]),
        tool_call("read_file", {"path": "calc.py"}, use=turn_usage[1]),
        tool_call("edit_file", {"path": "calc.py", "old_string": "return a - b", "new_string": "return a + b"},
                  use=turn_usage[2]),
        # python3: the system's, the one a sandboxed command sees (not the agent's virtualenv)
        tool_call("run_command", {"command": "python3 -m unittest -v"}, use=turn_usage[3]),
        tool_call("finish", {"summary": "add() now adds; the unittest suite passes."}, use=turn_usage[4]),
    )
    coder = coder_for(fake)
    assert isinstance(coder, Coder) and coder.name == "anthropic"
    out = await coder.implement(request(ws, instructions="# CLAUDE.md\nUse four spaces."), ws)

    assert out.status == "done", out.reason
    assert out.summary == "add() now adds; the unittest suite passes."
    assert out.turns == 5 and len(fake.requests) == 5
    assert (ws.repo_dir / "calc.py").read_text() == BUGGY.replace("a - b", "a + b")
    assert gitops.changed_files(ws.repo_dir) == ["calc.py"]

    # usage summed over the turns, priced from the table
    u = out.usage
    assert u.model == MODEL
    assert u.input_tokens == sum(t["input_tokens"] for t in turn_usage)
    assert u.output_tokens == sum(t["output_tokens"] for t in turn_usage)
    assert u.cache_write_tokens == 900 and u.cache_read_tokens == 2100 + 2400 + 2600 + 2900
    expected = sum(prices.cost(MODEL, input_tokens=t["input_tokens"], output_tokens=t["output_tokens"],
                               cache_write_tokens=t["cache_creation_input_tokens"],
                               cache_read_tokens=t["cache_read_input_tokens"]) for t in turn_usage)
    assert u.dollars == pytest.approx(expected) and u.dollars > 0

    # what the model was sent
    first = fake.requests[0]
    assert first.api_key == "test-key"
    assert first.body["model"] == MODEL and first.body["max_tokens"] == 8192
    system = first.body["system"]
    assert system[-1]["cache_control"] == {"type": "ephemeral"}
    assert "backend" in system[0]["text"] and "Use four spaces." in system[-1]["text"]
    assert first.body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert {t["name"] for t in first.body["tools"]} == {
        "list_files", "read_file", "search", "edit_file", "write_file", "run_command", "finish"}
    assert "add(2, 3) returns -1" in first.messages[0]["content"][0]["text"]
    listing = fake.requests[1].tool_results()[0]
    assert "calc.py" in listing["content"] and "test_calc.py" in listing["content"]
    assert not listing.get("is_error")
    assert fake.requests[1].messages[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "1\tdef add(a, b):" in fake.requests[2].tool_results()[0]["content"]
    ran = fake.requests[4].tool_results()[0]["content"]
    assert "exit code 0" in ran and "OK" in ran
    # the assistant turns went back verbatim (text + tool_use), with matching tool_use ids
    assistant = fake.requests[1].messages[1]
    assert assistant["role"] == "assistant" and assistant["content"][0]["text"] == "Let me look around."
    assert listing["tool_use_id"] == assistant["content"][1]["id"]
    assert "edit_file" in out.transcript and "exit code 0" in out.transcript


async def test_turn_budget_exhausted(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(*[tool_call("read_file", {"path": "calc.py"}) for _ in range(5)])
    out = await coder_for(fake).implement(request(ws, Budget(max_turns=2)), ws)
    assert out.status == "budget_exhausted"
    assert out.reason == "turn budget exhausted: 2/2 turns"
    assert out.turns == 2 and len(fake.requests) == 2


async def test_dollar_budget_exhausted_keeps_the_work(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(tool_call("edit_file", {"path": "calc.py", "old_string": "a - b", "new_string": "a + b"},
                       use=usage(4000, 500)),
             *[tool_call("list_files", {}, use=usage(4000, 500)) for _ in range(5)])
    budget = Budget(max_dollars=0.03)  # one call costs 4000*$3 + 500*$15 per MTok = $0.0195
    out = await coder_for(fake).implement(request(ws, budget), ws)
    assert out.status == "budget_exhausted" and out.reason.startswith("dollar budget exhausted: $0.0195/$0.0300")
    assert len(fake.requests) == 1 and out.usage.dollars <= budget.max_dollars
    assert "a + b" in (ws.repo_dir / "calc.py").read_text()  # the work so far stays


async def test_output_tokens_capped_by_the_budget(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(tool_call("list_files", {}, use=usage(100, 7000)), tool_call("list_files", {}, use=usage(100, 2000)))
    out = await coder_for(fake).implement(request(ws, Budget(max_output_tokens=9000)), ws)
    assert [r.body["max_tokens"] for r in fake.requests] == [8192, 2000]
    assert out.status == "budget_exhausted" and out.reason == "output-token budget exhausted: 9000/9000 tokens"


async def test_path_escapes_are_refused_and_the_loop_continues(ws: Workspace, fake: FakeAnthropic,
                                                               tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret")
    (ws.repo_dir / "link").symlink_to(outside)
    fake.add(
        tool_calls([("read_file", {"path": "../../etc/passwd"}), ("read_file", {"path": "/etc/passwd"}),
                    ("read_file", {"path": "link"}), ("write_file", {"path": ".git/hooks/pre-commit",
                                                                     "content": "evil"})]),
        tool_call("search", {"pattern": "secret", "path": "."}),
        reply("I could not read those files; nothing changed."),
    )
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "done" and out.summary == "I could not read those files; nothing changed."
    results = fake.requests[1].tool_results()
    assert len(results) == 4 and all(r["is_error"] is True for r in results)
    assert all(r["content"].startswith("refused:") for r in results)
    assert "top secret" not in str(fake.requests[1].body) and not (ws.repo_dir / ".git/hooks/pre-commit").exists()
    assert fake.requests[2].tool_results()[0]["content"] == "(no matches)"  # search skips the symlink out


async def test_huge_command_output_is_truncated(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(tool_call("run_command", {"command": "yes | head -c 5000000"}), reply("done"))
    out = await coder_for(fake, max_tool_output=20_000).implement(request(ws), ws)
    assert out.status == "done"
    content = fake.requests[1].tool_results()[0]["content"]
    assert "bytes of output truncated (5000000 total)" in content
    assert len(content) < 21_000 and len(out.transcript) < 10_000


async def test_edit_must_match_exactly_once(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(
        tool_call("edit_file", {"path": "calc.py", "old_string": "return a * b", "new_string": "x"}),
        tool_call("edit_file", {"path": "calc.py", "old_string": "    return ", "new_string": "    return 0 + "}),
        tool_call("edit_file", {"path": "missing.py", "old_string": "a", "new_string": "b"}),
        tool_call("write_file", {"path": "pkg/new.py", "content": "X = 1\n"}),
        reply("gave up editing"),
    )
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "done"
    zero, two, missing, wrote = (fake.requests[i].tool_results()[0] for i in range(1, 5))
    assert zero["is_error"] and "not found" in zero["content"]
    assert two["is_error"] and "occurs 2 times" in two["content"]
    assert missing["is_error"] and "no such file" in missing["content"]
    assert not wrote.get("is_error") and (ws.repo_dir / "pkg/new.py").read_text() == "X = 1\n"
    assert (ws.repo_dir / "calc.py").read_text() == BUGGY


@pytest.mark.parametrize("status,kind", [(429, "rate_limit_error"), (529, "overloaded_error")])
async def test_rate_limit_and_overload_are_retried(ws: Workspace, fake: FakeAnthropic, status: int,
                                                   kind: str) -> None:
    fake.add(ApiError(status, kind, "slow down", {"retry-after": "0"}), reply("nothing to do"))
    started = time.monotonic()
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "done" and out.summary == "nothing to do"
    assert len(fake.requests) == 2 and time.monotonic() - started < 5
    assert fake.requests[1].headers.get("x-stainless-retry-count") == "1"


async def test_bad_request_fails_with_the_reason(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(ApiError(400, "invalid_request_error", "messages: text content blocks must be non-empty"))
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "failed" and len(fake.requests) == 1
    assert out.reason == ("Anthropic API error: 400 invalid_request_error: "
                          "messages: text content blocks must be non-empty")


async def test_retries_exhausted_and_connection_refused(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(*[ApiError(529, "overloaded_error", "Overloaded", {"retry-after": "0"})] * 3)
    out = await coder_for(fake, max_retries=2).implement(request(ws), ws)
    assert out.status == "failed" and out.reason == "Anthropic API error: 529 overloaded_error: Overloaded"
    assert len(fake.requests) == 3

    closed = FakeAnthropic()
    url = closed.base_url
    closed.stop()  # never started: the port is closed
    client = anthropic.AsyncAnthropic(api_key="k", base_url=url, max_retries=0)
    out = await AnthropicCoder(client=client).implement(request(ws), ws)
    assert out.status == "failed" and out.reason.startswith("Anthropic API error: connection failed")


async def test_stop_reasons(ws: Workspace, fake: FakeAnthropic) -> None:
    fake.add(reply("Here is part one", stop_reason="max_tokens"), reply("All done: nothing needed."))
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "done" and out.summary == "All done: nothing needed." and out.turns == 2
    assert "cut off" in fake.requests[1].messages[-1]["content"][-1]["text"]

    fake.add(reply("I can't help with that.", stop_reason="refusal"))
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "failed" and out.reason == "the model refused to continue: I can't help with that."


async def test_thinking_blocks_go_back_unchanged(ws: Workspace, fake: FakeAnthropic) -> None:
    thinking = {"type": "thinking", "thinking": "The bug is in calc.py.", "signature": "sig-abc"}
    call = tool_call("read_file", {"path": "calc.py"})
    fake.add({**call, "content": [thinking, *call["content"]]}, reply("done"))
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "done"
    assert fake.requests[1].messages[1]["content"][0] == thinking


async def test_transcript_masks_secrets(ws: Workspace, fake: FakeAnthropic,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    (ws.repo_dir / "config.txt").write_text(f"key = {secret}\n")
    fake.add(tool_call("read_file", {"path": "config.txt"}, text=f"I see {secret}"),
             reply(f"done; the key was {secret}"))
    out = await coder_for(fake).implement(request(ws), ws)
    assert out.status == "done" and out.summary == "done; the key was ***"
    assert secret in fake.requests[1].tool_results()[0]["content"]  # the model saw the file as it is
    assert secret not in out.transcript and "key = ***" in out.transcript


async def test_default_client_reads_the_environment(ws: Workspace, fake: FakeAnthropic,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key-123456")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    fake.add(reply("ok"))
    coder = AnthropicCoder(model_by_specialty={"documentation": "claude-haiku-4-5"})
    out = await coder.implement(request(ws, specialty="documentation"), ws)
    assert out.status == "done" and out.usage.model == "claude-haiku-4-5"
    assert coder.client().max_retries == 4
    assert fake.requests[0].api_key == "env-key-123456"
    assert fake.requests[0].body["model"] == "claude-haiku-4-5"


async def test_file_tools_directly(ws: Workspace) -> None:
    from infra.adapters.coders.tools import run_tool

    async def run(name: str, **args) -> tuple[str, bool]:
        r = await run_tool(ws, name, args, command_timeout=10, max_output=20_000, log_name="t")
        return r.content, r.is_error

    (ws.repo_dir / "big.txt").write_text("".join(f"line {i}\n" for i in range(1, 3001)))
    text, err = await run("read_file", path="big.txt", start_line=2999)
    assert not err and text == "2999\tline 2999\n3000\tline 3000\n[lines 2999-3000 of 3000]"
    text, _ = await run("read_file", path="big.txt")
    assert text.endswith("[lines 1-2000 of 3000]")
    assert await run("list_files", glob="*.py") == ("calc.py\ntest_calc.py", False)
    text, _ = await run("list_files", limit=1)
    assert text.startswith("README.md\n[... 3 more files")
    assert (await run("search", pattern="def (add|double)"))[0] == "calc.py:1:def add(a, b):\ncalc.py:5:def double(x):"
    assert (await run("search", pattern="a - b", literal=True, glob="calc.py"))[0] == "calc.py:2:    return a - b"
    text, err = await run("search", pattern="(")
    assert err and "invalid regular expression" in text
    text, err = await run("read_file", path="calc.py", start_line="one")
    assert err and "invalid arguments for read_file" in text
    text, err = await run("list_files", dir="calc.py")
    assert err and "not a directory" in text
