"""Issue -> pull request through the real actors (in one process), a real
nats-server, real git repositories and the scripted coder."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from actors.agent import Agent, AgentConfig
from actors.coordinator import Coordinator, CoordinatorConfig
from actors.pipeline import PipelineSettings
from events.issue import IssuePullRequestMerged
from events.refs import split_ref
from infra.adapters.coders.scripted import ScriptedCoder
from infra.adapters.git.workbench import GitWorkbench
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from infra.adapters.obs.metrics import AgentMetrics
from infra.adapters.obs.telemetry import OtelTelemetry
from infra.adapters.obs.tracing import setup_tracing
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from tests.conftest import eventually
from tests.integration.test_coordinator import opened, publish_issue

pytestmark = pytest.mark.timeout(90)

CALC = "def add(a, b):\n    return a - b\n"
# unittest, not pytest: the repository's tests run in the agent's sandbox, which shows the
# system's Python but not the agent's virtualenv (a repository brings its own packages)
TEST = ("import unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")


def script(*attempts) -> str:
    return json.dumps({"attempts": [{"steps": steps, "summary": "fix add"} for steps in attempts]})


FIX = [{"edit": {"path": "calc.py", "old": "return a - b", "new": "return a + b"}}]
BROKEN = [{"edit": {"path": "calc.py", "old": "return a - b", "new": "return a * b"}}]


@pytest.fixture
def forge(tmp_path) -> LocalForge:
    f = LocalForge(tmp_path / "forge")
    f.create_repo("acme/calc", {"calc.py": CALC, "tests/test_calc.py": TEST,
                                ".ccc/test-command": "python -m unittest discover -s tests -v\n"})
    return f


@pytest.fixture
def scripts(tmp_path) -> Path:
    d = tmp_path / "scripts"
    d.mkdir()
    (d / "acme_calc-1.json").write_text(script(FIX))
    (d / "acme_calc-2.json").write_text(script(BROKEN, FIX))  # fails first, then passes
    (d / "acme_calc-3.json").write_text(script(BROKEN))  # always fails
    (d / "acme_calc-4.json").write_text(script([{"run": {"command": "sleep 30"}}, *FIX]))
    return d


def make_agent(nc, ns, tmp_path, forge, scripts, agent_id, specialties=("backend", "general"), capacity=1,
               telemetry=None):
    config = AgentConfig(agent_id=agent_id, specialties=specialties, capacity=capacity,
                         heartbeat_interval=0.2, shutdown_grace=0.5,
                         pipeline=PipelineSettings(test_timeout=60))
    return Agent(nc, ns, config, workbench=GitWorkbench(tmp_path / "ws"), coder=ScriptedCoder(scripts),
                 forge=LocalForgeClient(forge.root), artifacts=ObjectStoreArtifacts(nc, ns.artifacts_bucket),
                 telemetry=telemetry or OtelTelemetry())


@pytest.fixture
async def cluster(nc, ns, store, tmp_path, forge, scripts):
    coordinator = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=5, retry_base=0.05, retry_max=0.2))
    await coordinator.start()
    agents = [make_agent(nc, ns, tmp_path, forge, scripts, f"agent-{i}") for i in (1, 2)]
    for a in agents:
        await a.start()
    yield coordinator, agents
    for a in agents:
        await a.stop()
    await coordinator.stop()


def state(c, tid):
    t = c.model.tasks.get(tid)
    return t.status if t else None


async def test_issue_becomes_a_pushed_branch_with_passing_tests(nc, ns, store, cluster, forge):
    coordinator, _ = cluster
    await publish_issue(nc, ns, opened(1, "Fix add in calc.py", labels=["backend"], repo="acme/calc"))
    await eventually(lambda: state(coordinator, "acme_calc-1") == "checking", timeout=30)
    task = coordinator.model.tasks["acme_calc-1"]
    assert task.branch.startswith("ccc/task-acme_calc-1-")
    assert task.branch in forge.branches("acme/calc")
    assert "return a + b" in forge.read_file("acme/calc", task.branch, "calc.py")
    assert task.tests_passed == 1 and task.tests_failed == 0 and task.pr_number == 1
    loaded = await store.load(ns.agent_filter(task.agent_id))
    kinds = [e.event.__struct_config__.tag for e in loaded.events]
    for kind in ("agent.workspace_prepared", "agent.codebase_analysed", "agent.implementation_produced",
                 "agent.tests_run", "agent.changes_pushed", "agent.pr_opened", "agent.task_released"):
        assert kind in kinds
    impl = next(e.event for e in loaded.events if e.event.__struct_config__.tag == "agent.implementation_produced")
    obs = await nc.jetstream().object_store(ns.artifacts_bucket)
    diff = (await obs.get(split_ref(impl.diff_ref).name)).data.decode()
    assert "+    return a + b" in diff
    # merge -> completed, and the change is on main
    await publish_issue(nc, ns, IssuePullRequestMerged(event_id="m1", repo="acme/calc", number=1,
                                                       occurred_at=datetime.now(timezone.utc)))
    await eventually(lambda: state(coordinator, "acme_calc-1") == "completed")


async def test_an_attempt_is_traced_and_measured_phase_by_phase(nc, ns, store, tmp_path, forge, scripts):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    exporter = InMemorySpanExporter()
    provider = setup_tracing("ccc-test", exporter=exporter, set_global=False,
                             environ={"OTEL_TRACES_EXPORTER": "none"})
    metrics = AgentMetrics(CollectorRegistry())
    coordinator = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=5))
    agent = make_agent(nc, ns, tmp_path, forge, scripts, "agent-traced",
                       telemetry=OtelTelemetry(metrics, tracer=provider.get_tracer("test")))
    await coordinator.start()
    await agent.start()
    try:
        await publish_issue(nc, ns, opened(1, "Fix add in calc.py", labels=["backend"], repo="acme/calc"))
        await eventually(lambda: state(coordinator, "acme_calc-1") == "checking", timeout=30)
        await eventually(lambda: not agent.running)
    finally:
        await agent.stop()
        await coordinator.stop()
        provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    attempt = spans["agent.task"]
    assert attempt.attributes["ccc.outcome"] == "done" and attempt.attributes["ccc.task_id"] == "acme_calc-1"
    handler = spans["agent-agent-traced handle"]  # the consumer span of the assignment
    assert attempt.parent.span_id == handler.context.span_id
    phases = ("workspace_prepared", "codebase_analysed", "implementation_produced", "tests_run",
              "changes_pushed", "pr_opened")
    for phase in phases:  # one span per phase, in the attempt's trace, back to back
        span = spans[f"pipeline.{phase}"]
        assert span.parent.span_id == attempt.context.span_id
    for before, after in zip(phases, phases[1:]):
        assert spans[f"pipeline.{before}"].end_time == spans[f"pipeline.{after}"].start_time
    done = metrics.registry.get_sample_value
    assert done("claude_agent_tasks_processed_total", {"agent_id": "agent-traced", "outcome": "done"}) == 1
    assert done("claude_agent_running_tasks", {"agent_id": "agent-traced"}) == 0
    assert done("claude_agent_phase_duration_seconds_count",
                {"agent_id": "agent-traced", "phase": "tests_run", "outcome": "ok"}) == 1


async def test_two_issues_in_parallel_on_two_agents(nc, ns, cluster):
    coordinator, _ = cluster
    await publish_issue(nc, ns, opened(1, "Fix add", labels=["backend"], repo="acme/calc"))
    await publish_issue(nc, ns, opened(2, "Fix add again", labels=["backend"], repo="acme/calc"))
    await eventually(lambda: coordinator.model.tasks.get("acme_calc-1") is not None
                     and coordinator.model.tasks.get("acme_calc-2") is not None
                     and coordinator.model.tasks["acme_calc-1"].agent_id is not None
                     and coordinator.model.tasks["acme_calc-2"].agent_id is not None, timeout=30)
    assert coordinator.model.tasks["acme_calc-1"].agent_id != coordinator.model.tasks["acme_calc-2"].agent_id
    await eventually(lambda: state(coordinator, "acme_calc-1") == "checking"
                     and state(coordinator, "acme_calc-2") == "checking", timeout=40)
    assert coordinator.model.tasks["acme_calc-2"].attempt == 2  # failed tests first, then a retry


async def test_failing_tests_retry_then_fail_with_reason(nc, ns, cluster):
    coordinator, _ = cluster
    await publish_issue(nc, ns, opened(3, "Fix add badly", labels=["backend"], repo="acme/calc"))
    await eventually(lambda: state(coordinator, "acme_calc-3") == "failed"
                     and coordinator.model.tasks["acme_calc-3"].attempt == 3, timeout=60)
    task = coordinator.model.tasks["acme_calc-3"]
    assert task.failure_phase == "testing" and "failed" in task.failure_reason


async def test_cancel_mid_run(nc, ns, cluster):
    from events.issue import IssueCancelRequested
    coordinator, agents = cluster
    await publish_issue(nc, ns, opened(4, "Slow fix", labels=["backend"], repo="acme/calc"))
    await eventually(lambda: any("acme_calc-4" in a.running for a in agents), timeout=30)
    await eventually(lambda: state(coordinator, "acme_calc-4") == "in_progress")
    await publish_issue(nc, ns, IssueCancelRequested(event_id="c4", repo="acme/calc", number=4,
                                                     occurred_at=datetime.now(timezone.utc),
                                                     author="tester", author_association="OWNER"))
    await eventually(lambda: state(coordinator, "acme_calc-4") == "cancelled", timeout=20)
    assert not any("acme_calc-4" in a.running for a in agents)


async def test_a_stopping_agent_drains_before_it_hands_back(nc, ns, store, cluster):
    """Stopping: ``maintenance_started`` (no new work) comes before the hand-back, so the
    coordinator gives the task to the other agent, never back to the one leaving."""
    from events.agent import AgentMaintenanceStarted, AgentTaskReleased, AgentWentOffline
    coordinator, agents = cluster
    await publish_issue(nc, ns, opened(4, "Slow fix", labels=["backend"], repo="acme/calc"))
    await eventually(lambda: state(coordinator, "acme_calc-4") == "in_progress", timeout=30)
    leaving = next(a for a in agents if "acme_calc-4" in a.running)
    other = next(a for a in agents if a is not leaving)
    await leaving.stop()
    await eventually(lambda: coordinator.model.tasks["acme_calc-4"].agent_id == other.id, timeout=20)
    assert coordinator.model.tasks["acme_calc-4"].attempt == 2
    history = [e.event for e in (await store.load(ns.agent_filter(leaving.id))).events]
    kinds = [type(e) for e in history]
    drained = kinds.index(AgentMaintenanceStarted)
    released = kinds.index(AgentTaskReleased)
    assert drained < released and kinds[-1] is AgentWentOffline
    assert history[drained].reason == "shutdown" and history[released].outcome == "handed_back"
    assert coordinator.model.agents[leaving.id].status == "offline"


async def test_when_every_agent_stops_the_handed_back_task_waits_in_the_queue(nc, ns, cluster):
    """``ccc up`` stopping: all agents drain first, so the hand-back is not assigned to
    an agent that is stopping too (which would burn an attempt per agent)."""
    import asyncio
    coordinator, agents = cluster
    await publish_issue(nc, ns, opened(4, "Slow fix", labels=["backend"], repo="acme/calc"))
    await eventually(lambda: state(coordinator, "acme_calc-4") == "in_progress", timeout=30)
    await asyncio.gather(*(a.drain() for a in agents))
    await eventually(lambda: all(coordinator.model.agents[a.id].status == "maintenance" for a in agents))
    await asyncio.gather(*(a.stop() for a in agents))
    await eventually(lambda: state(coordinator, "acme_calc-4") == "queued", timeout=20)
    task = coordinator.model.tasks["acme_calc-4"]
    assert task.agent_id is None and task.attempt == 2
    await eventually(lambda: all(coordinator.model.agents[a.id].status == "offline" for a in agents))
    assert state(coordinator, "acme_calc-4") == "queued"  # nobody took it while stopping
