"""Metrics: what a scrape says equals what the event log says (counted here directly
from the events, independently of the read model), parsed with prometheus_client's own
text parser; the API middleware labels by route template; ``/metrics`` is
prometheus-client's ASGI app (plain text by default, OpenMetrics when asked); the
standalone server answers over real HTTP."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import httpx
import msgspec
import pytest
from litestar import Litestar, get
from litestar.params import FromPath
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from events import agent_state as ag
from events import task_state as ts
from events.agent import AgentEventBase
from events.checks import CheckRun
from events.codec import BadMessage
from events.task import (
    Analysis,
    IssueRef,
    TaskCancelled,
    TaskChecksFailed,
    TaskChecksPassed,
    TaskCompleted,
    TaskConflicted,
    TaskCreated,
    TaskEventBase,
    TaskFixQueued,
    TaskMerged,
    TaskMergeDequeued,
    TaskMergeQueued,
    TaskPullRequestOpened,
    Usage,
)
from events.work_reports import ImplementationProduced, TestsRun
from infra.adapters.http.metrics import ApiMetrics, metrics_endpoint, serve_metrics
from infra.adapters.obs.metrics import AgentMetrics
from projections.metrics import ClusterMetrics, LogCounters
from projections.read_model import ReadModel
from tests.support.histories import T0, random_history

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by(parsed: dict, name: str, label: str | tuple[str, ...]) -> dict:
    labels = (label,) if isinstance(label, str) else label
    out = {}
    for (n, lbls), v in parsed.items():
        if n == name:
            d = dict(lbls)
            key = tuple(d[x] for x in labels)
            out[key[0] if len(key) == 1 else key] = v
    return out


def fold(log: list) -> tuple[ReadModel, LogCounters]:
    model, counters = ReadModel(), LogCounters()
    for seq, event in enumerate(log, 1):
        model.apply(seq, event)
        counters.apply(seq, event, model.tasks)
    return model, counters


def scrape(model: ReadModel, counters: LogCounters | None, stream_end: int | None = None) -> str:
    registry = CollectorRegistry()
    ClusterMetrics(model, registry, counters=counters,
                   stream_last_seq=(lambda: stream_end) if stream_end is not None else None)
    return generate_latest(registry).decode()


@pytest.mark.parametrize("seed", range(25))
def test_scrape_equals_counts_from_the_events(seed):
    log = random_history(seed, n_tasks=8, steps=250)
    model, counters = fold(log)
    parsed = samples(scrape(model, counters, stream_end=len(log) + 7))

    # the truth, straight from the events (the pure evolve functions, no read model)
    tasks: dict = {}
    agents: dict = {}
    created_at: dict = {}
    durations: list[float] = []
    for e in log:
        if isinstance(e, TaskEventBase):
            tasks[e.task_id] = ts.evolve(tasks.get(e.task_id), e)
            if isinstance(e, TaskCreated):
                created_at[e.task_id] = e.occurred_at
            if isinstance(e, (TaskCompleted, TaskMerged)):  # merged by a person, or by the queue
                durations.append((e.occurred_at - created_at[e.task_id]).total_seconds())
        else:
            assert isinstance(e, AgentEventBase)
            agents[e.agent_id] = ag.evolve(agents.get(e.agent_id), e)

    want_tasks = Counter((t.status, t.specialty) for t in tasks.values())
    assert by(parsed, "claude_tasks_total", ("status", "agent_type")) == dict(want_tasks)
    assert parsed[("claude_active_tasks", frozenset())] == sum(
        n for (status, _), n in want_tasks.items() if status in ("assigned", "in_progress", "testing"))
    want_agents = Counter(a.status for a in agents.values())
    got_agents = by(parsed, "claude_agents_total", "status")
    assert {k: v for k, v in got_agents.items() if v} == dict(want_agents)
    assert set(got_agents) == set(ag.AGENT_STATUSES)  # zeros too: alerts need no "absent()"
    online = {a.agent_id: a for a in agents.values() if a.status != "offline"}
    assert by(parsed, "claude_agent_load", "agent_id") == {
        aid: len(a.active_tasks) / a.capacity for aid, a in online.items()}

    count = sum(v for (n, _), v in parsed.items() if n == "claude_task_duration_seconds_count")
    total = sum(v for (n, _), v in parsed.items() if n == "claude_task_duration_seconds_sum")
    assert count == len(durations) == sum(1 for t in tasks.values() if t.status == "completed")
    assert total == pytest.approx(sum(durations))
    for (n, lbls), v in parsed.items():  # every bucket is a cumulative count of real durations
        if n == "claude_task_duration_seconds_bucket":
            d = dict(lbls)
            le = float(d["le"])
            specialty_durations = [
                (t.updated_at - t.created_at).total_seconds() for t in tasks.values()
                if t.status == "completed" and t.specialty == d["agent_type"]]
            assert v == sum(1 for x in specialty_durations if x <= le)

    assert by(parsed, "claude_events_total", "type") == dict(Counter(e.__struct_config__.tag for e in log))
    assert parsed[("claude_event_log_lag", frozenset({("projection", "read_model")}))] == 7
    assert parsed[("claude_bad_events_total", frozenset())] == 0
    assert_green_metrics(parsed, log)


def assert_green_metrics(parsed: dict, log: list) -> None:
    """The pull-request-to-green metrics, counted here straight from the events."""
    task_events = [e for e in log if isinstance(e, TaskEventBase)]
    first_pr: dict[str, object] = {}
    first_green: dict[str, object] = {}
    conflicts = resolved = 0
    unresolved: Counter = Counter()
    for e in task_events:
        if isinstance(e, TaskPullRequestOpened):
            first_pr.setdefault(e.task_id, e.occurred_at)
        if isinstance(e, TaskChecksPassed):
            first_green.setdefault(e.task_id, e.occurred_at)
        if isinstance(e, TaskConflicted):
            conflicts += 1
            unresolved[e.task_id] += 1
        if isinstance(e, (TaskPullRequestOpened, TaskMerged, TaskCompleted)):
            resolved += unresolved.pop(e.task_id, 0)
        if isinstance(e, TaskCancelled):
            unresolved.pop(e.task_id, None)
    assert parsed[("claude_pull_requests_opened_total", frozenset())] == len(first_pr)
    assert parsed[("claude_pull_requests_green_total", frozenset())] == len(first_green)
    assert parsed[("claude_pull_request_green_ratio", frozenset())] == pytest.approx(
        len(first_green) / len(first_pr) if first_pr else 0.0)
    to_green = [(first_green[t] - first_pr[t]).total_seconds() for t in first_green]
    assert parsed[("claude_time_to_green_seconds_count", frozenset())] == len(to_green)
    assert parsed[("claude_time_to_green_seconds_sum", frozenset())] == pytest.approx(sum(to_green))
    fixes = [e for e in task_events if isinstance(e, TaskFixQueued) and e.kind == "ci_fix"]
    assert parsed[("claude_ci_fix_attempts_started_total", frozenset())] == len(fixes)
    judged = by(parsed, "claude_ci_fix_attempts_total", "outcome")
    assert sum(judged.values()) <= len(fixes) and set(judged) <= {
        "green", "still_failing", "needs_human", "failed", "cancelled", "merged"}
    want_failures = Counter((e.classification, "pull_request") for e in task_events
                            if isinstance(e, TaskChecksFailed))
    want_failures.update((e.classification or "unknown", "merge_queue") for e in task_events
                         if isinstance(e, TaskMergeDequeued) and e.checks)
    assert by(parsed, "claude_checks_failures_total", ("classification", "stage")) == dict(want_failures)
    assert parsed[("claude_conflicts_detected_total", frozenset())] == conflicts
    assert parsed[("claude_conflicts_resolved_total", frozenset())] == resolved
    steps: Counter = Counter()
    for e in task_events:
        if isinstance(e, TaskMergeQueued):
            steps["entered"] += 1
        elif isinstance(e, TaskMerged):
            steps["merged"] += 1
        elif isinstance(e, TaskMergeDequeued):
            steps["ejected" if e.checks else "left"] += 1
    assert by(parsed, "claude_merge_queue_total", "step") == dict(steps)


def test_a_restart_rebuilding_from_the_log_reports_the_same_numbers():
    log = random_history(7, steps=300)
    first, c1 = fold(log)
    again, c2 = fold(log)
    # redelivery / overlapping catch-up is a no-op for the counters too
    for seq, event in enumerate(log[:50], 1):
        again.apply(seq, event)
        c2.apply(seq, event, again.tasks)
    assert scrape(first, c1) == scrape(again, c2)


def test_bad_events_and_the_model_without_counters():
    model = ReadModel()
    model.apply(1, BadMessage(seq=1, subject="ccc.task.x.created", error="undecodable", preview="{"))
    parsed = samples(scrape(model, None))
    assert parsed[("claude_bad_events_total", frozenset())] == 1
    assert not by(parsed, "claude_events_total", "type")  # no counters: families stay empty


def _usage_history() -> list:
    """A task analysed, implemented and tested twice, with model usage on the way."""
    tid, aid = "acme_app-1", "agent-a"
    at = [T0 + timedelta(minutes=i) for i in range(30)]
    issue = IssueRef(source="local", repo="acme/app", number=1, title="Fix it")
    task_cmds = [
        ts.CreateTask(at=at[0], actor="coordinator", task_id=tid, issue=issue),
        ts.StartAnalysis(at=at[1], actor="coordinator"),
        ts.RecordAnalysis(at=at[2], actor="coordinator", analysis=Analysis(
            specialty="backend",
            usage=Usage(model="claude-haiku", input_tokens=100, output_tokens=20, dollars=0.01))),
        ts.AssignTask(at=at[3], actor="coordinator", agent_id=aid),
        ts.StartTask(at=at[4], actor=aid, agent_id=aid),
        ts.StartTests(at=at[6], actor=aid, agent_id=aid, files_changed=("a.py",),
                      usage=Usage(model="claude-sonnet", input_tokens=5000, output_tokens=800,
                                  cache_read_tokens=4000, dollars=0.25)),
    ]
    log: list = []
    task = None
    for cmd in task_cmds:
        for e in ts.decide(task, cmd):
            task = ts.evolve(task, e)
            log.append(e)
    agent = None
    agent_cmds = [
        ag.RegisterAgent(at=at[3], actor=aid, agent_id=aid, specialties=("backend",)),
        ag.StartAgentTask(at=at[4], actor=aid, task_id=tid, attempt=1),
        ag.ReportWork(at=at[5], actor=aid, task_id=tid, attempt=1,
                      report=ImplementationProduced(coder="anthropic", turns=7)),
        ag.ReportWork(at=at[6], actor=aid, task_id=tid, attempt=1, report=TestsRun(exit_code=1, failed=2)),
        ag.ReportWork(at=at[7], actor=aid, task_id=tid, attempt=1, report=TestsRun(exit_code=0, passed=9)),
        ag.ReportWork(at=at[8], actor=aid, task_id=tid, attempt=1, report=TestsRun(timed_out=True)),
    ]
    for cmd in agent_cmds:
        for e in ag.decide(agent, cmd):
            agent = ag.evolve(agent, e)
            log.append(e)
    return log


def test_tokens_dollars_turns_and_test_runs_come_from_the_events():
    log = _usage_history()
    model, counters = fold(log)
    parsed = samples(scrape(model, counters))
    assert by(parsed, "claude_model_tokens_total", ("model", "specialty", "direction")) == {
        ("claude-haiku", "backend", "input"): 100, ("claude-haiku", "backend", "output"): 20,
        ("claude-sonnet", "backend", "input"): 5000, ("claude-sonnet", "backend", "output"): 800,
        ("claude-sonnet", "backend", "cache_read"): 4000,
    }
    dollars = by(parsed, "claude_model_dollars_total", ("model", "specialty"))
    assert dollars == pytest.approx({("claude-haiku", "backend"): 0.01, ("claude-sonnet", "backend"): 0.25})
    assert sum(dollars.values()) == pytest.approx(model.tasks["acme_app-1"].dollars)  # = the task's cost
    assert by(parsed, "claude_coder_turns_total", "coder") == {"anthropic": 7}
    assert by(parsed, "claude_test_runs_total", "outcome") == {"failed": 1, "passed": 1, "timed_out": 1}
    assert parsed[("claude_active_tasks", frozenset())] == 1


def _pr_history() -> list:
    """Six pull requests on their way to green, at known times (seconds after T0):
    1 red -> CI fix -> green; 2 flaky -> re-run -> green; 3 waits for a maintainer;
    4 green -> conflict -> rebase -> green -> merge queue -> merged; 5 red -> its one CI
    fix fails too -> Failed; 6 green -> merge queue -> the combination fails -> ejected ->
    a CI fix queued (not judged yet)."""
    log: list = []
    states: dict = {}
    heads: dict = {}

    def do(tid: str, t: float, *commands) -> None:
        for command in commands:
            command = msgspec.structs.replace(command, at=T0 + timedelta(seconds=t))
            events = ts.decide(states.get(tid), command)
            states[tid] = ts.fold(events, states.get(tid))
            log.extend(events)

    def push(tid: str, t: float, head: str) -> None:  # a round of work that ends with a push
        heads[tid] = head
        do(tid, t, ts.AssignTask(at=T0, actor="c", agent_id="a-1"),
           ts.StartTask(at=T0, actor="a-1", agent_id="a-1"),
           ts.StartTests(at=T0, actor="a-1", agent_id="a-1", files_changed=("src/app.py",)),
           ts.OpenPullRequest(at=T0, actor="a-1", agent_id="a-1", branch=f"ccc/{tid}", pr_number=1,
                              head_sha=head, base_branch="main"))

    def checks(tid: str, t: float, *runs: CheckRun, sha: str = "", **kw) -> None:
        do(tid, t, ts.RecordChecks(at=T0, actor="c", head_sha=sha or heads[tid], checks=runs, **kw))

    green = CheckRun(name="test", conclusion="success")
    red = CheckRun(name="test", conclusion="failure", log_tail="FAILED src/app.py::test_x")
    for n in range(1, 7):
        tid = f"acme_app-{n}"
        do(tid, 0, ts.CreateTask(at=T0, actor="c", task_id=tid,
                                 issue=IssueRef(source="local", repo="acme/app", number=n, title="t")),
           ts.StartAnalysis(at=T0, actor="c"), ts.RecordAnalysis(at=T0, actor="c"))
        push(tid, 0, f"{n}" * 40)
    checks("acme_app-1", 60, red, max_ci_fixes=2)
    push("acme_app-1", 100, "a" * 40)
    checks("acme_app-1", 200, green)
    checks("acme_app-2", 20, CheckRun(name="test", conclusion="failure", log_tail="connection flake"),
           base={"test": "success"})
    checks("acme_app-2", 50, green)
    checks("acme_app-3", 20, CheckRun(name="ci", conclusion="action_required"))
    checks("acme_app-4", 30, green)
    do("acme_app-4", 40, ts.RecordConflict(at=T0, actor="c", base_branch="main", files=("src/app.py",)))
    push("acme_app-4", 90, "b" * 40)
    checks("acme_app-4", 120, green)
    do("acme_app-4", 130, ts.ApprovePullRequest(at=T0, actor="c", by="alice", merge_queue=True),
       ts.StartMergeTest(at=T0, actor="c", queue_ref="q/main", queue_sha="c" * 40))
    checks("acme_app-4", 150, green, sha="c" * 40)
    do("acme_app-4", 160, ts.CompleteMerge(at=T0, actor="c", base_branch="main", merge_sha="d" * 40))
    checks("acme_app-5", 10, red, max_ci_fixes=1)
    push("acme_app-5", 70, "e" * 40)
    checks("acme_app-5", 80, red, max_ci_fixes=1)
    checks("acme_app-6", 20, green)
    do("acme_app-6", 25, ts.ApprovePullRequest(at=T0, actor="c", by="alice", merge_queue=True),
       ts.StartMergeTest(at=T0, actor="c", queue_ref="q/main", queue_sha="f" * 40))
    checks("acme_app-6", 90, red, sha="f" * 40)
    assert {t: s.status for t, s in states.items()} == {
        "acme_app-1": "review", "acme_app-2": "review", "acme_app-3": "needs_human",
        "acme_app-4": "completed", "acme_app-5": "failed", "acme_app-6": "queued"}
    return log


def test_the_way_to_green_is_measured_from_the_history():
    log = _pr_history()
    model, counters = fold(log)
    parsed = samples(scrape(model, counters))
    assert parsed[("claude_pull_requests_opened_total", frozenset())] == 6
    assert parsed[("claude_pull_requests_green_total", frozenset())] == 4  # 1, 2, 4, 6
    assert parsed[("claude_pull_request_green_ratio", frozenset())] == pytest.approx(4 / 6)
    assert sorted(counters.green.time_to_green) == [20, 30, 50, 200]
    assert parsed[("claude_time_to_green_seconds_bucket", frozenset({("le", "30.0")}))] == 2
    assert parsed[("claude_time_to_green_seconds_bucket", frozenset({("le", "60.0")}))] == 3
    assert parsed[("claude_time_to_green_seconds_bucket", frozenset({("le", "+Inf")}))] == 4
    assert parsed[("claude_time_to_green_seconds_sum", frozenset())] == 300
    assert parsed[("claude_ci_fix_attempts_started_total", frozenset())] == 3  # 1, 5, 6
    assert by(parsed, "claude_ci_fix_attempts_total", "outcome") == {"green": 1, "failed": 1}  # 6: pending
    assert by(parsed, "claude_checks_failures_total", ("classification", "stage")) == {
        ("change", "pull_request"): 3, ("flaky", "pull_request"): 1,
        ("action_required", "pull_request"): 1, ("change", "merge_queue"): 1}
    assert parsed[("claude_conflicts_detected_total", frozenset())] == 1
    assert parsed[("claude_conflicts_resolved_total", frozenset())] == 1
    assert by(parsed, "claude_merge_queue_total", "step") == {"entered": 2, "merged": 1, "ejected": 1}
    assert_green_metrics(parsed, log)
    # a restart folds the same log to the same numbers; redelivery changes nothing
    again, c2 = fold(log)
    for seq, event in enumerate(log, 1):
        c2.apply(seq, event, again.tasks)
    assert c2.snapshot() == counters.snapshot()


def test_a_fix_round_cancelled_before_it_is_judged():
    log = _pr_history()
    model, counters = fold(log)
    # task 6's CI fix round: cancelled before it was judged
    last = model.tasks["acme_app-6"]
    [cancel] = ts.decide(last, ts.CancelTask(at=T0 + timedelta(hours=1), actor="user", reason="stop"))
    model.apply(len(log) + 1, cancel)
    counters.apply(len(log) + 1, cancel, model.tasks)
    assert counters.green.ci_fix_outcomes == {"green": 1, "failed": 1, "cancelled": 1}
    assert counters.green.snapshot()["ci_fix_outcomes"] == {"cancelled": 1, "failed": 1, "green": 1}


# -- the API middleware and /metrics --------------------------------------------------------
@get("/api/v1/tasks/{task_id:str}", sync_to_thread=False)
def one_task(task_id: FromPath[str]) -> dict:
    if task_id == "missing":
        from litestar.exceptions import NotFoundException
        raise NotFoundException("no such task")
    return {"task_id": task_id}


@get("/boom", sync_to_thread=False)
def boom() -> dict:
    raise RuntimeError("bug")


async def test_middleware_counts_requests_by_route_template():
    metrics = ApiMetrics()
    app = Litestar([one_task, boom, metrics_endpoint(metrics.registry)], middleware=[metrics.middleware])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for tid in ("acme_app-1", "acme_app-2", "acme_app-3"):
            assert (await client.get(f"/api/v1/tasks/{tid}")).status_code == 200
        assert (await client.get("/api/v1/tasks/missing")).status_code == 404
        assert (await client.get("/boom")).status_code == 500
        assert (await client.get("/nowhere")).status_code == 404  # no route: not wrapped, not counted
        r = await client.get("/metrics")
        openmetrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        refused = await client.post("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n") and refused.status_code == 405
    parsed = samples(r.text)
    reqs = by(parsed, "claude_api_requests_total", ("endpoint", "method", "status"))
    assert reqs == {("/api/v1/tasks/{task_id}", "GET", "200"): 3,
                    ("/api/v1/tasks/{task_id}", "GET", "404"): 1,
                    ("/boom", "GET", "500"): 1}
    assert not any("acme_app" in str(k) for k in reqs)  # raw paths never become labels
    counts = by(parsed, "claude_api_duration_seconds_count", ("endpoint", "method"))
    assert counts[("/api/v1/tasks/{task_id}", "GET")] == 4


async def test_middleware_wrapping_a_whole_app_also_sees_unmatched_paths():
    metrics = ApiMetrics()
    app = metrics.middleware(Litestar([one_task]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.get("/api/v1/tasks/a")
        await client.get("/no/such/path/123")
    reqs = by(samples(generate_latest(metrics.registry).decode()), "claude_api_requests_total",
              ("endpoint", "status"))
    assert reqs == {("/api/v1/tasks/{task_id}", "200"): 1, ("<unmatched>", "404"): 1}


async def test_serve_metrics_on_port_0_over_real_http():
    registry = CollectorRegistry()
    model, counters = fold(random_history(3))
    ClusterMetrics(model, registry, counters=counters)
    agent = AgentMetrics(registry)
    with agent.phase("agent-a", "testing"):
        pass
    agent.tasks.labels("agent-a", "done").inc()
    refreshed = []

    async def before() -> None:
        refreshed.append(True)

    server = await serve_metrics(0, registry=registry, before=before)
    try:
        assert server.port > 0
        async with httpx.AsyncClient() as client:
            r = await client.get(server.url, headers={"Accept-Encoding": "gzip"})
            missing = await client.get(server.url.replace("/metrics", "/nope"))
            health = await client.get(server.url.replace("/metrics", "/healthz"))
    finally:
        await server.stop()
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert r.headers.get("content-encoding") == "gzip" and refreshed
    parsed = samples(r.text)
    assert parsed[("claude_events_total", frozenset({("type", "task.created")}))] == sum(
        1 for e in random_history(3) if isinstance(e, TaskCreated))
    assert parsed[("claude_agent_phase_duration_seconds_count",
                   frozenset({("agent_id", "agent-a"), ("phase", "testing"), ("outcome", "ok")}))] == 1
    assert parsed[("claude_agent_tasks_processed_total",
                   frozenset({("agent_id", "agent-a"), ("outcome", "done")}))] == 1
    assert missing.status_code == 404 and health.status_code == 200


def test_metrics_do_not_reset_on_restart():
    """Facts of the log are computed from the projection, which a restart rebuilds:
    folding the same log twice gives the same scrape."""
    from prometheus_client import CollectorRegistry, generate_latest

    from projections.metrics import ClusterMetrics, LogCounters
    from projections.read_model import ReadModel
    from tests.support.histories import random_history

    log = list(enumerate(random_history(9, steps=200), 1))

    def scrape_once() -> str:
        model, counters, registry = ReadModel(), LogCounters(), CollectorRegistry()
        for seq, event in log:
            model.apply(seq, event)
            counters.apply(seq, event, model.tasks)
        ClusterMetrics(model, registry, counters=counters)
        return generate_latest(registry).decode()

    assert scrape_once() == scrape_once()
