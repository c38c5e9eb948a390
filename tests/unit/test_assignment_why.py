"""The scheduler's choice in words: ``projections.fairness.explain`` (a queued task's lane
and urgency) and ``actors.assignment_why`` (why a task went to an agent), carried by
``task.assigned`` (``TaskAssigned.why``) into the task state (``assigned_why``).

Views are built directly (no log); the why of a pass is checked against the plan of that
very pass, so the words can never describe an agent the scheduler did not choose."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.assignment_why import MAX_WHY_CHARS, assignment_whys
from actors.scheduling import held_by_agent, plan_assignments
from events import task_state as ts
from events.agent_state import AGENT_STATUSES, AgentState
from events.codec import decode_event, encode
from events.task import PRIORITIES, SECURITY_LEVELS, SPECIALTIES, Analysis, IssueRef, TaskAssigned
from events.task_state import TaskState
from projections.fairness import DEFAULT_POLICY, FairnessPolicy, explain
from tests.support.domain import A1, A2, HAPPY, ISSUE, TID, cmd, run

pytestmark = pytest.mark.timeout(120)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def task(tid: str, *, status: str = "queued", specialty: str = "backend", priority: str = "normal",
         work: str = "implement", guidance: str = "", waited: float = 0.0, repo: str = "acme/app",
         author: str = "alice", security: str = "public", agent: str | None = None,
         deps: tuple[str, ...] = (), not_before: datetime | None = None) -> TaskState:
    """A task that entered its state ``waited`` seconds before NOW."""
    since = NOW - timedelta(seconds=waited)
    return TaskState(task_id=tid, status=status, version=3, created_at=since, updated_at=since,
                     issue=IssueRef(source="local", repo=repo, number=1, title=tid, author=author),
                     specialty=specialty, priority=priority, work=work, guidance=guidance,
                     security_level=security, agent_id=agent, dependencies=deps, not_before=not_before)


def agent(aid: str, *specialties: str, capacity: int = 1, clearance: str = "internal",
          status: str = "idle") -> AgentState:
    return AgentState(agent_id=aid, status=status, version=1, specialties=specialties or ("general",),
                      capacity=capacity, clearance=clearance)


def whys(tasks: list[TaskState], agents: list[AgentState], policy: FairnessPolicy = DEFAULT_POLICY,
         **kw) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The pass's plan, and its words (same inputs)."""
    tv, av = {t.task_id: t for t in tasks}, {a.agent_id: a for a in agents}
    plan = plan_assignments(tv, av, NOW, policy=policy, **kw)
    return plan, assignment_whys(plan, tv, av, NOW, policy=policy, **kw)


# -- a queued task's place: lane and urgency ---------------------------------------------------------
@pytest.mark.parametrize(("t", "words"), [
    (task("new", priority="high", waited=720),
     "lane: new issue; urgency 4.4 (priority high, waited 12m)"),
    (task("follow", guidance="please add a test", waited=90),
     "lane: review follow-up; urgency 5.3 (priority normal, waited 1m)"),
    (task("fix", work="ci_fix", priority="high", waited=720),
     "lane: pull request round (CI fix); urgency 12.4 (priority high, waited 12m)"),
    (task("rebase", work="rebase", priority="low", waited=30),
     "lane: pull request round (rebase); urgency 8.1 (priority low, waited 30s)"),
])
def test_explain_names_the_lane_and_the_urgency_now(t: TaskState, words: str) -> None:
    assert explain(t, NOW) == words


def test_explain_follows_the_policy_and_readiness() -> None:
    t = task("t", priority="high", waited=720)
    assert explain(t, NOW, FairnessPolicy(aging=60)) == \
        "lane: new issue; urgency 14.0 (priority high, waited 12m, past the aging horizon)"
    assert explain(t, NOW, FairnessPolicy(aging=None)) == \
        "lane: new issue; urgency 2 (priority high, waited 12m; aging off)"
    # past the horizon (aging * TOP_LEVEL = 55 min by default) it outranks every newcomer
    old = task("old", priority="low", waited=3600)
    assert explain(old, NOW).endswith("(priority low, waited 1h, past the aging horizon)")
    # readiness counts its dependency's completion, when the view is given
    dep = task("dep", status="completed", waited=60)
    waiting = task("w", deps=("dep",), waited=600)
    assert "waited 1m)" in explain(waiting, NOW, tasks={"dep": dep, "w": waiting})
    assert explain(waiting, NOW, tasks={"w": waiting}) == "lane: new issue; priority normal; not ready yet"
    backoff = task("b", waited=60, not_before=NOW + timedelta(seconds=30))
    assert explain(backoff, NOW).endswith("not ready yet")
    for status in ("assigned", "review", "completed"):
        assert explain(task("x", status=status), NOW) == ""  # only a queued task has a place


