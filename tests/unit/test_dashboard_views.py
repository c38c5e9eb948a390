"""The dashboard's view models (projections.dashboard), pure: histories made by the real
state machines, folded and shown; the board over 10,000 tasks stays fast."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from msgspec.structs import replace

from events import agent_state as ag
from events import task_state as ts
from events.agent import Heartbeat
from events.codec import BadMessage
from events.task import Analysis, IssueRef, Usage
from events.work_reports import ImplementationProduced, TestsRun, WorkFailed
from projections.dashboard import (
    BoardIndex,
    BoardQuery,
    DashboardFold,
    LogEntry,
    agent_page,
    board_page,
    overview,
    replay,
    safe_url,
    task_page,
)
from projections.read_model import ReadModel
from projections.waits import Waits

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
C = "coordinator"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Log:
    """A log being written: each command decided by the real state machine and appended
    with the next stream sequence, into a read model, a dashboard fold and a list."""

    def __init__(self) -> None:
        self.seq = 0
        self.model = ReadModel("ccc")
        self.fold = DashboardFold("ccc")
        self.items: list[tuple[int, object]] = []
        self.tasks: dict[str, ts.TaskState | None] = {}
        self.agents: dict[str, ag.AgentState | None] = {}

    def add(self, item: object) -> int:
        self.seq += 1
        self.items.append((self.seq, item))
        self.model.apply(self.seq, item)
        self.fold.apply(self.seq, item)
        return self.seq

    def task(self, tid: str, *commands) -> list[int]:
        seqs = []
        for command in commands:
            events = ts.decide(self.tasks.get(tid), command)
            self.tasks[tid] = ts.fold(events, self.tasks.get(tid))
            seqs += [self.add(e) for e in events]
        return seqs

    def agent(self, aid: str, *commands) -> list[int]:
        seqs = []
        for command in commands:
            events = ag.decide(self.agents.get(aid), command)
            self.agents[aid] = ag.fold(events, self.agents.get(aid))
            seqs += [self.add(e) for e in events]
        return seqs

    def history(self, tid: str, traceparent: str = "") -> list[LogEntry]:
        wanted = set(self.fold.seqs_of(tid))
        return [LogEntry(seq=s, item=i, traceparent=traceparent) for s, i in self.items if s in wanted]


def issue(tid: str, title: str = "", repo: str = "acme/app") -> IssueRef:
    return IssueRef(source="local", repo=repo, number=int(tid.rsplit("-", 1)[1]), title=title or f"issue {tid}")


def queued(log: Log, tid: str, t: float, specialty: str = "backend", **issue_kw) -> None:
    log.task(tid, ts.CreateTask(at=at(t), actor=C, task_id=tid, issue=issue(tid, **issue_kw)),
             ts.StartAnalysis(at=at(t), actor=C),
             ts.RecordAnalysis(at=at(t + 1), actor=C, analysis=Analysis(
                 specialty=specialty, usage=Usage(model="m", input_tokens=10, output_tokens=5, dollars=0.01))))


def register(log: Log, aid: str, *specialties: str, t: float = 0, capacity: int = 2) -> None:
    log.agent(aid, ag.RegisterAgent(at=at(t), actor=aid, agent_id=aid, specialties=specialties, capacity=capacity))


def worked(log: Log, tid: str, aid: str, t: float, *, tests_fail: bool = False) -> None:
    """``tid`` assigned to ``aid`` and through its pipeline up to an open pull request
    (or a failed test run), with the agent's reports."""
    log.task(tid, ts.AssignTask(at=at(t), actor=C, agent_id=aid),
             ts.StartTask(at=at(t + 1), actor=aid, agent_id=aid))
    attempt = log.tasks[tid].attempt
    log.agent(aid, ag.StartAgentTask(at=at(t + 1), actor=aid, task_id=tid, attempt=attempt))
    log.agent(aid, ag.ReportWork(at=at(t + 5), actor=aid, task_id=tid, attempt=attempt,
                                 report=ImplementationProduced(
                                     coder="scripted", files_changed=("a.py",), diff_ref=f"arts/diffs/{tid}.diff",
                                     transcript_ref=f"arts/transcripts/{tid}.txt")))
    log.task(tid, ts.StartTests(at=at(t + 6), actor=aid, agent_id=aid, files_changed=("a.py",),
                                diff_ref=f"arts/diffs/{tid}.diff",
                                usage=Usage(model="m", input_tokens=100, output_tokens=50, dollars=0.25)))
    log.agent(aid, ag.ReportWork(at=at(t + 9), actor=aid, task_id=tid, attempt=attempt, report=TestsRun(
        command=("pytest",), exit_code=1 if tests_fail else 0, passed=3, failed=1 if tests_fail else 0,
        duration=2.5, log_ref=f"arts/logs/{tid}/tests.log")))
    if tests_fail:
        log.agent(aid, ag.ReportWork(at=at(t + 9), actor=aid, task_id=tid, attempt=attempt,
                                     report=WorkFailed(phase="testing", reason="1 test failed")))
        log.task(tid, ts.FailTask(at=at(t + 10), actor=aid, agent_id=aid, reason="1 test failed", phase="testing",
                                  log_ref=f"arts/logs/{tid}/tests.log"))
        log.agent(aid, ag.ReleaseAgentTask(at=at(t + 10), actor=aid, task_id=tid, outcome="failed", attempt=attempt))
    else:
        log.task(tid, ts.OpenPullRequest(at=at(t + 12), actor=aid, agent_id=aid, branch=f"ccc/{tid}",
                                         pr_url="https://forge.example/acme/app/pull/7", pr_number=7,
                                         tests_passed=3, head_sha="ab" * 20, base_branch="main"))
        log.agent(aid, ag.ReleaseAgentTask(at=at(t + 12), actor=aid, task_id=tid, outcome="done", attempt=attempt))


