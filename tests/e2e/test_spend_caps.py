"""The spend ledger through ``ccc up``'s composition root (issue 14, part 1): a cluster with
a day cap, its agent's Anthropic coder (the real SDK) against the local Messages API.

The first task spends most of the day's cap on its first call; its next call would not
fit, so it stops there and keeps its work (a draft pull request with the file the model
wrote). The next issue then waits in the queue with ``budget:day`` — no agent takes it,
no call is made — until ``ccc budget set`` raises the cap; then it is assigned and done.
``ccc budget`` shows the spend and the headroom."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import msgspec
import pytest
from click.testing import CliRunner

from events.spend import MICRO
from events.task import TaskPullRequestOpened
from infra.shell.cli.main import cli
from projections.status_api import PREFIX as API
from projections.waits import why_waiting
from tests.e2e.test_pr_to_green import CALC_FILES
from tests.fakes.anthropic_api import fake_anthropic, reply, tool_call, usage  # noqa: F401 - a fixture
from tests.support.pr_repo import scene
from tests.support.session import nats_args

pytestmark = pytest.mark.timeout(150)


async def ccc(nats_url: str, ns, *args: str):
    """``ccc <args>`` in-process, on a thread (it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, cli, [*nats_args(nats_url), "--namespace", ns.prefix, *args])


async def test_a_day_cap_stops_work_with_a_draft_and_holds_the_queue_until_raised(
        tmp_path, nats_url, ns, nc, fake_anthropic, monkeypatch) -> None:  # noqa: F811
    fake, url = fake_anthropic
    # the agent's coder is built from the environment, as `ccc up --coder anthropic` builds it
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k-" + ns.prefix)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", url)
    fake.add(
        # task 1, call 1: writes a file and costs $0.09 of the day's $0.15 (claude-sonnet-5-5:
        # 5000 input tokens at $2/MTok + 8000 output at $10/MTok); call 2 would not fit
        tool_call("write_file", {"path": "NOTES.md", "content": "subtract: to do\n"}, use=usage(5000, 8000)),
        # task 2, after the raise: a change and a summary
        tool_call("edit_file", {"path": "calc.py", "old_string": "    return a + b\n",
                                "new_string": "    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"},
                  use=usage(3000, 200)),
        reply("Added sub().", use=usage(3500, 100)),
    )
    async with scene(tmp_path, nats_url, ns, "acme/calc", CALC_FILES, {}, coder="anthropic",
                     budget=(None, "0.15", (), ()), api_port=0) as s:
        await s.open_issue(1, "Add a subtract function")
        await s.until(1, lambda t: t.pr_number is not None, "a pull request", timeout=90)
        opened = [e for e in await s.events(1) if isinstance(e, TaskPullRequestOpened)]
        assert opened[0].draft, "stopped by the ledger: the work is kept as a draft"
        assert len(fake.requests) == 1, "no second call started in the exhausted scope"
        # the log says why it stopped (the agent's report of its work); the branch holds
        # what the model wrote
        reports: list = []
        await s.cluster.coordinator.store.replay(lambda seq, e: reports.append(msgspec.to_builtins(e)),
                                                 filter_subject=ns.agent_filter())
        assert "stopped after 1 turns: budget:day exhausted: $0.09 spent today of $0.15" in json.dumps(reports)
        assert s.forge.read_file(s.repo, opened[0].branch, "NOTES.md") == "subtract: to do\n"

        # a new issue waits for the day (or a raise), and says so
        await s.open_issue(2, "Add a subtract function, really")
        coordinator = s.cluster.coordinator

        def reason() -> str:
            t = s.task(2)
            return "" if t is None else why_waiting(t, s.model.tasks, datetime.now(UTC), agents=s.model.agents,
                                                    budget=coordinator.budget())

        await s.until(2, lambda t: t.status == "queued" and reason().startswith("budget:day — "),
                      "queued on the day's budget", timeout=30)
        await asyncio.sleep(1.0)  # the scheduler had every chance: nothing assigned, no call made
        assert s.status(2) == "queued" and len(fake.requests) == 1
        shown = await ccc(nats_url, ns, "budget", "--json")
        assert shown.exit_code == 0, shown.output
        day = next(r for r in map(json.loads, shown.stdout.splitlines()) if r["scope"] == "day")
        assert day["exhausted"] and day["cap"] == 0.15 and day["spent"] == pytest.approx(0.09)

        # the board a person reads says so too
        board = await ccc(nats_url, ns, "tasks", "--json")
        assert board.exit_code == 0, board.output
        row = next(r for r in map(json.loads, board.stdout.splitlines()) if r["task"]["task_id"] == s.task_id(2))
        assert row["waiting"].startswith("budget:day — $0.09 of $0.15 spent today; resumes at "), row["waiting"]

        # and the status API (the board's data)
        async with httpx.AsyncClient(base_url=s.cluster.api.url) as http:
            view = (await http.get(f"{API}/tasks/{s.task_id(2)}")).json()
        assert view["waiting"] == row["waiting"], view

        raised = await ccc(nats_url, ns, "budget", "set", "--budget-day", "5")
        assert raised.exit_code == 0, raised.output
        await s.until(2, lambda t: t.pr_number is not None, "a pull request after the raise", timeout=60)
        opened2 = [e for e in await s.events(2) if isinstance(e, TaskPullRequestOpened)]
        assert not opened2[0].draft and len(fake.requests) == 3
        table = await ccc(nats_url, ns, "budget")
        assert table.exit_code == 0 and "day" in table.output and "$5.00" in table.output, table.output
        spent = next(r for r in map(json.loads, (await ccc(nats_url, ns, "budget", "--json")).stdout.splitlines())
                     if r["scope"] == "day")
        assert round(spent["spent"] * MICRO) >= 0.09 * MICRO and not spent["exhausted"]
