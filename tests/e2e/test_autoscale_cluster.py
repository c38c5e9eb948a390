"""``ccc up --autoscale`` through the composition root: a LocalCluster with no fixed agents
scales its local agents up on a burst of one specialty and back down when the queue is
empty, every decision an event on the cluster stream, nothing lost."""

from __future__ import annotations

import pytest

from events.cluster import cluster_stream
from tests.conftest import eventually
from tests.e2e.test_pr_to_green import CALC_FILES
from tests.support.pr_repo import edit, scene, session

pytestmark = pytest.mark.timeout(150)


async def test_a_burst_scales_the_agents_up_and_an_empty_queue_down(tmp_path, nats_url, ns, nc):
    # each task's coder works a few seconds: long enough for a queue to build behind one agent
    work = {"run": {"command": "sleep 4", "timeout": 30}}
    scripts = {n: {"attempts": [session(f"helper {n}", work, edit("calc.py", "    return a + b\n",
                                                                   f"    return a + b\n\n\nN{n} = {n}\n"))]}
               for n in (1, 2, 3)}
    async with scene(tmp_path, nats_url, ns, "acme/calc", CALC_FILES, scripts, agents=0,
                     specialties=("backend",), autoscale=(0, 2)) as s:
        autoscaler = s.cluster.autoscaler
        assert autoscaler is not None and s.cluster.agents == []
        autoscaler.policy = autoscaler.policy.__class__(**{
            **{f: getattr(autoscaler.policy, f) for f in autoscaler.policy.__struct_fields__},
            "cooldown_up": 0.5, "cooldown_down": 1.0})  # a test's patience, not production's
        autoscaler.interval, autoscaler.settle = 0.3, 5.0
        for n in (1, 2, 3):
            await s.open_issue(n, f"Helper constant {n}", labels=("backend",))  # no file named: no lease
        await eventually(lambda: len(s.cluster.agents) == 2, timeout=60)  # up to the maximum, no more
        for n in (1, 2, 3):
            await s.until_status(n, "review", timeout=120)

        def kinds(name: str) -> list:
            return [d for d in autoscaler.decisions if type(d).__name__ == name]

        # down to the minimum (0); a decision is recorded once its agent has stopped
        await eventually(lambda: not s.cluster.agents and len(kinds("ClusterScaledDown")) == 2, timeout=90)
        assert len(kinds("ClusterScaledUp")) == 2 and all(d.reason for d in autoscaler.decisions)
        assert all(d.outcome == "done" for d in autoscaler.decisions)

        async def on_the_log() -> bool:  # every decision on the log, with its reason
            return (await nc.jetstream().stream_info(cluster_stream(ns))).state.messages == 4

        await eventually(on_the_log, timeout=10)
