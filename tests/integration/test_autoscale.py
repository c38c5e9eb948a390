"""The autoscaler on a real nats-server, with the real coordinator and real agents (local
forge, scripted coder, the repository's tests in the sandbox): a burst of tasks for one
specialty scales the agents up, every task is worked, the empty queue scales them back
down, each agent drained before it stops, every decision on ``<ns>.cluster.>``."""

from __future__ import annotations

import pytest
from nats.js import api

from actors.coordinator import Coordinator, CoordinatorConfig
from events.cluster import (
    ClusterScaledDown,
    ClusterScaledUp,
    cluster_filter,
    cluster_stream,
    decode_cluster_event,
)
from events.task_state import WITH_AGENT
from infra.adapters.forge.local import LocalForge
from infra.shell.app.autoscale import Autoscaler
from projections.autoscale import AutoscalePolicy
from tests.conftest import eventually
from tests.e2e.test_actors import CALC, FIX, TEST, make_agent, script
from tests.integration.test_coordinator import opened, publish_issue

pytestmark = pytest.mark.timeout(150)

BURST = 6


@pytest.fixture
def forge(tmp_path) -> LocalForge:
    f = LocalForge(tmp_path / "forge")
    f.create_repo("acme/calc", {"calc.py": CALC, "tests/test_calc.py": TEST,
                                ".ccc/test-command": "python -m unittest discover -s tests -v\n"})
    return f


@pytest.fixture
def scripts(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir()
    for n in range(1, BURST + 1):
        (d / f"acme_calc-{n}.json").write_text(script(FIX))
    return d


async def cluster_events(nc, ns) -> list:
    """Everything on the cluster stream, decoded (and checked against its subject)."""
    js = nc.jetstream()
    info = await js.stream_info(cluster_stream(ns))
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(cluster_stream(ns), seq)
        out.append(decode_cluster_event(ns.rel(msg.subject), msg.data))
    return out


async def test_a_burst_scales_up_all_complete_then_it_scales_down_with_nothing_lost(nc, ns, store, tmp_path,
                                                                                   forge, scripts):
    coordinator = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=5, retry_base=0.05, retry_max=0.2))
    await coordinator.start()
    agents: list = []
    peak = 0
    drained_before_stop: dict[str, str] = {}
    released: list[str] = []

    async def on_stopped(agent):
        released.append(agent.id)

    async def spawn(agent_id: str, specialty: str):
        agent = make_agent(nc, ns, tmp_path, forge, scripts, agent_id, specialties=(specialty,))
        real_stop = agent.stop

        async def stop():  # the agent's own state (on the log) when its stop began: drained first
            drained_before_stop[agent.id] = agent.state.status
            await real_stop()

        agent.stop = stop
        await agent.start()
        return agent

    scaler = Autoscaler(
        nc, ns, AutoscalePolicy(min_agents=1, max_agents=3, target_load=1.0, max_wait=60, cooldown_up=0.1,
                                cooldown_down=0.5, specialties=("backend",)),
        view=lambda: (coordinator.model.tasks, coordinator.model.agents), agents=agents, spawn=spawn,
        interval=0.1, drain_timeout=10, settle=5, on_stopped=on_stopped,
    )
    await scaler.start()
    try:
        await eventually(lambda: len(agents) == 1, timeout=15)  # the minimum, with nothing queued
        for n in range(1, BURST + 1):
            await publish_issue(nc, ns, opened(n, f"Fix the add function, report {n}", labels=["backend"], repo="acme/calc"))

        def worked() -> bool:
            nonlocal peak
            peak = max(peak, len(agents))
            tasks = [coordinator.model.tasks.get(f"acme_calc-{n}") for n in range(1, BURST + 1)]
            return all(t is not None and t.status == "checking" for t in tasks)

        await eventually(worked, timeout=100)
        assert peak == 3  # scaled up to the maximum, not beyond
        await eventually(lambda: len(agents) == 1, timeout=30)  # and back down to the minimum
    finally:
        await scaler.stop()
        for a in agents:
            await a.stop()
        await coordinator.stop()

    # nothing lost: every task was worked once to a pushed branch and an open pull request
    tasks = [coordinator.model.tasks[f"acme_calc-{n}"] for n in range(1, BURST + 1)]
    assert all(t.status == "checking" and t.pr_number and t.branch in forge.branches("acme/calc") for t in tasks)
    assert not [t for t in coordinator.model.tasks.values() if t.status == "queued" or t.status in WITH_AGENT]

    events = await cluster_events(nc, ns)
    assert events == scaler.decisions
    ups = [e for e in events if isinstance(e, ClusterScaledUp)]
    downs = [e for e in events if isinstance(e, ClusterScaledDown)]
    assert len(ups) == 3 and len(downs) == 2
    assert all(e.outcome == "done" and e.specialty == "backend" for e in events)
    assert "below the minimum" in ups[0].reason and ups[0].agents_before == 0 and ups[0].agents_after == 1
    assert all(e.queue_depth > 0 and "queued" in e.reason for e in ups[1:])
    assert [e.agents_after for e in ups] == [1, 2, 3]
    assert [(e.agents_before, e.agents_after) for e in downs] == [(3, 2), (2, 1)]
    assert all("idle and nothing queued for backend" in e.reason and e.queue_depth == 0 for e in downs)
    assert {e.agent_id for e in downs} <= {e.agent_id for e in ups}
    assert [e.agent_id for e in ups] == ["auto-backend-1", "auto-backend-2", "auto-backend-3"]
    assert released == [e.agent_id for e in downs]  # the cluster was told, after each stop
    # every agent stopped by a scale-down was draining (maintenance) when its stop began
    assert {drained_before_stop[e.agent_id] for e in downs} == {"maintenance"}
    # the agents scaled down went offline on their own aggregate (drained, not lost)
    for e in downs:
        assert coordinator.model.agents[e.agent_id].status == "offline"


