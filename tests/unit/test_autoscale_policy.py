"""The autoscaling policy, pure (no NATS): bottleneck specialty, target load, oldest wait,
min/max, cool-downs, which agent to drain; and the cluster events, their subject, stream
and permission."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from events.agent_state import AgentState
from events.cluster import (
    ClusterScaledDown,
    ClusterScaledUp,
    cluster_stream,
    decode_cluster_event,
    encode_cluster_event,
)
from events.errors import BadEventError, ConfigError
from events.subjects import Namespace
from events.task import IssueRef
from events.task_state import TaskState
from infra.adapters.nats.permissions import permissions_for
from infra.adapters.nats.provisioning import stream_configs
from projections.autoscale import AutoscalePolicy, Managed, decide, loads, parse_autoscale

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = AutoscalePolicy(min_agents=0, max_agents=4, target_load=1.0, max_wait=60, cooldown_up=5,
                         cooldown_down=30, specialties=("backend",))


def task(n: int, specialty="backend", status="queued", waited=10.0, agent=None, **kw) -> TaskState:
    at = NOW - timedelta(seconds=waited)
    return TaskState(task_id=f"acme_app-{n}", status=status, version=1, created_at=at, updated_at=at,
                     issue=IssueRef(source="local", repo="acme/app", number=n, title=f"issue {n}"),
                     specialty=specialty, agent_id=agent, **kw)


def agent(agent_id: str, *specialties: str, status="idle", capacity=1, active=()) -> AgentState:
    return AgentState(agent_id=agent_id, status=status, version=1, specialties=specialties or ("backend",),
                      capacity=capacity, active_tasks=tuple(active))


def tasks_of(*ts: TaskState) -> dict[str, TaskState]:
    return {t.task_id: t for t in ts}


def agents_of(*ags: AgentState) -> dict[str, AgentState]:
    return {a.agent_id: a for a in ags}


def managed(*ags: AgentState) -> list[Managed]:
    return [Managed(agent_id=a.agent_id, specialties=a.specialties) for a in ags]


# -- loads ---------------------------------------------------------------------------------
def test_loads_count_only_what_an_agent_could_start_now():
    ts = tasks_of(
        task(1, waited=90), task(2),
        task(3, dependencies=("acme_app-9",)),  # waits for a dependency
        task(4, not_before=NOW + timedelta(seconds=30)),  # retry backoff
        task(5, specialty="frontend", waited=5),
        task(6, status="in_progress", agent="b1"),
    )
    view = loads(ts, agents_of(agent("b1", status="busy", active=("acme_app-6",)), agent("g1", "general")), NOW)
    assert view["backend"].queued == 2 and view["backend"].oldest_wait == 90
    assert view["backend"].agents == 2 and view["backend"].slots == 2 and view["backend"].free == 1  # g1 is free
    assert view["frontend"].queued == 1 and view["frontend"].agents == 1  # the general agent
    assert view["general"].queued == 0


def test_a_task_behind_a_file_lease_is_not_demand():
    ts = tasks_of(task(1, status="in_progress", agent="b1", paths=("app.py",)), task(2, paths=("app.py",)))
    view = loads(ts, agents_of(agent("b1", status="busy", active=("acme_app-1",))), NOW)
    assert view["backend"].queued == 0


# -- scaling up ----------------------------------------------------------------------------
def test_scale_up_for_the_bottleneck_specialty():
    b1 = agent("b1", status="busy", active=("acme_app-1",))
    f1 = agent("f1", "frontend", status="busy", active=("acme_app-10",))
    ts = tasks_of(task(1, status="in_progress", agent="b1"), task(2), task(3),
                  task(10, "frontend", status="in_progress", agent="f1"), task(11, "frontend"), task(12, "frontend"),
                  task(13, "frontend"))
    d = decide(ts, agents_of(b1, f1), managed(b1, f1), POLICY, NOW)
    assert d is not None and d.action == "scaled_up" and d.specialty == "frontend"
    assert d.queue_depth == 3 and d.agents_before == 2 and d.agents_after == 3
    assert "3 frontend task(s) queued for 1 busy slot(s)" in d.reason


def test_no_agent_for_a_specialty_is_a_bottleneck_at_once():
    d = decide(tasks_of(task(1, "documentation")), {}, [], POLICY, NOW)
    assert d is not None and d.specialty == "documentation" and "no agent online can take them" in d.reason


def test_a_free_capable_slot_means_no_scale_up():
    ts = tasks_of(task(1), task(2), task(3))
    assert decide(ts, agents_of(agent("b1", capacity=1)), managed(agent("b1")), POLICY, NOW) is None


def test_target_load_and_oldest_wait():
    b1 = agent("b1", status="busy", active=("acme_app-1",), capacity=2)
    b1 = msgspec.structs.replace(b1, active_tasks=("acme_app-1", "acme_app-2"))
    running = [task(1, status="in_progress", agent="b1"), task(2, status="in_progress", agent="b1")]
    one_queued = tasks_of(*running, task(3, waited=10))
    # 1 queued for 2 slots: 0.5 per slot, under the target of 1, and not waiting long: no
    assert decide(one_queued, agents_of(b1), managed(b1), POLICY, NOW) is None
    # the same, but it has waited past max_wait: up
    old = tasks_of(*running, task(3, waited=61))
    d = decide(old, agents_of(b1), managed(b1), POLICY, NOW)
    assert d is not None and "waited 61s > 60s" in d.reason
    # a lower target load makes the same queue a bottleneck
    d = decide(one_queued, agents_of(b1), managed(b1), msgspec.structs.replace(POLICY, target_load=0.25), NOW)
    assert d is not None and d.action == "scaled_up"


def test_max_and_cooldown_bound_scaling_up():
    ts = tasks_of(task(1), task(2))
    assert decide(ts, {}, [Managed(agent_id=f"a{i}", specialties=("documentation",)) for i in range(4)], POLICY, NOW) is None
    assert decide(ts, {}, [], POLICY, NOW, last_up=NOW - timedelta(seconds=4)) is None
    assert decide(ts, {}, [], POLICY, NOW, last_up=NOW - timedelta(seconds=5)) is not None


def test_below_the_minimum_starts_an_agent_even_with_nothing_queued():
    policy = msgspec.structs.replace(POLICY, min_agents=2, specialties=("frontend", "backend"))
    d = decide({}, {}, [], policy, NOW)
    assert d is not None and d.specialty == "frontend" and "below the minimum of 2" in d.reason
    d = decide(tasks_of(task(1, "documentation")), {}, [], policy, NOW)
    assert d.specialty == "documentation"  # the busiest specialty when something is queued


# -- scaling down --------------------------------------------------------------------------
def test_scale_down_drains_an_idle_agent_of_the_least_needed_specialty():
    b1, b2 = agent("auto-backend-9"), agent("auto-backend-10")
    f1 = agent("auto-frontend-1", "frontend", status="busy", active=("acme_app-1",))
    d1 = agent("auto-documentation-1", "documentation")
    ts = tasks_of(task(1, "frontend", status="in_progress", agent="auto-frontend-1"))
    fleet = agents_of(b1, b2, f1, d1)
    d = decide(ts, fleet, managed(b1, b2, f1, d1), POLICY, NOW)
    # backend has two idle agents (the most spare), the newest goes first; never the busy one
    assert d is not None and d.action == "scaled_down" and d.agent_id == "auto-backend-10"
    assert d.agents_before == 4 and d.agents_after == 3 and d.queue_depth == 0
    assert "idle and nothing queued for backend" in d.reason


def test_never_scale_down_a_busy_agent_one_of_a_queued_specialty_or_below_the_minimum():
    b1 = agent("b1")
    # its specialty has work queued (behind a busy colleague's slot): keep it
    busy = agent("b2", status="busy", active=("acme_app-1",))
    ts = tasks_of(task(1, status="in_progress", agent="b2"), task(2))
    assert decide(ts, agents_of(b1, busy), managed(b1), msgspec.structs.replace(POLICY, max_agents=1), NOW) is None
    # the log says it holds a task its own aggregate has not shown yet: keep it
    ts = tasks_of(task(3, status="assigned", agent="b1"))
    assert decide(ts, agents_of(b1), managed(b1), POLICY, NOW) is None
    # a general agent serves every queue
    g = agent("g1", "general")
    assert decide(tasks_of(task(4, "documentation")), agents_of(g), managed(g), msgspec.structs.replace(POLICY, max_agents=1),
                  NOW) is None
    # at the minimum
    assert decide({}, agents_of(b1), managed(b1), msgspec.structs.replace(POLICY, min_agents=1), NOW) is None
    # draining already (maintenance) or not registered yet: not a candidate
    assert decide({}, agents_of(agent("b1", status="maintenance")), managed(b1), POLICY, NOW) is None
    assert decide({}, {}, managed(b1), POLICY, NOW) is None


def test_cooldown_down_counts_from_the_last_decision_of_either_kind():
    b1 = agent("b1")
    for last in ({"last_up": NOW - timedelta(seconds=29)}, {"last_down": NOW - timedelta(seconds=29)}):
        assert decide({}, agents_of(b1), managed(b1), POLICY, NOW, **last) is None
    d = decide({}, agents_of(b1), managed(b1), POLICY, NOW, last_up=NOW - timedelta(seconds=31))
    assert d is not None and d.agent_id == "b1"


def test_the_same_views_give_the_same_decision():
    ts = tasks_of(task(1), task(2, "frontend"), task(3, "documentation", waited=100))
    a = [decide(ts, {}, [], POLICY, NOW) for _ in range(3)]
    assert a[0] == a[1] == a[2] and a[0].specialty == "documentation"  # equal pressure: the longest wait


# -- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("text,bounds", [("1:8", (1, 8)), (" 0:1 ", (0, 1)), ("3:3", (3, 3))])
def test_parse_autoscale(text, bounds):
    assert parse_autoscale(text) == bounds


@pytest.mark.parametrize("text,message", [
    ("8", "use MIN:MAX"), ("a:b", "use MIN:MAX"), ("", "use MIN:MAX"), ("1:2:3", "use MIN:MAX"),
    ("-1:3", "minimum must be >= 0"), ("4:2", "maximum must be >= 1 and >= the minimum"),
    ("0:0", "maximum must be >= 1"),
])
def test_parse_autoscale_refuses_bad_input(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_autoscale(text)


@pytest.mark.parametrize("change,message", [
    ({"target_load": 0}, "target load must be > 0"), ({"target_load": float("nan")}, "target load"),
    ({"cooldown_up": -1}, "cooldown up must be >= 0"), ({"max_wait": float("inf")}, "max wait"),
    ({"specialties": ("cobol",)}, "unknown specialties cobol"), ({"specialties": ()}, "unknown specialties"),
])
def test_bad_policies_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        msgspec.structs.replace(POLICY, **change).validate()


# -- the events, their stream and who may write them ---------------------------------------
def test_cluster_events_round_trip_on_their_subject():
    e = ClusterScaledUp(event_id="x", occurred_at=NOW, actor="autoscaler", specialty="backend", reason="r",
                        queue_depth=3, oldest_wait=1.5, agents_before=1, agents_after=2, agent_id="auto-backend-2")
    assert e.rel_subject == "cluster.scaled_up"
    data = encode_cluster_event(e)
    assert b'"type":"cluster.scaled_up"' in data
    assert decode_cluster_event("cluster.scaled_up", data) == e
    with pytest.raises(BadEventError, match="subject mismatch"):
        decode_cluster_event("cluster.scaled_down", data)
    with pytest.raises(BadEventError):
        decode_cluster_event("cluster.scaled_up", b'{"type":"cluster.exploded"}')
    down = msgspec.structs.replace(ClusterScaledDown(**msgspec.structs.asdict(e)), agents_after=0)
    assert down.rel_subject == "cluster.scaled_down"


def test_the_cluster_stream_and_the_coordinators_permission():
    ns = Namespace("prod")
    configs = {c.name: c for c in stream_configs(ns)}
    assert configs[cluster_stream(ns)].subjects == ["prod.cluster.>"]
    # the event store's stream stays task and agent aggregates only
    assert "prod.cluster.>" not in configs[ns.events_stream].subjects
    assert "prod.cluster.>" in permissions_for("coordinator", ns).publish_allow
    for role in ("agent", "webhook", "cli", "status", "ci"):
        p = permissions_for(role, ns, "a1" if role == "agent" else None)
        assert not any(s.startswith("prod.cluster") or s in ("prod.>", ">") for s in p.publish_allow), role