# -- the fold --------------------------------------------------------------------------------
def test_fold_is_idempotent_and_indexes_each_tasks_messages():
    log = Log()
    register(log, "a-1", "backend")
    queued(log, "acme_app-1", 0)
    worked(log, "acme_app-1", "a-1", 10)
    bad = BadMessage(seq=0, subject="ccc.task.acme_app-1.junk", error="not JSON", preview="{")
    bad_seq = log.add(bad)
    log.add(BadMessage(seq=0, subject="ccc.agent.a-1.junk", error="not JSON"))

    seqs = log.fold.seqs_of("acme_app-1")
    assert seqs == sorted(seqs) and bad_seq in seqs
    types = [type(i).__name__ for s, i in log.items if s in set(seqs)]
    assert "AgentTestsRun" in types and "AgentImplementationProduced" in types and "TaskCreated" in types
    assert "AgentRegistered" not in types  # not about the task

    again = DashboardFold("ccc")
    for s, i in log.items + log.items[:5]:  # redelivery and overlap are no-ops
        again.apply(s, i)
    assert again.task_seqs == log.fold.task_seqs
    assert [r.phase for r in again.agent_reports["a-1"]] == [r.phase for r in log.fold.agent_reports["a-1"]]


def test_fold_counts_completions_failures_and_cost_per_window():
    log = Log()
    register(log, "a-1", "backend")
    queued(log, "acme_app-1", 0)  # $0.01 of analysis
    worked(log, "acme_app-1", "a-1", 10)  # $0.25 of implementation
    log.task("acme_app-1", ts.CompleteTask(at=at(3000), actor=C))
    queued(log, "acme_app-2", 3100)
    worked(log, "acme_app-2", "a-1", 3200, tests_fail=True)

    now = at(3600)
    hour, day = log.fold.window(now, 60), log.fold.window(now, 24 * 60)
    assert (day.completed, day.failed) == (1, 1)
    assert day.dollars == pytest.approx(0.01 + 0.25 + 0.01 + 0.25)
    assert (hour.completed, hour.failed) == (1, 1)  # everything in the last hour (t >= 0 > now - 1 h)
    later = at(3 * 3600)
    assert log.fold.window(later, 60).completed == 0 and log.fold.window(later, 24 * 60).completed == 1


