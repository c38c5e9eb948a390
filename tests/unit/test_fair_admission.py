"""Fair admission (projections.fairness, used by actors.scheduling and projections.waits):
per-repository and per-author limits on tasks with an agent, priority lanes (pull request
rounds, then review follow-ups, then new issues), aging so nothing starves, and the words
the board shows for a task a limit holds back — the same check the scheduler makes.

The property test simulates the scheduler over random arrival sequences (tasks of a few
repositories and authors, every lane and priority, running a few ticks each) and checks
that limits and capacity are never exceeded and that every task is assigned within a
bound that follows from the policy's horizon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from actors.scheduling import eligible_tasks, plan_assignments
from events import task_state as ts
from events.agent_state import AgentState
from events.task import PRIORITIES, Analysis, IssueRef
from events.task_state import WITH_AGENT, TaskState
from projections.fairness import (
    DEFAULT_POLICY,
    TOP_LEVEL,
    Admission,
    FairnessPolicy,
    lane,
    limit_blocker,
    parse_limits,
    ready_since,
    urgency,
)
from projections.leases import LeaseIndex
from projections.waits import Waits, fairness_pass, why_waiting

pytestmark = pytest.mark.timeout(120)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def task(tid: str, *, repo: str = "acme/app", author: str = "alice", status: str = "queued",
         priority: str = "normal", work: str = "implement", guidance: str = "", waited: float = 0,
         agent: str | None = None, paths: tuple[str, ...] = (), deps: tuple[str, ...] = (),
         at: datetime = NOW) -> TaskState:
    """A task in the view that entered its state ``waited`` seconds before ``at``."""
    since = at - timedelta(seconds=waited)
    return TaskState(task_id=tid, status=status, version=3, created_at=since, updated_at=since,
                     issue=IssueRef(source="local", repo=repo, number=1, title=tid, author=author),
                     priority=priority, work=work, guidance=guidance, agent_id=agent, paths=paths,
                     dependencies=deps)


def agent(aid: str, capacity: int = 1) -> AgentState:
    return AgentState(agent_id=aid, status="idle", version=1, specialties=("general",), capacity=capacity,
                      clearance="restricted")


def plan(tasks: list[TaskState], agents: list[AgentState], policy: FairnessPolicy, now: datetime = NOW,
         **kw) -> list[tuple[str, str]]:
    return plan_assignments({t.task_id: t for t in tasks}, {a.agent_id: a for a in agents}, now,
                            policy=policy, **kw)


# -- the policy ----------------------------------------------------------------------------------
def test_bad_policies_are_refused_with_a_clear_error() -> None:
    for bad in ({"repo_limit": 0}, {"author_limit": -1}, {"repo_limit": 1.5}, {"repo_limit": True},
                {"repo_limits": {"acme/app": 0}}, {"aging": 0}, {"aging": -5}, {"aging": float("inf")}):
        with pytest.raises(ValueError, match="must be"):
            FairnessPolicy(**bad)
    assert FairnessPolicy().limited is False and FairnessPolicy(author_limit=1).limited
    assert FairnessPolicy(aging=None).horizon is None
    assert FairnessPolicy(aging=60).horizon == 60 * TOP_LEVEL == 660


def test_limits_from_repeatable_flags() -> None:
    assert parse_limits([]) == (None, {})
    assert parse_limits(["3", "acme/app=5", "acme/web = 1"]) == (3, {"acme/app": 5, "acme/web": 1})
    for bad in ("0", "x", "acme/app=", "=2", "acme/app=0", "acme/app=two"):
        with pytest.raises(ValueError, match="expected N or NAME=N"):
            parse_limits([bad], "--repo-limit")


# -- limits ----------------------------------------------------------------------------------------
def test_a_repository_at_its_limit_waits_and_the_others_go() -> None:
    policy = FairnessPolicy(repo_limit=1)
    running = task("app-0", status="in_progress", agent="a")
    tasks = [running, task("app-1", waited=60), task("web-1", repo="acme/web")]
    assert plan(tasks, [agent("a", 1), agent("b", 3)], policy) == [("web-1", "b")]
    # a per-repository override raises it for one repository
    wider = FairnessPolicy(repo_limit=1, repo_limits={"acme/app": 2})
    assert sorted(plan(tasks, [agent("a", 1), agent("b", 3)], wider)) == [("app-1", "b"), ("web-1", "b")]
    # within one pass: the first assignment uses the repository's last slot
    fresh = [task("app-1", waited=60), task("app-2", waited=30)]
    assert plan(fresh, [agent("b", 3)], policy) == [("app-1", "b")]
    # an open pull request holds no slot: only tasks with an agent count
    in_review = replace(running, status="review")
    assert plan([in_review, task("app-1")], [agent("b")], policy) == [("app-1", "b")]


def test_an_author_at_its_limit_waits_and_tasks_without_an_author_are_not_limited() -> None:
    policy = FairnessPolicy(author_limit=1, author_limits={"bob": 2})
    tasks = [task("a-0", status="assigned", agent="x"), task("a-1", waited=90, repo="acme/web"),
             task("b-1", author="bob", waited=60), task("b-2", author="bob", waited=50),
             task("b-3", author="bob", waited=40), task("n-1", author="", waited=30),
             task("n-2", author="", waited=20)]
    assert plan(tasks, [agent("x", 10)], policy) == [("b-1", "x"), ("b-2", "x"), ("n-1", "x"), ("n-2", "x")]


def test_running_is_the_coordinators_index_with_its_reservations() -> None:
    """A task the intake assigned that the view still shows queued holds its slot when
    the coordinator passes it in ``running``."""
    policy = FairnessPolicy(repo_limit=1)
    reserved, waiting = task("app-1", waited=60), task("app-2")
    assert plan([reserved, waiting], [agent("a", 2)], policy, queued=["app-2"]) == [("app-2", "a")]
    assert plan([reserved, waiting], [agent("a", 2)], policy, queued=["app-2"], running=["app-1"]) == []


def test_the_limit_check_is_one_function() -> None:
    policy = FairnessPolicy(repo_limit=2, author_limit=1)
    t = task("t")
    assert limit_blocker(t, policy, {"acme/app": 1}, {}) is None
    assert limit_blocker(t, policy, {"acme/app": 2}, {}).kind == "repository"
    assert limit_blocker(t, policy, {}, {"alice": 1}).kind == "author"
    assert Admission(FairnessPolicy(), {}).blocker(t) is None  # no limits, no work


# -- lanes, priority, aging ------------------------------------------------------------------------
def test_lanes_pull_request_rounds_then_review_follow_ups_then_new_issues() -> None:
    new = task("new", priority="urgent")
    follow_up = task("follow", priority="low", guidance="the reviewer asks for a test")
    ci_fix, rebase = task("fix", priority="low", work="ci_fix"), task("rebase", priority="low", work="rebase")
    assert [lane(t) for t in (new, follow_up, ci_fix, rebase)] == [0, 1, 2, 2]
    tasks = {t.task_id: t for t in (new, follow_up, ci_fix, rebase)}
    order = [t.task_id for t in eligible_tasks(tasks, NOW)]
    assert order == ["fix", "rebase", "follow", "new"]  # equal lane and age: by id
    assert plan(list(tasks.values()), [agent("a")], FairnessPolicy()) == [("fix", "a")]


def test_aging_lifts_a_waiting_task_above_newer_more_urgent_ones() -> None:
    policy = FairnessPolicy(aging=60)
    old_low = task("old-low", priority="low", waited=5 * 60)  # 0 + 5 levels
    new_urgent = task("new-urgent", priority="urgent")  # 3
    tasks = {t.task_id: t for t in (old_low, new_urgent)}
    assert [t.task_id for t in eligible_tasks(tasks, NOW, policy=policy)] == ["old-low", "new-urgent"]
    assert urgency(old_low, ready_since(old_low, tasks), NOW, policy) == 5.0
    # past the horizon it outranks anything new: an urgent CI fix is TOP_LEVEL
    fix = task("fix", priority="urgent", work="ci_fix")
    assert urgency(fix, NOW, NOW, policy) == TOP_LEVEL
    starving = task("starving", priority="low", waited=policy.horizon + 1)
    both = {t.task_id: t for t in (fix, starving)}
    assert [t.task_id for t in eligible_tasks(both, NOW, policy=policy)] == ["starving", "fix"]


def test_waiting_counts_from_when_the_task_became_ready() -> None:
    dep = task("dep", status="completed", waited=60)  # completed a minute ago
    child = task("child", deps=("dep",), waited=3600)  # queued an hour ago, blocked till then
    assert ready_since(child, {"dep": dep, "child": child}) == NOW - timedelta(seconds=60)
    assert ready_since(child, {"child": child}) is None  # an unknown dependency: not ready
    backoff = replace(task("retry", waited=600), not_before=NOW - timedelta(seconds=10))
    assert ready_since(backoff, {"retry": backoff}) == NOW - timedelta(seconds=10)


def test_without_aging_a_low_task_starves_and_with_aging_it_waits_at_most_the_horizon() -> None:
    """One agent, an urgent CI fix arriving every tick and running one tick: the new,
    low-priority issue never runs without aging; with it, it runs once it has waited the
    horizon."""
    tick = 30.0

    def first_run_of_low(policy: FairnessPolicy, ticks: int) -> float | None:
        low = task("low", priority="low", at=NOW)
        tasks = {"low": low}
        for n in range(ticks):
            now = NOW + timedelta(seconds=n * tick)
            for tid, t in list(tasks.items()):
                if t.status in WITH_AGENT:
                    tasks[tid] = replace(t, status="completed", agent_id=None, updated_at=now)
            tasks[f"fix-{n:04d}"] = task(f"fix-{n:04d}", priority="urgent", work="ci_fix", at=now)
            for tid, aid in plan_assignments(tasks, {"a": agent("a")}, now, policy=policy):
                if tid == "low":
                    return (now - NOW).total_seconds()
                tasks[tid] = replace(tasks[tid], status="assigned", agent_id=aid, updated_at=now)
        return None

    assert first_run_of_low(FairnessPolicy(aging=None), 200) is None
    policy = FairnessPolicy(aging=60)
    waited = first_run_of_low(policy, 200)
    assert waited is not None and policy.horizon <= waited <= policy.horizon + 2 * tick


def test_a_starving_task_keeps_its_repository_and_author() -> None:
    """Blocked by its repository's limit, a task past the horizon keeps its author (and
    repository) from the tasks behind it, so they cannot take turns ahead of it for ever."""
    policy = FairnessPolicy(repo_limit=1, author_limit=1, aging=60)
    starving = task("app-alice", waited=policy.horizon + 60)
    app_bob = task("app-bob", status="in_progress", agent="x", author="bob")
    web_alice = task("web-alice", repo="acme/web", waited=10)
    tasks = [starving, app_bob, web_alice]
    assert plan(tasks, [agent("x", 5)], policy) == []  # web-alice would take alice's one slot
    view = {t.task_id: t for t in tasks}
    assert why_waiting(starving, view, NOW, fairness=policy) == (
        "fairness: repository acme/app at its limit (1 running)")
    assert why_waiting(web_alice, view, NOW, fairness=policy) == (
        "fairness: author alice kept for app-alice (waiting 12m)")
    # not yet starving: the younger task may go
    patient = replace(starving, updated_at=NOW - timedelta(seconds=60))
    assert plan([patient, app_bob, web_alice], [agent("x", 5)], policy) == [("web-alice", "x")]


# -- the board's words -------------------------------------------------------------------------------
def test_the_board_says_which_limit_holds_a_task_back() -> None:
    policy = FairnessPolicy(repo_limit=2, author_limit=1)
    tasks = {t.task_id: t for t in (
        task("app-1", status="in_progress", agent="x", author="bob"),
        task("app-2", status="testing", agent="x", author="carol"),
        task("app-3", author="dave"),
        task("web-1", repo="acme/web", status="assigned", agent="y", author="erin"),
        task("web-2", repo="acme/web", author="erin", waited=5),
        task("web-3", repo="acme/web", author="frank", paths=("src/x.py",)),
    )}
    waits = Waits(tasks, fairness=policy)
    assert waits.why(tasks["app-3"], NOW) == "fairness: repository acme/app at its limit (2 running)"
    assert waits.why(tasks["web-2"], NOW) == "fairness: author erin at its limit (1 running)"
    assert waits.why(tasks["web-3"], NOW) == "waiting for an agent"
    assert why_waiting(tasks["app-3"], tasks, NOW, fairness=policy) == waits.why(tasks["app-3"], NOW)
    # without the policy the board cannot tell, and says what it knows
    assert Waits(tasks).why(tasks["app-3"], NOW) == "waiting for an agent"
    # what the board says is what the scheduler does
    assert plan(list(tasks.values()), [agent("z", 9)], policy) == [("web-3", "z")]
    # a file lease comes first, as in the scheduler
    leased = replace(tasks["app-3"], paths=("src/x.py",))
    holder = task("app-0", status="review", author="gina", paths=("src/x.py",))
    view = {**tasks, "app-3": leased, "app-0": holder}
    assert Waits(view, fairness=policy).why(leased, NOW) == "file lease: src/x.py held by app-0"


# -- properties ---------------------------------------------------------------------------------------
REPOS = ("acme/app", "acme/web", "acme/db")
AUTHORS = ("alice", "bob", "")
TICK = 30.0

arrival = st.fixed_dictionaries({
    "repo": st.sampled_from(REPOS), "author": st.sampled_from(AUTHORS),
    "priority": st.sampled_from(PRIORITIES), "kind": st.sampled_from(("new", "follow", "ci_fix", "rebase")),
    "ticks": st.integers(1, 3)})


@st.composite
def fleets(draw):
    """A policy, a few agents, and a load: a first batch, then a pattern of arrivals
    repeated for a while (continuing load, the shape that starves a task without aging)."""
    policy = FairnessPolicy(repo_limit=draw(st.none() | st.integers(1, 2)),
                            author_limit=draw(st.none() | st.integers(1, 2)),
                            repo_limits=draw(st.dictionaries(st.sampled_from(REPOS), st.integers(1, 3),
                                                             max_size=1)),
                            aging=draw(st.sampled_from((30.0, 60.0))))
    agents = {f"a{i}": agent(f"a{i}", draw(st.integers(1, 2))) for i in range(draw(st.integers(1, 2)))}
    first = draw(st.lists(arrival, max_size=4))
    pattern = draw(st.lists(st.lists(arrival, max_size=3), min_size=1, max_size=4))
    length = draw(st.integers(len(pattern), 120))
    return policy, agents, [first, *(pattern[i % len(pattern)] for i in range(length))]


ONE = {"repo": "acme/app", "author": "alice", "ticks": 1}
STARVING_WITHOUT_AGING = (FairnessPolicy(aging=30.0), {"a0": agent("a0")},
                          [[{**ONE, "priority": "low", "kind": "new"}],
                           *[[{**ONE, "priority": "urgent", "kind": "ci_fix"}]] * 100])
# two limits taking turns: bob's work fills acme/app whenever alice's frees her one slot, and
# the other way round, so alice's acme/app task is always blocked by one or the other
# unless, starving, it keeps both
URGENT = {"priority": "urgent", "kind": "ci_fix", "ticks": 2}
TAKING_TURNS = (FairnessPolicy(repo_limit=1, author_limit=1, aging=30.0), {"a0": agent("a0", 3)},
                [[{**ONE, "priority": "low", "kind": "new"}, {**URGENT, "repo": "acme/app", "author": "bob"}],
                 *[[{**URGENT, "repo": "acme/web", "author": "alice"}],
                   [{**URGENT, "repo": "acme/app", "author": "bob"}]] * 70])


def _exceeded(tasks: dict[str, TaskState], policy: FairnessPolicy) -> list[str]:
    repos: dict[str, int] = {}
    authors: dict[str, int] = {}
    for t in tasks.values():
        if t.status in WITH_AGENT:
            repos[t.issue.repo] = repos.get(t.issue.repo, 0) + 1
            if t.issue.author:
                authors[t.issue.author] = authors.get(t.issue.author, 0) + 1
    return ([f"repository {r}: {n}" for r, n in repos.items() if n > (policy.repo_cap(r) or n)]
            + [f"author {a}: {n}" for a, n in authors.items() if n > (policy.author_cap(a) or n)])


@settings(max_examples=150, deadline=None)
@example(STARVING_WITHOUT_AGING)
@example(TAKING_TURNS)
@given(fleets())
def test_property_limits_hold_and_every_task_is_assigned_within_a_bounded_wait(fleet) -> None:
    policy, agents, arrivals = fleet
    tasks: dict[str, TaskState] = {}
    arrived: dict[str, int] = {}  # task -> tick it arrived
    started: dict[str, int] = {}
    ends: dict[str, int] = {}  # task -> the tick it finishes
    durations: dict[str, int] = {}
    tick = 0
    total = sum(len(batch) for batch in arrivals)
    while len(started) < total:
        assert tick < 10_000, "the simulation does not drain"
        now = NOW + timedelta(seconds=tick * TICK)
        for tid, end in list(ends.items()):
            if end <= tick:
                tasks[tid] = replace(tasks[tid], status="completed", agent_id=None, updated_at=now)
                del ends[tid]
        for n, a in enumerate(arrivals[tick] if tick < len(arrivals) else ()):
            tid = f"t{tick:03d}-{n}"
            tasks[tid] = task(tid, repo=a["repo"], author=a["author"], priority=a["priority"],
                              work="implement" if a["kind"] in ("new", "follow") else a["kind"],
                              guidance="review says" if a["kind"] == "follow" else "", at=now)
            arrived[tid], durations[tid] = tick, a["ticks"]
        queued = [tid for tid, t in tasks.items() if t.status == "queued"]
        running = [tid for tid, t in tasks.items() if t.status in WITH_AGENT]
        held: dict[str, int] = {}
        for tid in running:
            held[tasks[tid].agent_id] = held.get(tasks[tid].agent_id, 0) + 1
        for tid, aid in plan_assignments(tasks, agents, now, held=held, queued=queued, policy=policy,
                                         running=running):
            assert tasks[tid].status == "queued"
            tasks[tid] = replace(tasks[tid], status="assigned", agent_id=aid, updated_at=now)
            started[tid], ends[tid] = tick, tick + durations[tid]
            held[aid] = held.get(aid, 0) + 1
            assert held[aid] <= agents[aid].capacity
        assert not _exceeded(tasks, policy), _exceeded(tasks, policy)
        tick += 1
    # The bound. Past the horizon a task T outranks every later arrival, so only the
    # tasks S pending when it arrived or arriving within the horizon can be ahead of it.
    # While T waits, one of S starts at least every 2 * 3 ticks (the longest run): in one
    # run every running task ends; then its repository and author hold only tasks ahead
    # of it (what it keeps, nobody behind may take), and in the next a slot or an agent
    # goes to it or to one of S.
    horizon = policy.horizon / TICK
    for tid, at in arrived.items():
        pending = sum(1 for o, a in arrived.items()
                      if o != tid and a <= at + horizon and started[o] >= at)
        bound = horizon + 2 * 3 * (pending + 1) + 2
        assert started[tid] - at <= bound, (tid, started[tid] - at, bound)


@st.composite
def views(draw):
    policy = FairnessPolicy(repo_limit=draw(st.integers(1, 2)),
                            author_limit=draw(st.none() | st.integers(1, 2)),
                            aging=60.0)
    tasks = {}
    for i in range(draw(st.integers(1, 14))):
        tid = f"t{i:02d}"
        status = draw(st.sampled_from(["queued"] * 3 + ["assigned", "in_progress", "review"]))
        tasks[tid] = task(tid, repo=draw(st.sampled_from(REPOS)), author=draw(st.sampled_from(AUTHORS)),
                          status=status, agent="x" if status in WITH_AGENT else None,
                          priority=draw(st.sampled_from(PRIORITIES)), waited=draw(st.integers(0, 3600)),
                          paths=draw(st.sampled_from(((), ("a.py",)))))
    return policy, tasks


@settings(max_examples=200, deadline=None)
@given(views())
def test_property_what_the_board_says_is_what_the_scheduler_does(view) -> None:
    """A task the board says a fairness limit holds back is not assigned, however many
    agents are free; the first task it does not hold back (and no lease does) is."""
    policy, tasks = view
    held_back = fairness_pass(tasks, NOW, policy)
    waits = Waits(tasks, fairness=policy)
    for tid in held_back:
        assert waits.why(tasks[tid], NOW).startswith("fairness: ")
    assigned = [tid for tid, _ in plan_assignments(tasks, {"big": agent("big", 100)}, NOW, policy=policy)]
    assert not set(assigned) & set(held_back)
    leases = LeaseIndex.of(tasks)
    free = [t.task_id for t in eligible_tasks(tasks, NOW, policy=policy)
            if t.task_id not in held_back and leases.blocker(t) is None]
    if free:
        assert assigned[:1] == free[:1]
    else:
        assert assigned == []


# -- a task taken back keeps its place ---------------------------------------------------------
def _fold(state: TaskState | None, *commands) -> TaskState:
    for command in commands:
        state = ts.fold(ts.decide(state, command), state)
    return state


def _created(tid: str, at: datetime) -> TaskState:
    return _fold(None, ts.CreateTask(at=at, actor="c", task_id=tid, analysis=Analysis(specialty="general"),
                                     issue=IssueRef(source="local", repo="acme/app", number=1, title=tid)))


@pytest.mark.parametrize("reason", ["agent_lost", "handed_back"])
def test_a_task_taken_back_keeps_its_place_ahead_of_tasks_queued_since(reason) -> None:
    """The chaos suite's lost agent: its tasks went behind the 38 queued after them and
    waited for all of them. Interrupted work keeps the place it had in the queue."""
    first = _created("first", NOW - timedelta(seconds=100))
    first = _fold(first, ts.AssignTask(at=NOW - timedelta(seconds=90), actor="c", agent_id="a1"),
                  ts.StartTask(at=NOW - timedelta(seconds=89), actor="c", agent_id="a1"))
    later = [_created(f"later-{i}", NOW - timedelta(seconds=80 - i)) for i in range(5)]
    back = _fold(first, ts.RequeueTask(at=NOW - timedelta(seconds=1), actor="c", reason=reason, agent_id="a1"))
    assert back.status == "queued" and back.attempt == 2
    assert back.queued_since == NOW - timedelta(seconds=100)
    tasks = {t.task_id: t for t in [back, *later]}
    assert ready_since(back, tasks) == NOW - timedelta(seconds=100)
    assert [t.task_id for t in eligible_tasks(tasks, NOW)][0] == "first"
    assert plan(list(tasks.values()), [agent("a2")], DEFAULT_POLICY) == [("first", "a2")]
    # assigned again and taken back again: still the same place
    again = _fold(back, ts.AssignTask(at=NOW, actor="c", agent_id="a2"),
                  ts.RequeueTask(at=NOW, actor="c", reason=reason, agent_id="a2"))
    assert again.queued_since == NOW - timedelta(seconds=100)


def test_a_retry_after_a_failure_queues_afresh_after_its_backoff() -> None:
    t = _created("t", NOW - timedelta(seconds=100))
    t = _fold(t, ts.AssignTask(at=NOW - timedelta(seconds=90), actor="c", agent_id="a1"),
              ts.StartTask(at=NOW - timedelta(seconds=89), actor="c", agent_id="a1"),
              ts.FailTask(at=NOW - timedelta(seconds=30), actor="c", reason="tests failed", agent_id="a1"),
              ts.RetryTask(at=NOW - timedelta(seconds=30), actor="c", backoff_base=10))
    assert t.status == "queued" and t.queued_since is None
    assert ready_since(t, {"t": t}) == t.not_before  # its backoff's end, not its first place