# -- why this agent -----------------------------------------------------------------------------------
def test_a_specialist_least_loaded_of_its_kind() -> None:
    agents = [agent("be-1", "backend", capacity=2), agent("be-2", "backend"), agent("gen", "general")]
    held = {"be-1": 1}
    plan, why = whys([task("t1", priority="high", waited=720)], agents, held=held)
    assert plan == [("t1", "be-2")]
    assert why["t1"] == ("lane: new issue; urgency 4.4 (priority high, waited 12m); "
                         "be-2: backend specialist, least loaded of 2 (0/1 slots busy)")


def test_a_general_agent_only_when_no_specialist_is_free() -> None:
    agents = [agent("fe-1", "frontend", status="busy"), agent("gen", "general", capacity=2)]
    plan, why = whys([task("t1", specialty="frontend")], agents, held={"fe-1": 1})
    assert plan == [("t1", "gen")]
    assert why["t1"].endswith("gen: general agent (no frontend specialist free), the only one free (0/2 slots busy)")
    # a general task has no specialist: any general agent is of its kind
    plan, why = whys([task("t2", specialty="general")], [agent("g1"), agent("g2")])
    assert plan == [("t2", "g1")]
    assert why["t2"].endswith("g1: general agent, least loaded of 2, first by id (0/1 slots busy)")


def test_clearance_is_named_for_non_public_work() -> None:
    agents = [agent("be-1", "backend", clearance="restricted")]
    _, why = whys([task("t1", security="restricted")], agents)
    assert "be-1: backend specialist, cleared for restricted, the only one free" in why["t1"]


def test_the_words_replay_the_pass_loads_and_order() -> None:
    """Two tasks to one agent in one pass: the second sees the slot the first took; the
    pull request round goes first whatever the priorities (its lane)."""
    tasks = [task("new", priority="urgent", waited=10), task("fix", work="ci_fix", priority="low", waited=10)]
    plan, why = whys(tasks, [agent("be", "backend", capacity=2)])
    assert plan == [("fix", "be"), ("new", "be")]
    assert why["fix"].startswith("lane: pull request round (CI fix); urgency 8.0 (priority low, waited 10s)")
    assert why["fix"].endswith("(0/2 slots busy)") and why["new"].endswith("(1/2 slots busy)")


def test_aging_shows_why_an_old_low_task_beat_a_fresh_high_one() -> None:
    tasks = [task("fresh", priority="high", waited=0), task("old", priority="low", waited=1200)]
    plan, why = whys(tasks, [agent("be", "backend")])
    assert plan == [("old", "be")]
    assert why["old"].startswith("lane: new issue; urgency 4.0 (priority low, waited 20m)")


def test_the_fairness_share_is_counted_through_the_pass() -> None:
    policy = FairnessPolicy(repo_limit=2, author_limits={"bob": 3})
    tasks = [task("a", author="bob", waited=20), task("b", author="bob", waited=10),
             task("running", status="in_progress", agent="be-9", author="carol")]
    plan, why = whys(tasks, [agent("be", "backend", capacity=3)], policy)
    assert [tid for tid, _ in plan] == ["a"]  # the repository's second slot is taken by "running"
    assert why["a"].endswith("; fairness: repository acme/app 1/2, author bob 0/3 running")
    # without limits, nothing about fairness is said
    _, why = whys(tasks, [agent("be", "backend", capacity=3)])
    assert "fairness" not in why["a"] and "fairness" not in why["b"]


def test_the_line_is_bounded() -> None:
    long_id = "agent-" + "x" * 400
    _, why = whys([task("t", repo="acme/" + "r" * 400)], [agent(long_id, "backend")],
                  FairnessPolicy(repo_limit=1))
    assert len(why["t"]) == MAX_WHY_CHARS and why["t"].endswith("…") and "\n" not in why["t"]


_statuses = st.sampled_from(AGENT_STATUSES)