def test_fold_drops_buckets_older_than_a_day():
    fold = DashboardFold("ccc", keep_minutes=60)
    log = Log()
    log.fold = fold
    queued(log, "acme_app-1", 0)
    assert fold.buckets
    queued(log, "acme_app-2", 2 * 3600)  # two hours later: the first minute is gone
    assert min(fold.buckets) > int(at(0).timestamp()) // 60
    assert fold.window(at(2 * 3600 + 60), 24 * 60).dollars == pytest.approx(0.01)


# -- the overview ------------------------------------------------------------------------------
def test_overview_agents_queues_throughput_and_alerts():
    log = Log()
    register(log, "a-back", "backend", "database")
    register(log, "a-front", "frontend", capacity=1)
    log.agent("a-front", ag.EnterMaintenance(at=at(1), actor="a-front", reason="upgrade"))
    queued(log, "acme_app-1", 0, specialty="backend")
    queued(log, "acme_app-2", 50, specialty="backend")
    queued(log, "acme_app-3", 20, specialty="frontend")  # only agent is in maintenance
    queued(log, "acme_app-4", 30, specialty="security")  # nobody
    log.add(BadMessage(seq=0, subject="ccc.task.x.junk", error="not JSON"))
    now = at(300)

    o = overview(log.model, log.fold, now, stream_last_seq=log.seq + 500, dead_letters=None,
                 consumers={"coordinator-intake": 3, "coordinator-reports": 400})
    assert o.tasks_by_state == [("queued", 4)]
    assert o.agents_by_state["idle"] == 1 and o.agents_by_state["maintenance"] == 1
    matrix = {row.specialty: row.by_state for row in o.agents_by_specialty}
    assert matrix["backend"]["idle"] == 1 and matrix["frontend"]["maintenance"] == 1
    queues = {q.specialty: q for q in o.queues}
    assert queues["backend"].depth == 2 and queues["backend"].oldest_task == "acme_app-1"
    assert queues["backend"].oldest_wait == pytest.approx(299) and queues["backend"].agents == 1
    assert queues["frontend"].agents == 0 and queues["security"].agents == 0
    kinds = [(a.kind, a.level) for a in o.alerts]
    assert ("bad_events", "warning") in kinds and ("dead_letters", "info") in kinds
    no_agent = [a.text for a in o.alerts if a.kind == "no_agent"]
    assert len(no_agent) == 2 and any("security" in t for t in no_agent)
    lag = [a.text for a in o.alerts if a.kind == "lag"]
    assert any("500 messages behind" in t for t in lag) and any("coordinator-reports" in t for t in lag)
    assert not any("coordinator-intake" in t for t in lag)  # 3 pending is normal
    assert o.projection_lag == 500 and o.dead_letters is None
    assert [a.agent_id for a in o.agents] == ["a-back", "a-front"]

    # a generalist serves every specialty; dead letters counted; no lag
    register(log, "a-gen", "general")
    o = overview(log.model, log.fold, now, stream_last_seq=log.seq, dead_letters=2)
    assert not [a for a in o.alerts if a.kind in ("no_agent", "lag")]
    assert [a.level for a in o.alerts if a.kind == "dead_letters"] == ["warning"]


def test_overview_of_an_empty_cluster():
    o = overview(ReadModel(), DashboardFold(), T0, dead_letters=0)
    assert o.tasks_total == 0 and o.queues == [] and o.alerts == [] and o.projection_lag is None
    assert [w.completed for w in o.throughput] == [0, 0]


