"""Hook plugins in a running cluster: a whole :class:`LocalCluster` on the test session's
nats-server (coordinator, a real agent with the scripted coder, the local forge's CI),
with plugins of the example package (tests/plugins/ccc_example_plugins, installed
beside the project) enabled by its settings, as ``CCC_PLUGINS``/``--plugin`` would:

* the notifier posts a Slack-compatible message to a local HTTP server when a task
  completes and when one fails for good;
* the protected-paths policy refuses a change that touches ``.github/workflows``: the
  task fails with its reason, nothing is pushed;
* the label gate's veto and delay keep tasks queued, their wait reason naming it, and
  the agent's slot goes to the next task;
* a plugin that hangs, with a 0.2 s timeout, never holds an assignment longer than that,
  and ``ccc plugins`` shows what is installed, enabled, and its health after the errors.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
import pytest

from events.subjects import Namespace
from events.task import TaskAnalyzed, TaskAssigned, TaskCreated
from infra.adapters.forge.local import LocalForge
from infra.adapters.plugins import discovery
from infra.adapters.plugins.health import read_health, read_plugin_waits
from infra.shell.app.cluster import ClusterOptions, LocalCluster
from projections.waits import Waits
from tests.conftest import eventually
from tests.e2e.test_cli import ccc, json_lines
from tests.support.pr_repo import TEST_COMMAND, Scene, cluster_settings, edit, session, write, write_script

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

if discovery.find("ccc.hooks", "example-notifier") is None:  # fail loudly, not with a KeyError later
    pytest.fail("the example plugins are not installed: pip install -e ./tests/plugins/ccc_example_plugins "
                "(the README's test command installs them)", pytrace=False)

REPO = "acme/calc"
FILES = {
    "calc.py": "def add(a, b):\n    return a + b\n",
    "tests/__init__.py": "",
    "tests/test_calc.py": ("import unittest\n\nfrom calc import add\n\n\n"
                           "class AddTest(unittest.TestCase):\n"
                           "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"),
    ".ccc/test-command": TEST_COMMAND,
}
ADD_SUB = edit("calc.py", "    return a + b\n", "    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")
BREAK_ADD = edit("calc.py", "    return a + b\n", "    return a * b\n")  # its test fails
WORKFLOW = write(".github/workflows/ci.yml", "on: push\njobs: {}\n")


@contextlib.asynccontextmanager
async def plugin_scene(root: Path, nats_url: str, ns: Namespace, plugins: tuple[str, ...],
                       plugin_env: dict[str, str], scripts: dict[int, dict], **options) -> AsyncIterator[Scene]:
    """tests.support.pr_repo.scene, with the hook plugins enabled in the settings."""
    data_dir = root / "data"
    forge = LocalForge(data_dir / "forge")
    forge.create_repo(REPO, FILES)
    for number, script in scripts.items():
        write_script(root / "scripts", REPO, number, **script)
    settings = msgspec.structs.replace(cluster_settings(data_dir, nats_url, ns), plugins=plugins,
                                       plugin_env=tuple(sorted(plugin_env.items())))
    defaults = {"agents": 1, "specialties": ("general",), "capacity": 1, "api_port": None,
                "script_dir": str(root / "scripts"), "heartbeat_interval": 0.5, "heartbeat_timeout": 10.0,
                "retry_base": 0.2, "retry_max": 1.0, "test_timeout": 60.0, "shutdown_grace": 1.0,
                "checks_timeout": 120.0}
    cluster = LocalCluster(settings, ns, ClusterOptions(**{**defaults, **options}))
    async with cluster:
        yield Scene(cluster, REPO, forge, root)


class Receiver:
    """A local HTTP server that keeps every JSON body POSTed to it (a Slack webhook's stand-in)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                received.append({"content_type": self.headers.get("Content-Type"),
                                 "json": json.loads(self.rfile.read(length))})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ccc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


async def assigned_after_analysis(s: Scene, number: int) -> float:
    """Seconds between the task's analysis and its assignment (their events' times: the
    rules' analysis is recorded on the creation)."""
    events = await s.events(number)
    analysed = next(e for e in events if isinstance(e, TaskAnalyzed)
                    or isinstance(e, TaskCreated) and e.analysis is not None)
    assigned = next(e for e in events if isinstance(e, TaskAssigned))
    return (assigned.occurred_at - analysed.occurred_at).total_seconds()