@st.composite
def scenes(draw):
    n_agents = draw(st.integers(1, 5))
    agents = [agent(f"a{i}", *draw(st.lists(st.sampled_from(SPECIALTIES), min_size=1, max_size=2, unique=True)),
                    capacity=draw(st.integers(1, 3)), clearance=draw(st.sampled_from(SECURITY_LEVELS)),
                    status=draw(_statuses)) for i in range(n_agents)]
    tasks = [task(f"t{i}", specialty=draw(st.sampled_from(SPECIALTIES)), priority=draw(st.sampled_from(PRIORITIES)),
                  work=draw(st.sampled_from(("implement", "ci_fix", "rebase"))),
                  security=draw(st.sampled_from(SECURITY_LEVELS)), waited=draw(st.integers(0, 7200)),
                  author=draw(st.sampled_from(("", "alice", "bob"))), repo=draw(st.sampled_from(("a/x", "a/y"))))
             for i in range(draw(st.integers(1, 8)))]
    running = [task(f"r{i}", status="in_progress", agent=draw(st.sampled_from(agents)).agent_id,
                    repo=draw(st.sampled_from(("a/x", "a/y")))) for i in range(draw(st.integers(0, 3)))]
    policy = draw(st.sampled_from((FairnessPolicy(), FairnessPolicy(repo_limit=2, author_limit=2),
                                   FairnessPolicy(aging=None))))
    return tasks + running, agents, policy


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_every_assignment_gets_words_that_match_the_choice(scene) -> None:
    tasks, agents, policy = scene
    plan, why = whys(tasks, agents, policy)
    assert set(why) == {tid for tid, _ in plan}
    tv, av = {t.task_id: t for t in tasks}, {a.agent_id: a for a in agents}
    held = held_by_agent(tv)
    for tid, aid in plan:
        t, a, words = tv[tid], av[aid], why[tid]
        assert len(words) <= MAX_WHY_CHARS and words.startswith("lane: ") and not words.endswith("…")
        assert f"; {aid}: " in words
        specialist = t.specialty in a.specialties
        assert ("specialist free" in words) == (not specialist and t.specialty != "general")
        assert f"({held.get(aid, 0)}/{a.capacity} slots busy)" in words
        assert ("fairness: " in words) == policy.limited
        held[aid] = held.get(aid, 0) + 1


# -- the event and the fold ---------------------------------------------------------------------------
WHY = "lane: new issue; urgency 1.0 (priority normal, waited 0s); agent-1: backend specialist, the only one free"


def test_an_assignment_written_before_the_why_existed_still_decodes() -> None:
    old = (b'{"type":"task.assigned","agent_id":"agent-1","attempt":1,"event_id":"t-1:4","task_id":"t-1",'
           b'"version":4,"occurred_at":"2026-03-01T12:00:00Z","correlation_id":"t-1","actor":"coordinator"}')
    event = decode_event("task.t-1.assigned.agent-1", old)
    assert isinstance(event, TaskAssigned) and event.why == ""
    assert encode(event) == old  # the default is omitted: old events re-encode byte for byte
    with_why = msgspec.structs.replace(event, why=WHY)
    assert decode_event("task.t-1.assigned.agent-1", encode(with_why)) == with_why


def test_the_fold_keeps_the_why_with_the_agent() -> None:
    create = cmd(ts.CreateTask, task_id=TID, issue=ISSUE)
    log = run([create, cmd(ts.StartAnalysis), cmd(ts.RecordAnalysis, analysis=Analysis(specialty="backend")),
               cmd(ts.AssignTask, agent_id=A1, why=WHY)])
    assert log[-1].why == WHY
    state = ts.fold(log)
    assert state.assigned_why == WHY and state.agent_id == A1
    # the agent works on: the reason stays with its assignment, to the pull request and beyond
    for step in HAPPY[3:]:
        log = run([step], log)
        assert ts.fold(log).assigned_why == WHY, step
    assert ts.fold(log).status == "completed"


def test_a_requeue_clears_the_why_and_the_next_assignment_says_its_own() -> None:
    create = cmd(ts.CreateTask, task_id=TID, issue=ISSUE)
    log = run([create, cmd(ts.StartAnalysis), cmd(ts.RecordAnalysis),
               cmd(ts.AssignTask, agent_id=A1, why=WHY),
               cmd(ts.RequeueTask, reason="agent_lost", agent_id=A1)])
    assert ts.fold(log).assigned_why == "" and ts.fold(log).agent_id is None
    log = run([cmd(ts.AssignTask, agent_id=A2, why="second choice")], log)
    assert ts.fold(log).assigned_why == "second choice"
    # an assignment without words (an older coordinator) leaves none
    log = run([cmd(ts.RequeueTask, reason="handed_back", agent_id=A2), cmd(ts.AssignTask, agent_id=A1)], log)
    assert ts.fold(log).assigned_why == ""
