"""The scheduler's pure decision, ``plan_assignments``: which queued task goes to which
agent, now. Views are built directly (no log): the function only reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.scheduling import blocked_by, can_take, eligible_tasks, held_by_agent, plan_assignments
from events.agent_state import ACCEPTING, AGENT_STATUSES, AgentState
from events.task import PRIORITIES, SECURITY_LEVELS, SPECIALTIES, IssueRef
from events.task_state import TASK_STATUSES, WITH_AGENT, TaskState
from projections.fairness import FairnessPolicy

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NO_AGING = FairnessPolicy(aging=None)


def task(
    task_id: str,
    *,
    status: str = "queued",
    specialty: str = "general",
    priority: str = "normal",
    security: str = "public",
    deps: tuple[str, ...] = (),
    age: int = 0,
    agent: str | None = None,
    not_before: datetime | None = None,
) -> TaskState:
    """A task in the view; ``age`` minutes old (older tasks were created earlier)."""
    created = NOW - timedelta(minutes=age)
    return TaskState(
        task_id=task_id, status=status, version=3, created_at=created, updated_at=created,
        issue=IssueRef(source="local", repo="acme/app", number=1, title=task_id),
        specialty=specialty, priority=priority, security_level=security, dependencies=deps,
        agent_id=agent, not_before=not_before,
    )


def agent(
    agent_id: str, *specialties: str, capacity: int = 1, clearance: str = "internal", status: str = "idle"
) -> AgentState:
    return AgentState(agent_id=agent_id, status=status, version=1, specialties=specialties or ("general",),
                      capacity=capacity, clearance=clearance)


def plan(
    tasks: list[TaskState], agents: list[AgentState], now: datetime = NOW, **kw
) -> list[tuple[str, str]]:
    return plan_assignments({t.task_id: t for t in tasks}, {a.agent_id: a for a in agents}, now, **kw)


# -- capability ------------------------------------------------------------------------
def test_a_task_goes_to_an_agent_of_its_specialty() -> None:
    tasks = [task("fe-1", specialty="frontend"), task("be-1", specialty="backend")]
    agents = [agent("fe", "frontend"), agent("be", "backend")]
    assert sorted(plan(tasks, agents)) == [("be-1", "be"), ("fe-1", "fe")]


def test_a_general_agent_takes_any_specialty_but_specialists_come_first() -> None:
    assert plan([task("db-1", specialty="database")], [agent("any", "general")]) == [("db-1", "any")]
    # "any" sorts before "zdb": the specialist wins on specialty, not on id or load
    busy_specialist = agent("zdb", "database", capacity=4)
    held = {"zdb": 3}
    assert plan([task("db-1", specialty="database")], [agent("any", "general"), busy_specialist],
                held=held) == [("db-1", "zdb")]


def test_no_matching_specialty_waits_in_the_queue() -> None:
    assert plan([task("db-1", specialty="database")], [agent("fe", "frontend", capacity=5)]) == []


def test_a_general_task_needs_a_general_agent() -> None:
    # "general" is a specialty like any other on the task side: a frontend-only agent
    # does not take it; an agent listing general does
    assert plan([task("g-1")], [agent("fe", "frontend")]) == []
    both = [agent("fe", "frontend"), agent("gen", "frontend", "general")]
    assert plan([task("g-1")], both) == [("g-1", "gen")]


# -- clearance ---------------------------------------------------------------------------
@pytest.mark.parametrize(("clearance", "security", "allowed"), [
    ("public", "public", True),
    ("public", "internal", False),
    ("internal", "internal", True),
    ("internal", "confidential", False),
    ("confidential", "confidential", True),
    ("confidential", "restricted", False),
    ("restricted", "restricted", True),
    ("restricted", "public", True),
])
def test_clearance_must_reach_the_security_level(clearance: str, security: str, allowed: bool) -> None:
    result = plan([task("t-1", security=security)], [agent("a", clearance=clearance)])
    assert result == ([("t-1", "a")] if allowed else [])


def test_a_confidential_task_skips_the_uncleared_agent_for_a_cleared_one() -> None:
    agents = [agent("a-low", "security", clearance="internal"),
              agent("b-high", "security", clearance="confidential")]
    assert plan([task("s-1", specialty="security", security="confidential")], agents) == [("s-1", "b-high")]


# -- availability, capacity and load --------------------------------------------------------
@pytest.mark.parametrize("status", sorted(set(AGENT_STATUSES) - ACCEPTING))
def test_only_idle_and_busy_agents_take_work(status: str) -> None:
    assert plan([task("t-1")], [agent("a", status=status, capacity=3)]) == []


def test_capacity_is_never_exceeded_and_the_rest_waits() -> None:
    tasks = [task(f"t-{i}", age=10 - i) for i in range(5)]
    result = plan(tasks, [agent("a", capacity=2), agent("b", capacity=1)])
    assert len(result) == 3
    assert sum(1 for _, a in result if a == "a") == 2 and sum(1 for _, a in result if a == "b") == 1


def test_tasks_held_in_the_task_view_count_against_capacity() -> None:
    tasks = [task("old-1", status="in_progress", agent="a"), task("old-2", status="testing", agent="a"),
             task("new-1")]
    assert plan(tasks, [agent("a", capacity=2)]) == []
    assert plan(tasks, [agent("a", capacity=3)]) == [("new-1", "a")]
    # finished work holds no slot
    tasks[0] = task("old-1", status="review", agent="a")
    assert plan(tasks, [agent("a", capacity=2)]) == [("new-1", "a")]


def test_the_least_loaded_agent_gets_the_task_relative_to_its_capacity() -> None:
    tasks = [task("held-1", status="assigned", agent="a-small"),
             task("held-2", status="assigned", agent="z-big"), task("new-1")]
    # both hold one task: a-small is half busy, z-big a quarter, so z-big wins despite its id
    assert plan(tasks, [agent("a-small", capacity=2), agent("z-big", capacity=4)]) == [("new-1", "z-big")]


def test_ties_go_to_the_lowest_agent_id_and_load_spreads() -> None:
    tasks = [task(f"t-{i}", age=10 - i) for i in range(4)]
    result = plan(tasks, [agent("b", capacity=2), agent("a", capacity=2)])
    assert result == [("t-0", "a"), ("t-1", "b"), ("t-2", "a"), ("t-3", "b")]


# -- order -----------------------------------------------------------------------------------
def test_priority_first_then_age() -> None:
    tasks = [task("low-old", priority="low", age=50), task("normal-new", priority="normal", age=1),
             task("normal-old", priority="normal", age=40), task("urgent-new", priority="urgent", age=0),
             task("high-mid", priority="high", age=20)]
    assert [t.task_id for t in eligible_tasks({t.task_id: t for t in tasks}, NOW, policy=NO_AGING)] == [
        "urgent-new", "high-mid", "normal-old", "normal-new", "low-old"]
    # one slot: the urgent task takes it, whatever its age
    assert plan(tasks, [agent("a")], policy=NO_AGING) == [("urgent-new", "a")]
    # with aging (one level per 5 min by default) 50 minutes of waiting outrank priority:
    # low-old is 0 + 10 levels, normal-old 1 + 8, high-mid 2 + 4, urgent-new 3
    assert [t.task_id for t in eligible_tasks({t.task_id: t for t in tasks}, NOW)] == [
        "low-old", "normal-old", "high-mid", "urgent-new", "normal-new"]
    assert plan(tasks, [agent("a")]) == [("low-old", "a")]


def test_equal_priority_and_age_orders_by_id() -> None:
    tasks = [task("b"), task("a"), task("c")]
    assert plan(tasks, [agent("x", capacity=1)]) == [("a", "x")]


def test_a_task_nobody_can_take_does_not_block_the_next_one() -> None:
    tasks = [task("urgent-db", specialty="database", priority="urgent"),
             task("normal-fe", specialty="frontend")]
    assert plan(tasks, [agent("fe", "frontend")]) == [("normal-fe", "fe")]


# -- eligibility -----------------------------------------------------------------------------
@pytest.mark.parametrize("status", sorted(set(TASK_STATUSES) - {"queued"}))
def test_only_queued_tasks_are_assigned(status: str) -> None:
    assert plan([task("t-1", status=status)], [agent("a", capacity=2)]) == []


def test_retry_backoff_is_respected() -> None:
    waiting = task("t-1", not_before=NOW + timedelta(seconds=30))
    assert plan([waiting], [agent("a")]) == []
    assert plan([waiting], [agent("a")], now=NOW + timedelta(seconds=30)) == [("t-1", "a")]


def test_dependencies_must_be_completed() -> None:
    dep = task("dep", status="review", agent="other")
    child = task("child", deps=("dep",))
    assert blocked_by(child, {"dep": dep}) == ["dep"]
    assert plan([dep, child], [agent("a")]) == []
    done = task("dep", status="completed")
    assert plan([done, child], [agent("a")]) == [("child", "a")]
    # an unknown dependency counts as not completed; a cancelled one never completes
    assert plan([task("child", deps=("nowhere",))], [agent("a")]) == []
    assert plan([task("dep", status="cancelled"), child], [agent("a")]) == []


def test_a_task_and_its_dependency_are_not_both_assigned_in_one_pass() -> None:
    tasks = [task("dep"), task("child", deps=("dep",), priority="urgent")]
    assert plan(tasks, [agent("a", capacity=5)]) == [("dep", "a")]


# -- reservations: the indexes the coordinator passes in -------------------------------------
def test_held_overrides_the_task_view_with_reservations() -> None:
    tasks = [task("t-1"), task("t-2", age=1)]
    # "a" holds a reservation the task view does not show yet: its only slot is taken
    assert plan(tasks, [agent("a"), agent("b")], held={"a": 1}) == [("t-2", "b")]
    assert plan(tasks, [agent("a")], held={"a": 1}) == []


def test_held_is_not_mutated() -> None:
    held = {"a": 0}
    plan([task("t-1")], [agent("a", capacity=2)], held=held)
    assert held == {"a": 0}


def test_queued_limits_the_candidates_to_the_given_tasks() -> None:
    tasks = [task("reserved", age=9), task("free", age=1)]
    # the reserved task is left out of the pass (the intake assigned it already)
    assert plan(tasks, [agent("a", capacity=2)], queued=["free"]) == [("free", "a")]
    assert plan(tasks, [agent("a", capacity=2)], queued=[]) == []


def test_held_by_agent_counts_only_tasks_with_an_agent() -> None:
    tasks = {t.task_id: t for t in [
        task("1", status="assigned", agent="a"), task("2", status="in_progress", agent="a"),
        task("3", status="testing", agent="b"), task("4", status="review", agent="b"),
        task("5", status="failed", agent="b"), task("6")]}
    assert held_by_agent(tasks) == {"a": 2, "b": 1}


def test_nothing_to_do_without_agents_or_tasks() -> None:
    assert plan([task("t-1")], []) == []
    assert plan([], [agent("a")]) == []


# -- properties -------------------------------------------------------------------------------
_ids = st.sampled_from([f"t{i}" for i in range(12)])
# skewed towards what can be assigned (queued tasks, accepting agents), so most examples
# produce a plan, while every status, level and specialty still shows up
_task_status = st.sampled_from(["queued"] * len(TASK_STATUSES) + list(TASK_STATUSES))
_agent_status = st.sampled_from(sorted(ACCEPTING) * 3 + list(AGENT_STATUSES))
_security = st.sampled_from(["public"] * 3 + list(SECURITY_LEVELS))
_clearance = st.sampled_from(list(SECURITY_LEVELS) + ["restricted"] * 2)


@st.composite
def views(draw) -> tuple[dict[str, TaskState], dict[str, AgentState], dict[str, int] | None]:
    agents: dict[str, AgentState] = {}
    for i in range(draw(st.integers(1, 5))):  # (no agents, no tasks: unit tests above)
        aid = f"a{i}"
        agents[aid] = agent(
            aid, *dict.fromkeys(draw(st.lists(st.sampled_from(SPECIALTIES), min_size=1, max_size=4))
                                + (["general"] if draw(st.booleans()) else [])),
            capacity=draw(st.integers(1, 3)), clearance=draw(_clearance),
            status=draw(_agent_status))
    tasks: dict[str, TaskState] = {}
    for tid in draw(st.lists(_ids, min_size=1, max_size=12, unique=True)):
        status = draw(_task_status)
        holder = draw(st.sampled_from(sorted(agents))) if agents and status in WITH_AGENT else None
        deps = draw(st.lists(_ids.filter(lambda d, tid=tid: d != tid), max_size=2, unique=True))
        tasks[tid] = task(
            tid, status=status, specialty=draw(st.sampled_from(SPECIALTIES)),
            priority=draw(st.sampled_from(PRIORITIES)), security=draw(_security),
            deps=tuple(deps) if draw(st.integers(0, 3)) == 0 else (),
            age=draw(st.integers(0, 100)), agent=holder,
            not_before=(NOW + timedelta(seconds=draw(st.integers(-60, 60)))
                        if draw(st.integers(0, 3)) == 0 else None))
    # the coordinator passes its own index sometimes (with reservations on top)
    held = None
    if draw(st.booleans()):
        held = held_by_agent(tasks)
        for aid in agents:
            held[aid] = held.get(aid, 0) + draw(st.integers(0, 1))
    return tasks, agents, held


@settings(max_examples=300, deadline=None)
@given(views())
def test_property_every_assignment_is_eligible_and_no_agent_goes_over_capacity(view) -> None:
    tasks, agents, held = view
    result = plan_assignments(tasks, agents, NOW, held=held)
    note_event(f"{min(len(result), 3)}{'+' if len(result) > 3 else ''} assigned")  # --hypothesis-show-statistics
    assigned = [t for t, _ in result]
    assert len(assigned) == len(set(assigned)), "a task assigned twice"
    load = dict(held_by_agent(tasks) if held is None else held)
    ready = {t.task_id for t in eligible_tasks(tasks, NOW)}
    for task_id, agent_id in result:
        t, a = tasks[task_id], agents[agent_id]
        assert task_id in ready and t.status == "queued" and not blocked_by(t, tasks)
        assert t.not_before is None or t.not_before <= NOW
        assert can_take(a, t)
        load[agent_id] = load.get(agent_id, 0) + 1
    for agent_id in {a for _, a in result}:
        assert load[agent_id] <= agents[agent_id].capacity


@settings(max_examples=300, deadline=None)
@given(views())
def test_property_no_assignable_task_is_left_while_a_capable_agent_has_a_free_slot(view) -> None:
    """The plan is maximal: after it, no eligible unassigned task fits a free slot."""
    tasks, agents, held = view
    result = plan_assignments(tasks, agents, NOW, held=held)
    load = dict(held_by_agent(tasks) if held is None else held)
    for _, agent_id in result:
        load[agent_id] = load.get(agent_id, 0) + 1
    assigned = {t for t, _ in result}
    for t in eligible_tasks(tasks, NOW):
        if t.task_id in assigned:
            continue
        for a in agents.values():
            assert not (can_take(a, t) and load.get(a.agent_id, 0) < a.capacity), (
                f"{t.task_id} left queued while {a.agent_id} could take it")


@settings(max_examples=100, deadline=None)
@given(views())
def test_property_the_plan_is_deterministic(view) -> None:
    tasks, agents, held = view
    first = plan_assignments(tasks, agents, NOW, held=held)
    reversed_views = dict(reversed(list(tasks.items()))), dict(reversed(list(agents.items())))
    assert plan_assignments(*reversed_views, NOW, held=held) == first