async def test_the_notifier_posts_when_a_task_completes_and_when_one_fails(tmp_path, nats_url, ns):
    scripts = {1: {"attempts": [session("sub() added.", ADD_SUB)]},
               2: {"attempts": [session("add() broken.", BREAK_ADD)]}}
    with Receiver() as hook:
        async with plugin_scene(tmp_path, nats_url, ns, ("example-notifier",),
                                {"EXAMPLE_NOTIFIER_URL": hook.url}, scripts, max_attempts=1, api_port=0) as s:
            await s.open_issue(1, "Add a subtract function")
            await s.until_status(1, "review", timeout=60)
            assert hook.bodies == []  # a pull request in review is not news
            await s.merge(1)
            await s.until_status(1, "completed")
            await eventually(lambda: len(hook.bodies) == 1)
            await s.open_issue(2, "Make add faster")
            failed = await s.until_status(2, "failed", timeout=60)
            assert failed.failure_phase == "testing" and not failed.can_retry  # no retry follows: final
            await eventually(lambda: len(hook.bodies) == 2)
            stats = s.cluster.plugins.counts("example-notifier")
            # the process's plugin metrics, beside the log's on the status API
            async with httpx.AsyncClient() as http:
                scraped = (await http.get(f"{s.cluster.api.url}/metrics/plugins")).text
            ok = 'claude_plugin_calls_total{hook="on_event",outcome="ok",plugin="example-notifier"}'
            assert ok in scraped and 'claude_plugin_healthy{plugin="example-notifier"} 1.0' in scraped
    completed, failure = (b["json"] for b in hook.bodies)
    assert all(b["content_type"] == "application/json" for b in hook.bodies)
    assert set(completed) == {"text"} and set(failure) == {"text"}  # Slack's incoming-webhook shape
    assert completed["text"].startswith(f":white_check_mark: task `{s.task_id(1)}` completed: "
                                        "acme/calc#1 Add a subtract function")
    assert failure["text"].startswith(f":x: task `{s.task_id(2)}` failed: acme/calc#2 Make add faster")
    assert "in testing" in failure["text"]
    # every event went through its hook (the ones it ignores too), none failed or was dropped
    assert stats.ok >= 10 and stats.error == stats.timeout == stats.dropped == 0


async def test_the_pr_policy_refuses_a_change_to_a_protected_path(tmp_path, nats_url, ns):
    scripts = {1: {"attempts": [session("sub() added, and CI made lenient.", ADD_SUB, WORKFLOW)]},
               2: {"attempts": [session("sub() added.", ADD_SUB)]}}
    async with plugin_scene(tmp_path, nats_url, ns, ("example-protected-paths",), {}, scripts) as s:
        await s.open_issue(1, "Add a subtract function")
        task = await s.until_status(1, "failed", timeout=60)
        assert task.failure_phase == "policy" and not task.failure_retryable and not task.can_retry
        assert task.failure_reason == (
            "plugin example-protected-paths refused the pull request: touches protected paths "
            "(.github/workflows/**): .github/workflows/ci.yml; not pushed")
        assert task.attempt == 1 and task.pr_url == ""
        kinds = await s.kinds(1)
        assert "task.pr_opened" not in kinds and kinds[-1] == "task.failed"
        # nothing left the workspace: the forge has only its main branch
        assert s.forge.branches(REPO) == ["main"]
        # the same policy lets a change that stays out of the protected paths through
        await s.open_issue(2, "Add a subtract function, again")
        await s.until_status(2, "review", timeout=60)
        assert s.cluster.plugins.counts("example-protected-paths").ok == 2


async def test_an_assignment_veto_and_delay_show_as_the_wait_reason(tmp_path, nats_url, ns, nc):
    scripts = {n: {"attempts": [session("sub() added.", ADD_SUB)]} for n in (1, 2, 3)}
    options = {"EXAMPLE_LABEL_GATE_DELAY_SECONDS": "2"}
    async with plugin_scene(tmp_path, nats_url, ns, ("example-label-gate",), options, scripts) as s:
        coordinator = s.cluster.coordinator
        await s.open_issue(1, "Refactor everything", labels=["hold"])
        await s.open_issue(2, "Tune the cache", labels=["later"])
        await eventually(lambda: {s.task_id(1), s.task_id(2)} <= set(coordinator.holds))
        now = datetime.now(UTC)
        waits = Waits(s.model.tasks, s.model.agents, plugins=coordinator.plugin_waits())
        assert s.status(1) == "queued"
        assert waits.why(s.task(1), now) == "plugin example-label-gate vetoes it: the issue is labelled 'hold'"
        assert waits.why(s.task(2), now).startswith("plugin example-label-gate delays it until ")
        assert waits.why(s.task(2), now).endswith(": the issue is labelled 'later'")
        # the same words for any reader of the bus (the coordinator publishes its holds)
        await eventually(lambda: _has_waits(nc, ns, {s.task_id(1), s.task_id(2)}))
        on_bus = await read_plugin_waits(nc, ns)
        assert on_bus[s.task_id(1)] == waits.why(s.task(1), now)
        # ... and on the board a person reads, run anywhere
        board = await ccc(nats_url, ns, "tasks", "--json")
        assert board.exit_code == 0, board.output
        row = next(r for r in map(json.loads, board.stdout.splitlines()) if r["task"]["task_id"] == s.task_id(1))
        assert row["waiting"] == "plugin example-label-gate vetoes it: the issue is labelled 'hold'"
        # the one agent's slot is not kept for the vetoed task: the next one gets it
        await s.open_issue(3, "Add a subtract function")
        await s.until_status(3, "review", timeout=60)
        assert s.status(1) == "queued"
        # the delayed one is assigned once its delay is over, not before
        await s.until(2, lambda t: t.attempt >= 1 and t.status != "queued", "to be assigned", timeout=30)
        assert await assigned_after_analysis(s, 2) >= 1.9
        # `ccc plugins` shows the hold that is still in force
        result = await ccc(nats_url, ns, "plugins")
        assert result.exit_code == 0, result.output
        assert "Queued tasks held back by a plugin" in result.output and s.task_id(1) in result.output
        assert "vetoes it: the issue is labelled 'hold'" in result.output