async def test_a_failed_start_is_recorded_and_the_fleet_unchanged(nc, ns, store):
    async def spawn(agent_id, specialty):
        raise RuntimeError("no capacity on this host")

    agents: list = []
    scaler = Autoscaler(nc, ns, AutoscalePolicy(min_agents=1, max_agents=2, specialties=("frontend",)),
                        view=lambda: ({}, {}), agents=agents, spawn=spawn, interval=0.1)
    decision = await scaler.step()
    assert decision is not None and decision.action == "scaled_up"
    assert agents == []
    (event,) = await cluster_events(nc, ns)
    assert isinstance(event, ClusterScaledUp) and event.outcome.startswith("failed: RuntimeError: no capacity")
    assert event.agents_before == 0 and event.agents_after == 0 and event.specialty == "frontend"
    # the cluster stream holds only decisions: nothing of it reaches the event store's readers
    assert await store.last_seq() == 0
    info = await nc.jetstream().stream_info(cluster_stream(ns))
    assert info.config.subjects == [cluster_filter(ns)] and info.config.retention == api.RetentionPolicy.LIMITS


async def test_bad_settings_are_refused_clearly(nc, ns):
    from events.errors import ConfigError

    async def spawn(agent_id, specialty):  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(ConfigError, match="interval must be > 0"):
        Autoscaler(nc, ns, AutoscalePolicy(), view=lambda: ({}, {}), agents=[], spawn=spawn, interval=0)
    with pytest.raises(ConfigError, match="maximum must be >= 1"):
        Autoscaler(nc, ns, AutoscalePolicy(min_agents=3, max_agents=2), view=lambda: ({}, {}), agents=[],
                   spawn=spawn)


def test_agent_ids_are_bounded_so_credentials_can_be_made_ahead():
    from infra.shell.app.autoscale import agent_ids

    ids = agent_ids(AutoscalePolicy(min_agents=0, max_agents=2), ("backend", "frontend"))
    assert ids == ["auto-backend-1", "auto-backend-2", "auto-frontend-1", "auto-frontend-2"]
