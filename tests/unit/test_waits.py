"""Why a task waits (projections.waits): for every state a task can wait in, the words
the board and the status API show, from task states the real state machine reached."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from msgspec.structs import replace

from events import task_state as ts
from events.checks import CheckRun
from events.task import Analysis, IssueRef
from projections.leases import LeaseIndex
from projections.waits import MAX_WAIT_CHARS, MergeQueues, Waits, age, clock, why_waiting

pytestmark = pytest.mark.timeout(30)

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REPO = "acme/app"
HEAD = "abcdef1234567890abcdef1234567890abcdef12"


def at(seconds: float) -> datetime:
    return AT + timedelta(seconds=seconds)


def run(state: ts.TaskState | None, *commands) -> ts.TaskState:
    for c in commands:
        state = ts.fold(ts.decide(state, c), state)
    assert state is not None
    return state


def queued(tid: str, *, repo: str = REPO, paths: tuple[str, ...] = (), deps: tuple[str, ...] = (),
           t: float = 0) -> ts.TaskState:
    issue = IssueRef(source="local", repo=repo, number=int(tid.rsplit("-", 1)[1]), title=f"issue {tid}")
    return run(None, ts.CreateTask(at=at(t), actor="c", task_id=tid, issue=issue),
               ts.StartAnalysis(at=at(t), actor="c"),
               ts.RecordAnalysis(at=at(t), actor="c", analysis=Analysis(paths=paths, dependencies=deps)))


def with_agent(state: ts.TaskState, agent: str = "a-1", t: float = 1) -> ts.TaskState:
    return run(state, ts.AssignTask(at=at(t), actor="c", agent_id=agent),
               ts.StartTask(at=at(t), actor=agent, agent_id=agent))


def opened(tid: str, *, head: str = HEAD, base: str = "main", t: float = 2, **kw) -> ts.TaskState:
    state = with_agent(queued(tid, **kw), t=t)
    return run(state, ts.StartTests(at=at(t), actor="a-1", agent_id="a-1", files_changed=("src/app.py",)),
               ts.OpenPullRequest(at=at(t), actor="a-1", agent_id="a-1", branch=f"ccc/{tid}",
                                  pr_number=9, head_sha=head, base_branch=base))


def checks(state: ts.TaskState, *runs: CheckRun, t: float = 60, sha: str = HEAD, **kw) -> ts.TaskState:
    return run(state, ts.RecordChecks(at=at(t), actor="c", head_sha=sha, checks=runs, **kw))


def alone(state: ts.TaskState, now: datetime, *others: ts.TaskState) -> str:
    tasks = {t.task_id: t for t in (state, *others)}
    return why_waiting(state, tasks, now)


GREEN = CheckRun(name="test", conclusion="success", url="https://ci.example/1")


def test_words_for_durations_and_times():
    assert [age(s) for s in (-5, 0, 40, 300, 3600, 3900, 86400, 2 * 86400 + 3 * 3600)] == [
        "0s", "0s", "40s", "5m", "1h", "1h 5m", "1d", "2d 3h"]
    assert clock(at(90), at(100)) == "12:01:30"
    assert clock(at(90), at(86400)) == "2026-03-01 12:01"  # another day: the date too


def test_moving_and_finished_tasks_are_not_waiting():
    pending = run(None, ts.CreateTask(at=AT, actor="c", task_id="acme_app-1",
                                      issue=IssueRef(source="local", repo=REPO, number=1, title="t")))
    assert alone(pending, AT) == "waiting for analysis"
    analysing = run(pending, ts.StartAnalysis(at=AT, actor="c"))
    assert alone(analysing, AT) == ""
    task = queued("acme_app-1")
    assert alone(task, AT) == "waiting for an agent"
    working = with_agent(task)
    assert working.status == "in_progress" and alone(working, AT) == ""
    asked = run(working, ts.CancelTask(at=at(5), actor="user", reason="no"))
    assert alone(asked, AT) == "cancellation requested; waiting for a-1 to stop"
    cancelled = run(asked, ts.CancelTask(at=at(6), actor="user", force=True))
    assert alone(cancelled, AT) == ""
    failed = run(working, ts.FailTask(at=at(7), actor="c", reason="boom", retryable=False))
    assert alone(failed, AT) == ""
    retryable = run(with_agent(queued("acme_app-2")), ts.FailTask(at=at(7), actor="c", reason="boom"))
    assert alone(retryable, AT) == "failed; a retry follows"


def test_dependencies_then_backoff_then_an_agent():
    dep = with_agent(queued("acme_app-1"))
    task = queued("acme_app-2", deps=("acme_app-1", "acme_app-9"))
    assert alone(task, AT, dep) == ("waiting for dependencies acme_app-1 (in_progress), "
                                    "acme_app-9 (unknown task)")
    one = queued("acme_app-3", deps=("acme_app-1",))
    assert alone(one, AT, dep) == "waiting for dependency acme_app-1 (in_progress)"
    done = replace(dep, status="completed")
    assert alone(one, AT, done) == "waiting for an agent"

    failed = run(with_agent(queued("acme_app-4")), ts.FailTask(at=at(10), actor="c", reason="flaky push"))
    retried = run(failed, ts.RetryTask(at=at(10), actor="c", backoff_base=60))
    assert retried.not_before == at(70)
    assert alone(retried, at(20)) == "retry backoff until 12:01:10 (50s left)"
    assert alone(retried, at(71)) == "waiting for an agent"


def test_a_file_lease_held_by_another_task_of_the_repository():
    holder = with_agent(queued("acme_app-1", paths=("src/app.py", "docs/")))
    waiting = queued("acme_app-2", paths=("README.md", "src/app.py", "docs/guide.md"))
    other_repo = queued("acme_web-2", repo="acme/web", paths=("src/app.py",))
    tasks = {t.task_id: t for t in (holder, waiting, other_repo)}
    want = "file lease: src/app.py, docs/guide.md held by acme_app-1"
    assert why_waiting(waiting, tasks, AT) == want
    assert why_waiting(waiting, tasks, AT, LeaseIndex.of(tasks)) == want == Waits(tasks).why(waiting, AT)
    assert why_waiting(other_repo, tasks, AT) == "waiting for an agent"  # leases are per repository
    assert why_waiting(holder, tasks, AT) == ""
    # the lease is released when the holder's pull request is merged (or the task ends)
    tasks[holder.task_id] = replace(holder, status="completed")
    assert why_waiting(waiting, tasks, AT) == "waiting for an agent"


def test_checks_running_and_re_running():
    task = opened("acme_app-1", t=0)
    assert task.status == "checking"
    assert alone(task, at(300)) == "checks running on abcdef1 since 12:00:00 (5m)"

    flaky = checks(task, CheckRun(name="lint", conclusion="success"),
                   CheckRun(name="test", conclusion="failure", log_tail="AssertionError in tests/test_db.py"),
                   base={"test": "success"})
    assert flaky.status == "checking" and flaky.reruns == 1
    assert alone(flaky, at(120)) == "re-running test (flaky?) on abcdef1 since 12:01:00 (1m)"

    infra = checks(task, CheckRun(name="build", conclusion="cancelled", started=False))
    assert alone(infra, at(60)) == "re-running build (infrastructure) on abcdef1 since 12:01:00 (0s)"


def test_a_ci_fix_round_and_a_failure_that_needs_a_human():
    task = opened("acme_app-1")
    red = CheckRun(name="test", conclusion="failure", log_tail="FAILED src/app.py::test_login")
    fixing = checks(task, red, max_ci_fixes=2)
    assert (fixing.status, fixing.work, fixing.ci_fixes) == ("queued", "ci_fix", 1)
    assert alone(fixing, at(61)).startswith("CI fix round 1")
    told = replace(fixing, max_ci_fixes=2)
    assert alone(told, at(61)) == "CI fix round 1 of 2 queued, waiting for an agent"

    waiting = checks(task, CheckRun(name="deploy", conclusion="action_required"))
    assert waiting.status == "needs_human"
    assert alone(waiting, at(61)) == ("needs a human: a maintainer approves the pending workflow run(s) "
                                      "on the pull request")
    long = replace(waiting, needed="do   this\n" * 100)
    text = alone(long, AT)
    assert len(text) == MAX_WAIT_CHARS and text.endswith("…") and "\n" not in text and "  " not in text


def test_a_conflict_queues_a_rebase():
    task = opened("acme_app-1", paths=("src/app.py",))
    conflicted = run(task, ts.RecordConflict(at=at(30), actor="c", base_branch="main", base_sha="f" * 40,
                                             files=("src/app.py", "src/db.py")))
    assert (conflicted.status, conflicted.work) == ("queued", "rebase")
    assert alone(conflicted, at(31)) == ("rebase on main queued (conflicts in src/app.py, src/db.py), "
                                         "waiting for an agent")
    # a rebase round owns its paths: another task's lease never holds it back
    other = with_agent(queued("acme_app-2", paths=("src/app.py",)))
    assert alone(conflicted, at(31), other).startswith("rebase on main queued")
    transitory = replace(task, status="conflicted", conflict_files=("src/app.py",))
    assert alone(transitory, AT) == "conflicts with main in src/app.py"
    assert alone(replace(task, status="checks_failed", classification="change"), AT) == \
        "checks failed on abcdef1 (change)"


def test_review_and_the_merge_queue():
    green = checks(opened("acme_app-1"), GREEN)
    assert green.status == "review" and alone(green, AT) == "checks green; waiting for approval"
    approved = run(green, ts.ApprovePullRequest(at=at(61), actor="c", by="alice"))
    assert alone(approved, AT) == "approved by alice; waiting for the pull request to be merged"

    def enqueued(tid: str, t: float, base: str = "main") -> ts.TaskState:
        state = checks(opened(tid, base=base), GREEN)
        return run(state, ts.ApprovePullRequest(at=at(t), actor="c", by="alice", merge_queue=True))

    first, second, third = (enqueued(f"acme_app-{n}", t) for n, t in ((2, 100), (3, 110), (4, 120)))
    elsewhere = enqueued("acme_app-5", 90, base="release")
    assert {t.status for t in (first, second, third, elsewhere)} == {"merge_queued"}
    testing = run(first, ts.StartMergeTest(at=at(130), actor="c", queue_ref="ccc/merge-queue/main",
                                           queue_sha="1234567" + "0" * 33, base_sha="f" * 40))
    tasks = {t.task_id: t for t in (testing, second, third, elsewhere)}
    waits = Waits(tasks)
    assert waits.why(testing, at(190)) == "merge queue: testing 1234567 since 12:02:10 (1m)"
    assert waits.why(second, AT) == "queued for merge (position 2 of 3)"
    assert waits.why(third, AT) == "queued for merge (position 3 of 3)"
    assert waits.why(elsewhere, AT) == "queued for merge (position 1 of 1)"  # its own base branch
    assert why_waiting(third, tasks, AT) == waits.why(third, AT)  # one task's question, same answer
    assert MergeQueues(tasks.values()).position(green) == (0, 3)  # not in it: its lane has 3

    rerun = checks(testing, CheckRun(name="test", conclusion="failure", log_tail="timeout talking to db"),
                   sha=testing.queue_sha, t=200, base={"test": "success"})
    assert rerun.status == "merging" and rerun.reruns == 1
    assert alone(rerun, at(200)) == (
        "merge queue: re-running the checks of 1234567 (re-run 1) since 12:03:20 (0s)")


# -- which agent a queued task waits for (issue 14's "every wait explained", the agent part) --
def agent(aid: str, *specialties: str, status: str = "idle", capacity: int = 1, clearance: str = "internal"):
    from events.agent_state import AgentState

    return AgentState(agent_id=aid, status=status, version=1, specialties=specialties, capacity=capacity,
                      clearance=clearance)


def test_a_queued_task_says_which_agent_it_waits_for():
    task = replace(queued("acme_app-1"), specialty="database")
    tasks = {task.task_id: task}

    def why(*agents) -> str:
        return why_waiting(task, tasks, AT, agents={a.agent_id: a for a in agents})

    assert why() == "waiting for an agent: none is online"
    assert why(agent("b", "backend", status="offline")) == "waiting for an agent: none is online"
    # the bug a new user met: the specialty nobody online has, and what is online instead
    assert why(agent("b", "backend"), agent("f", "frontend")) == (
        "waiting for a database or general agent: none online (online: backend, frontend)")
    assert why(agent("d", "database", clearance="public")) == (
        "waiting for the scheduler (a capable agent has a free slot)")  # public work: cleared
    secret = replace(task, security_level="confidential")
    assert why_waiting(secret, {secret.task_id: secret}, AT, agents={"d": agent("d", "database")}) == (
        "waiting for an agent cleared for confidential work: none of the database agents online is")
    assert why(agent("g", "general", status="overloaded")) == "waiting for a database agent to take work: g overloaded"
    busy = with_agent(queued("acme_app-2"), agent="g")
    both = {task.task_id: task, busy.task_id: busy}
    assert why_waiting(task, both, AT, agents={"g": agent("g", "general", status="busy")}) == (
        "waiting for a free database agent: all 1 capable busy (1/1 slots)")
    assert Waits(both, {"g": agent("g", "general", status="busy", capacity=2)}).why(task, AT) == (
        "waiting for the scheduler (a capable agent has a free slot)")