# -- the board -----------------------------------------------------------------------------------
def small_board() -> Log:
    log = Log()
    register(log, "a-1", "backend")
    register(log, "a-2", "frontend")
    queued(log, "acme_app-1", 0, title="Fix the login bug")
    queued(log, "acme_app-2", 10, specialty="frontend", title="Dark mode")
    queued(log, "other_lib-3", 20, repo="other/lib", title="Speed up parsing")
    worked(log, "acme_app-1", "a-1", 30)
    worked(log, "acme_app-2", "a-2", 40, tests_fail=True)
    return log


def test_board_columns_filters_and_search():
    log = small_board()
    index = BoardIndex()
    page = board_page(log.model.tasks, index, BoardQuery(), at(100), last_seq=log.seq)
    columns = {c.state: [card.task_id for card in c.cards] for c in page.columns}
    assert columns["checking"] == ["acme_app-1"] and columns["failed"] == ["acme_app-2"]
    assert columns["queued"] == ["other_lib-3"]
    assert [c.state for c in page.columns] == list(ts.TASK_STATUSES)  # every column, empty ones too
    assert page.total == 3 and page.next_offset is None and page.prev_offset is None
    assert page.repos == ["acme/app", "other/lib"] and page.agents == ["a-1", "a-2"]
    card = next(c for c in page.columns if c.state == "checking").cards[0]
    assert card.pr_url == "https://forge.example/acme/app/pull/7" and card.agent_id == "a-1"
    assert card.waiting.startswith("checks running")

    def ids(**kw) -> list[str]:
        p = board_page(log.model.tasks, index, BoardQuery(**kw), at(100))
        return [card.task_id for c in p.columns for card in c.cards]

    assert ids(states=frozenset({"failed", "queued"})) == ["other_lib-3", "acme_app-2"]
    assert [c.state for c in board_page(log.model.tasks, index, BoardQuery(states=frozenset({"failed"})),
                                        at(100)).columns] == ["failed"]
    assert ids(specialty="frontend") == ["acme_app-2"]
    assert ids(agent="a-1") == ["acme_app-1"]
    assert ids(repo="other/lib") == ["other_lib-3"]
    assert ids(q="LOGIN") == ["acme_app-1"]  # title, case-insensitive
    assert ids(q="other/lib") == ["other_lib-3"]  # repository
    assert ids(q="app-2") == ["acme_app-2"]  # id
    assert ids(q="nothing like it") == []


def test_board_pages_newest_first_and_counts_every_page():
    log = Log()
    for n in range(1, 26):
        queued(log, f"acme_app-{n}", n)
    index = BoardIndex()
    first = board_page(log.model.tasks, index, BoardQuery(limit=10), at(100))
    assert [c.task_id for c in first.columns[2].cards] == [f"acme_app-{n}" for n in range(25, 15, -1)]
    assert first.columns[2].total == 25 and first.next_offset == 10 and first.prev_offset is None
    last = board_page(log.model.tasks, index, BoardQuery(limit=10, offset=20), at(100))
    assert [c.task_id for c in last.columns[2].cards] == [f"acme_app-{n}" for n in range(5, 0, -1)]
    assert last.next_offset is None and last.prev_offset == 10
    # a task added later is found (the index catches up incrementally)
    queued(log, "acme_app-99", 200)
    assert board_page(log.model.tasks, index, BoardQuery(limit=1), at(300)).columns[2].cards[0].task_id == "acme_app-99"