async def _has_waits(nc, ns, task_ids: set[str]) -> bool:
    return task_ids <= set(await read_plugin_waits(nc, ns))


async def test_a_hanging_plugin_never_delays_assignments_beyond_its_timeout(tmp_path, nats_url, ns, nc):
    scripts = {n: {"attempts": [session("sub() added.", ADD_SUB)]} for n in (1, 2, 3)}
    options = {"EXAMPLE_FAULTY_MODE": "hang", "EXAMPLE_FAULTY_TIMEOUT": "0.2", "EXAMPLE_FAULTY_EVENT_TIMEOUT": "0.2"}
    async with plugin_scene(tmp_path, nats_url, ns, ("example-faulty", "example-broken"), options, scripts,
                            agents=3) as s:
        for n in (1, 2, 3):
            await s.open_issue(n, f"Add a subtract function ({n})")
        for n in (1, 2, 3):
            await s.until(n, lambda t: t.attempt >= 1 and t.status != "queued", "to be assigned", timeout=30)
        # each waited at most the plugin's timeout (and once its circuit opened, not at all)
        delays = [await assigned_after_analysis(s, n) for n in (1, 2, 3)]
        assert max(delays) < 0.2 + 0.5, delays
        for n in (1, 2, 3):  # the cluster went on: a hanging pull-request policy fails closed, retryable
            await s.until(n, lambda t: t.failure_phase == "policy", "to fail in policy", timeout=30,
                          unless=("cancelled",))
            assert "plugin example-faulty refused the pull request: could not be asked" in s.task(n).failure_reason
        counts = s.cluster.plugins.counts("example-faulty")
        assert counts.timeout >= 5 and counts.open >= 1  # its circuit opened after five in a row
        # its health on the bus, as `ccc plugins` shows it
        await eventually(lambda: _reports(nc, ns, "example-faulty", lambda p: p.counts.timeout >= 5), timeout=15)
        result = await ccc(nats_url, ns, "plugins")
        assert result.exit_code == 0, result.output
        out = result.output
        assert "example-notifier" in out and "ccc-example-plugins" in out  # installed (not enabled here)
        faulty = next(line for line in out.splitlines() if line.startswith("coordinator.") and "example-faulty" in line)
        assert any(state in faulty for state in ("open", "stuck", "degraded")), faulty
        broken = next(line for line in out.splitlines() if line.startswith("coordinator.") and "example-broken" in line)
        assert "failed" in broken and "No module named 'ccc_example_plugins.missing'" in broken
        records = json_lines((await ccc(nats_url, ns, "plugins", "--json")).output)
        [process] = [r["process"] for r in records if "process" in r]
        assert process["enabled"] == ["example-faulty", "example-broken"] and process["role"] == "coordinator"
        faulty_health = next(p for p in process["plugins"] if p["name"] == "example-faulty")
        assert faulty_health["counts"]["timeout"] >= 5 and faulty_health["error"].endswith("no answer within 0.2s")


async def _reports(nc, ns, plugin: str, ok) -> bool:
    return any(ok(p) for r in await read_health(nc, ns) for p in r.plugins if p.name == plugin)


async def test_an_unknown_plugin_name_stops_ccc_up_and_agent_before_they_start(tmp_path, nats_url, ns):
    for command in (["up", "--no-api"], ["agent", "--specialty", "general"]):
        result = await ccc(nats_url, ns, "--data-dir", str(tmp_path), *command, "--plugin", "example-typo")
        assert result.exit_code == 2, result.output
        assert "error: plugin example-typo: not installed" in result.stderr
        assert "example-notifier" in result.stderr  # what is installed


async def test_the_plugins_health_entry_is_each_processes_own(tmp_path, nats_url, ns, nc):
    """The process's entry is written while it runs; the last one, on stop, says closed."""
    scripts = {1: {"attempts": [session("sub() added.", ADD_SUB)]}}
    async with plugin_scene(tmp_path, nats_url, ns, ("example-protected-paths",), {}, scripts) as s:
        [record] = await read_health(nc, ns)
        assert record.process == s.cluster.plugins.key and record.process.startswith("coordinator.")
        assert record.enabled == ("example-protected-paths",) and [p.state for p in record.plugins] == ["ok"]
        assert record.plugins[0].hooks == ("pull_request",) and record.plugins[0].version == "0.1.0"
    [record] = await read_health(nc, ns)
    assert [p.state for p in record.plugins] == ["closed"]
