"""Demand per specialty, pure (no NATS): which hand-built task states need an agent slot —
waiting for one (queued and startable: the autoscaler's definition) or holding one — under
which specialty, with which body; and the names the demand board, its consumers and the
coordinator's permissions are made of."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from events.agent_state import AgentState
from events.errors import ConfigError
from events.subjects import Namespace
from events.task import SPECIALTIES, IssueRef
from events.task_state import TASK_STATUSES, WITH_AGENT, TaskState
from infra.adapters.nats.permissions import ROLES, permissions_for
from infra.adapters.nats.provisioning import demand_consumer, demand_consumer_configs, stream_configs
from projections.autoscale import loads
from projections.demand import (
    Demand,
    counts,
    demand,
    demand_specialty,
    holder_specialty,
    next_change,
    waiting,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def task(n: int, specialty="backend", status="queued", waited=10.0, **kw) -> TaskState:
    at = NOW - timedelta(seconds=waited)
    return TaskState(task_id=f"acme_app-{n}", status=status, version=1, created_at=at, updated_at=at,
                     issue=IssueRef(source="local", repo="acme/app", number=n, title=f"issue {n}"),
                     specialty=specialty, **kw)


def tasks_of(*ts: TaskState) -> dict[str, TaskState]:
    return {t.task_id: t for t in ts}


def agent(agent_id: str, *specialties: str) -> AgentState:
    return AgentState(agent_id=agent_id, status="busy", version=1, specialties=specialties or ("backend",))


AGENTS = {a.agent_id: a for a in (agent("b1", "backend"), agent("g1", "general"), agent("bt", "backend", "testing"))}


def ids(d: dict) -> list[str]:
    return sorted(tid for _, tid in d)


# -- what waits ----------------------------------------------------------------------------
def test_a_queued_startable_task_waits_with_its_specialty_and_since():
    t = task(1, waited=42)
    assert waiting(tasks_of(t), NOW) == demand(tasks_of(t), {}, NOW) == {("backend", "acme_app-1"): Demand(
        task_id="acme_app-1", specialty="backend", since=NOW - timedelta(seconds=42))}


@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - {"queued"}))
def test_only_a_queued_task_waits_and_only_one_with_an_agent_holds_a_slot(status):
    """Assigned, in progress, testing: a slot of the holder's specialty (its pod is busy).
    Cancelled, completed, failed, an open pull request, still being analysed: no agent
    is needed for it, now or by it."""
    t = task(1, status=status, agent_id="b1" if status in WITH_AGENT else None)
    assert waiting(tasks_of(t), NOW) == {}
    expected = [("backend", "acme_app-1")] if status in WITH_AGENT else []
    assert list(demand(tasks_of(t), AGENTS, NOW)) == expected


def test_a_task_blocked_by_a_dependency_waits_until_it_completes():
    dep = task(2, status="in_progress", agent_id="b1")
    blocked = task(1, dependencies=("acme_app-2",))
    assert ids(demand(tasks_of(blocked, dep), AGENTS, NOW)) == ["acme_app-2"]  # only the dependency, held
    assert waiting(tasks_of(task(1, dependencies=("acme_app-404",))), NOW) == {}  # unknown: not completed
    done = msgspec.structs.replace(dep, status="completed", agent_id=None)
    assert ids(demand(tasks_of(blocked, done), AGENTS, NOW)) == ["acme_app-1"]


def test_a_task_in_its_retry_backoff_is_demand_once_the_backoff_ends():
    later = task(1, attempt=2, not_before=NOW + timedelta(seconds=30))
    sooner = task(2, attempt=2, not_before=NOW + timedelta(seconds=5))
    ts = tasks_of(later, sooner, task(3))
    assert ids(waiting(ts, NOW)) == ["acme_app-3"]
    assert next_change(ts, NOW) == 5.0  # the earliest end of a backoff: when to look again
    assert ids(waiting(ts, NOW + timedelta(seconds=5))) == ["acme_app-2", "acme_app-3"]
    assert ids(waiting(ts, NOW + timedelta(seconds=31))) == ["acme_app-1", "acme_app-2", "acme_app-3"]
    assert next_change(ts, NOW + timedelta(seconds=31)) is None  # only an event can change it now
    assert next_change(tasks_of(task(4, status="failed", not_before=NOW + timedelta(seconds=9))), NOW) is None


def test_a_task_behind_a_file_lease_waits_for_the_holder_not_for_an_agent():
    holder = task(1, status="in_progress", agent_id="b1", paths=("app/models.py",))
    blocked = task(2, paths=("app/models.py",))
    elsewhere = task(3, paths=("docs/index.md",))
    assert ids(demand(tasks_of(holder, blocked, elsewhere), AGENTS, NOW)) == ["acme_app-1", "acme_app-3"]


def test_the_read_models_indexes_give_the_same_demand():
    ts = tasks_of(task(1), task(2, status="assigned", agent_id="b1"), task(3, specialty="frontend"),
                  task(4, dependencies=("acme_app-2",)), task(5, status="checking"))
    indexed = demand(ts, AGENTS, NOW, queued=["acme_app-1", "acme_app-3", "acme_app-4"],
                     holder={"acme_app-2": "b1"})
    assert indexed == demand(ts, AGENTS, NOW) and ids(indexed) == ["acme_app-1", "acme_app-2", "acme_app-3"]
    assert demand(ts, AGENTS, NOW, queued=["acme_app-404"], holder={"acme_app-405": "b1"}) == {}  # ids it lacks


# -- under which specialty -------------------------------------------------------------------
@pytest.mark.parametrize("specialty", SPECIALTIES)
def test_a_waiting_task_is_the_demand_of_its_own_specialty(specialty):
    assert list(demand(tasks_of(task(1, specialty=specialty)), AGENTS, NOW)) == [(specialty, "acme_app-1")]


def test_a_specialty_the_cluster_has_no_agents_of_is_generals_demand():
    """The scheduler gives a task an agent of its specialty or a general one: for a
    specialty no agent has, only a general agent would do."""
    odd = task(1, specialty="quantum")
    assert demand_specialty(odd) == "general"
    assert list(demand(tasks_of(odd), AGENTS, NOW)) == [("general", "acme_app-1")]


def test_a_held_task_takes_a_slot_of_its_holders_specialty():
    """A backend task a general agent works on keeps a general pod busy, not a backend one."""
    def held_by(agent_id: str, specialty: str = "backend") -> list:
        t = task(1, specialty=specialty, status="in_progress", agent_id=agent_id)
        return list(demand(tasks_of(t), AGENTS, NOW))

    assert held_by("b1") == [("backend", "acme_app-1")]
    assert held_by("g1") == [("general", "acme_app-1")]
    assert held_by("bt", "testing") == [("testing", "acme_app-1")]  # the agent has the task's specialty
    assert held_by("bt", "frontend") == [("backend", "acme_app-1")]  # else its first
    assert held_by("unknown") == [("backend", "acme_app-1")]  # an agent the view does not know: the task's
    assert holder_specialty(task(1, specialty="quantum"), None) == "general"


def test_counts_cover_every_specialty():
    ts = tasks_of(task(1), task(2), task(3, specialty="frontend"),
                  task(4, specialty="frontend", status="assigned", agent_id="g1"),
                  task(5, specialty="frontend", status="review"))
    c = counts(demand(ts, AGENTS, NOW))
    assert c == {sp: {"backend": 2, "frontend": 1, "general": 1}.get(sp, 0) for sp in SPECIALTIES}


def test_what_waits_is_the_autoscalers_queue_depth():
    """One definition: KEDA (the demand board) and `ccc up --autoscale` see the same queues."""
    ts = tasks_of(
        task(1), task(2, waited=90), task(3, specialty="frontend"), task(4, specialty="testing"),
        task(5, dependencies=("acme_app-9",)), task(6, not_before=NOW + timedelta(seconds=30)),
        task(7, status="in_progress", agent_id="b1", paths=("a.py",)), task(8, paths=("a.py",)),
        task(9, status="cancelled"), task(10, status="assigned", agent_id="b2", specialty="frontend"),
    )
    view = loads(ts, {}, NOW, SPECIALTIES)
    assert counts(waiting(ts, NOW)) == {sp: view[sp].queued for sp in SPECIALTIES}


def test_the_body_is_small_json_with_the_task_its_specialty_and_since():
    body = msgspec.json.encode(Demand(task_id="acme_app-1", specialty="backend", since=NOW))
    assert msgspec.json.decode(body) == {"task_id": "acme_app-1", "specialty": "backend",
                                         "since": "2026-01-01T12:00:00Z"}
    assert len(body) < 128


# -- the board's names ---------------------------------------------------------------------
def test_the_demand_stream_one_message_per_task_and_one_consumer_per_specialty():
    ns = Namespace("ccc")
    assert ns.demand_stream == "CCC_DEMAND"
    assert ns.demand_subject("backend", "acme_app-1") == "ccc.demand.backend.acme_app-1"
    (config,) = [c for c in stream_configs(ns) if c.name == ns.demand_stream]
    assert config.subjects == ["ccc.demand.>"] and config.max_msgs_per_subject == 1
    others = [s for c in stream_configs(ns) if c.name != ns.demand_stream for s in c.subjects]
    assert not [s for s in others if s.startswith("ccc.demand")]
    consumers = demand_consumer_configs(ns)
    assert [c.durable_name for c in consumers] == [f"demand-{sp}" for sp in SPECIALTIES]
    for sp, c in zip(SPECIALTIES, consumers):
        assert c.name == c.durable_name == demand_consumer(sp)
        assert c.filter_subject == f"ccc.demand.{sp}.>" == ns.demand_filter(sp)
    with pytest.raises(ConfigError, match="unknown specialty"):
        demand_consumer("quantum")


def test_only_the_coordinator_keeps_the_board_and_it_may_purge_nothing_else():
    ns = Namespace("prod")
    p = permissions_for("coordinator", ns)
    assert "prod.demand.>" in p.publish_allow
    assert [s for s in p.publish_allow if ".PURGE." in s] == ["$JS.API.STREAM.PURGE.PROD_DEMAND"]
    assert "$JS.API.STREAM.PURGE.>" not in p.publish_deny  # (a deny would win over the allow)
    for stream in ("PROD_EVENTS", "PROD_ISSUES", "PROD_HEARTBEATS", "PROD_DLQ", "PROD_CLUSTER"):
        assert f"$JS.API.STREAM.PURGE.{stream}" in p.publish_deny
    assert "$JS.API.STREAM.DELETE.>" in p.publish_deny and "$JS.API.STREAM.MSG.DELETE.>" in p.publish_deny
    for role in ROLES:
        if role in ("admin", "coordinator"):
            continue
        q = permissions_for(role, ns, "a1" if role == "agent" else None)
        assert "$JS.API.STREAM.PURGE.>" in q.publish_deny, role
        assert not [s for s in q.publish_allow if s.startswith("prod.demand") or ".PURGE." in s
                    or s in ("prod.>", ">")], role