def test_board_over_ten_thousand_tasks_builds_each_page_quickly():
    """A property, not a benchmark: with 10,000 tasks, building any page (filters and
    search included) takes well under 50 ms, because it is one pass of cheap
    comparisons over an order and search text kept incrementally."""
    statuses = ("queued", "in_progress", "checking", "review", "completed", "failed")
    specialties = ("backend", "frontend", "testing", "devops")
    base = ts.TaskState(task_id="x-1", status="queued", version=3, issue=issue("x-1"), created_at=T0, updated_at=T0)
    tasks = {}
    for n in range(10_000):
        tid = f"repo{n % 50}_app-{n}"
        tasks[tid] = replace(base, task_id=tid, status=statuses[n % len(statuses)],
                             specialty=specialties[n % len(specialties)],
                             agent_id=f"a-{n % 20}" if n % 3 else None,
                             issue=issue(tid, title=f"Issue number {n} about {'parsing' if n % 7 else 'login'}",
                                         repo=f"repo{n % 50}/app"),
                             created_at=at(n), updated_at=at(n + 5))
    index = BoardIndex()
    index.refresh(tasks)  # once, as the live model grows (incremental afterwards)
    waits = Waits(tasks)  # once per log position, by the caller
    queries = [BoardQuery(), BoardQuery(offset=9_900), BoardQuery(states=frozenset({"failed", "review"})),
               BoardQuery(specialty="devops", agent="a-7"), BoardQuery(repo="repo7/app", limit=500),
               BoardQuery(q="login"), BoardQuery(q="no such text anywhere")]
    for query in queries:
        board_page(tasks, index, query, at(20_000), waits=waits)  # warm
        took = []
        for _ in range(5):  # the best of five: a stall of a shared machine is not the page's cost
            started = time.perf_counter()
            page = board_page(tasks, index, query, at(20_000), waits=waits)
            took.append(time.perf_counter() - started)
        assert min(took) < 0.05, f"{query}: {min(took) * 1000:.1f} ms"
        assert sum(len(c.cards) for c in page.columns) == min(page.limit, max(0, page.total - page.offset))
    assert board_page(tasks, index, BoardQuery(q="login"), at(20_000), waits=waits).total == len(
        [t for t in tasks.values() if "login" in t.issue.title])


def test_safe_url_keeps_only_web_links():
    assert safe_url("https://github.com/acme/app/pull/7") == "https://github.com/acme/app/pull/7"
    assert safe_url("http://localhost:3000/x?y=1") == "http://localhost:3000/x?y=1"
    for bad in ("javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,<script>", "//evil.example/x",
                "https://x.example/\"onmouseover=alert(1)", "https://x.example/<script>", "", "ftp://x/y",
                "https://x.example/a b", "vbscript:x"):
        assert safe_url(bad) == "", bad


# -- a task --------------------------------------------------------------------------------------
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_task_page_timeline_phases_attempts_tests_and_artifacts():
    log = small_board()
    tid = "acme_app-2"  # failed its tests on attempt 1
    log.task(tid, ts.RetryTask(at=at(60), actor=C, backoff_base=1))
    worked(log, tid, "a-2", 70)
    log.add(BadMessage(seq=0, subject=f"ccc.task.{tid}.junk", error="not JSON", preview="<script>x</script>"))
    entries = log.history(tid, traceparent=TRACE)
    page = task_page(tid, entries, at(100))

    assert page.state is not None and page.state.status == "checking" and page.state == log.model.tasks[tid]
    assert [i.seq for i in page.items] == sorted(i.seq for i in page.items)
    kinds = {i.kind for i in page.items}
    assert kinds == {"task", "agent", "bad"} and page.bad == 1
    created = page.items[0]
    assert created.type == "task.created" and created.actor == C and created.traceparent == TRACE
    assert "Dark mode" in created.summary and created.status == "pending"
    failed = next(i for i in page.items if i.type == "task.failed")
    assert "1 test failed" in failed.summary and not failed.ok and failed.status == "failed"
    assert page.traces == [TRACE.split("-")[1]]
    # attempts: one failed, one that opened a pull request
    assert [(a.number, a.agent_id) for a in page.attempts] == [(1, "a-2"), (2, "a-2")]
    assert page.attempts[0].outcome.startswith("failed in testing") and page.attempts[1].outcome == "pull request opened"
    assert [(r.attempt, r.failed) for r in page.tests] == [(1, 1), (2, 0)]
    refs = {(a.kind, a.ref) for a in page.artifacts}
    assert ("diff", f"arts/diffs/{tid}.diff") in refs and ("transcript", f"arts/transcripts/{tid}.txt") in refs
    assert ("test log", f"arts/logs/{tid}/tests.log") in refs
    assert len(page.artifacts) == len({a.ref for a in page.artifacts})  # each once
    # time in each state: every state the task went through; the current one runs to now
    phases = {p.status: p for p in page.phases}
    assert phases["queued"].times == 2 and phases["failed"].seconds == pytest.approx(10)
    assert phases["checking"].current and phases["checking"].seconds == pytest.approx(100 - 82)
    assert page.dollars == pytest.approx(0.01 + 0.25 + 0.25)
    assert page.pr_url.startswith("https://") and page.seqs[0] == page.first_seq and page.seqs[-1] == page.last_seq


def test_task_page_marks_an_event_the_machine_refuses_and_replay_passes_over_it():
    log = Log()
    queued(log, "acme_app-1", 0)
    good = log.tasks["acme_app-1"]
    # a forged event on the task's subject: a version the task is not at
    forged = ts.decide(good, ts.AssignTask(at=at(5), actor="mallory", agent_id="a-x"))[0]
    forged = replace(forged, version=99)
    bad_seq = log.add(forged)
    entries = log.history("acme_app-1")
    page = task_page("acme_app-1", entries, at(10))
    rejected = next(i for i in page.items if i.seq == bad_seq)
    assert rejected.rejected.startswith("VersionMismatch") and not rejected.ok
    assert page.state.status == "queued"
    assert replay(entries, bad_seq).state.status == "queued"


def test_replay_shows_the_task_at_any_sequence():
    log = small_board()
    tid = "acme_app-1"
    entries = log.history(tid)
    seqs = [e.seq for e in entries if type(e.item).__name__.startswith("Task")]
    statuses = []
    for s in seqs:
        r = replay(entries, s)
        statuses.append(r.state.status)
        assert r.seq == s and r.at is not None
    assert statuses[0] == "pending" and "queued" in statuses and statuses[-1] == "checking"
    assert replay(entries, 0).state is None and replay(entries, 0).events == 0
    i = next(i for i in range(len(seqs) - 1) if seqs[i + 1] - seqs[i] > 1)
    between = replay(entries, seqs[i] + 1)  # a sequence of another aggregate: the state after seqs[i]
    assert between.state == replay(entries, seqs[i]).state and between.events == i + 1
    assert replay(entries, 10**9).state == log.model.tasks[tid]


# -- an agent ---------------------------------------------------------------------------------------
def test_agent_page_tasks_phases_and_heartbeat():
    log = small_board()
    queued(log, "acme_app-5", 50)
    log.task("acme_app-5", ts.AssignTask(at=at(60), actor=C, agent_id="a-1"),
             ts.StartTask(at=at(61), actor="a-1", agent_id="a-1"))
    log.agent("a-1", ag.StartAgentTask(at=at(61), actor="a-1", task_id="acme_app-5", attempt=1))
    hb = Heartbeat(agent_id="a-1", at=at(95), active_tasks=("acme_app-5",), seq=7)

    page = agent_page(log.model, log.fold, "a-1", at(100), hb)
    assert page is not None and page.agent.status == "busy"
    assert [t.task_id for t in page.tasks] == ["acme_app-5", "acme_app-1"]  # current first
    assert page.tasks[0].current and page.tasks[0].phase == "task_started"
    assert page.tasks[1].phase == "task_released" and not page.tasks[1].current
    assert page.recent[0].phase == "task_started" and page.recent[0].seq == max(r.seq for r in page.recent)
    assert any(r.phase == "tests_run" for r in page.recent)
    assert page.heartbeat.age == pytest.approx(5) and page.heartbeat.active_tasks == ("acme_app-5",)
    assert agent_page(log.model, log.fold, "nobody", at(100)) is None
    assert agent_page(log.model, log.fold, "a-2", at(100), None).heartbeat is None
