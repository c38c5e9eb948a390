"""The dashboard's pages over real HTTP: an :class:`ApiServer` (uvicorn) on a real
nats-server, events appended through the real store (with a trace context), artifacts in
the real object store, heartbeats on the real heartbeat stream. Pages render, filter and
page, escape what the log says, answer 404 for what it does not know, serve fragments,
and replay a task at any past sequence."""

from __future__ import annotations

import re
import uuid
from urllib.parse import quote
from datetime import UTC, datetime, timedelta
from html import unescape

import httpx
import msgspec
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from events import agent_state, task_state
from events.agent import Heartbeat
from events.agent_state import RegisterAgent, ReportWork, StartAgentTask
from events.refs import artifact_ref
from events.store import EventStore
from events.task import Analysis, IssueRef, Usage
from events.task_state import (
    AssignTask,
    CreateTask,
    FailTask,
    RecordAnalysis,
    StartAnalysis,
    StartTask,
    StartTests,
)
from events.work_reports import ImplementationProduced, TestsRun
from infra.adapters.http.dashboard.pages import CSP, MAX_ARTIFACT_SHOWN, SIDE_CACHE_SECONDS
from infra.adapters.http.status_server import ApiServer
from projections.live import LiveReadModel
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)
C = "coordinator"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'
TRACE_ID, SPAN_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
SECRET = "gh" + "p_" + "Z" * 36  # a GitHub-token-shaped value, made at run time


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def drive(store: EventStore, machine, state, last: int, *commands) -> tuple[object, int, list[int]]:
    seqs: list[int] = []
    for command in commands:
        events = machine.decide(state, command)
        seqs += await store.append(events, expected_last_seq=last)
        state, last = machine.fold(events, state), seqs[-1]
    return state, last, seqs


def create(tid: str, t: float, title: str = "", repo: str = "acme/shop") -> CreateTask:
    issue = IssueRef(source="local", repo=repo, number=int(tid.rsplit("-", 1)[1]), title=title or f"issue {tid}",
                     url="javascript:alert(1)")
    return CreateTask(at=at(t), actor=C, task_id=tid, issue=issue)


def analysed(t: float, specialty: str = "backend") -> list:
    return [StartAnalysis(at=at(t), actor=C),
            RecordAnalysis(at=at(t), actor=C, analysis=Analysis(specialty=specialty, usage=Usage(dollars=0.02)))]


class World(msgspec.Struct):
    seqs: dict[str, list[int]]
    refs: dict[str, str]
    last: int


async def build_world(store: EventStore, nc) -> World:
    """An agent; acme_shop-1 (hostile title) worked on, tests failed; three more queued
    tasks in two repositories; artifacts in the object store; a heartbeat."""
    ns = store.ns
    obs = await nc.jetstream().object_store(ns.artifacts_bucket)
    refs = {}
    await obs.put("diffs/acme_shop-1/1.diff", f"--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-old\n+new {SECRET}\n".encode())
    refs["diff"] = artifact_ref(ns.artifacts_bucket, "diffs/acme_shop-1/1.diff")
    await obs.put("logs/acme_shop-1/1/tests.log", ("FAILED test_x <b>bold</b>\n" * 10 + "x" * MAX_ARTIFACT_SHOWN).encode())
    refs["log"] = artifact_ref(ns.artifacts_bucket, "logs/acme_shop-1/1/tests.log")
    await obs.put("diffs/other/1.diff", b"not this task's")
    refs["other"] = artifact_ref(ns.artifacts_bucket, "diffs/other/1.diff")

    seqs: dict[str, list[int]] = {}
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    with trace.use_span(span):  # every append carries this traceparent in its headers
        agent, alast, seqs["a-1"] = await drive(store, agent_state, None, 0, RegisterAgent(
            at=at(0), actor="a-1", agent_id="a-1", specialties=("backend",), capacity=2))
        t1, last1, seqs["acme_shop-1"] = await drive(
            store, task_state, None, 0, create("acme_shop-1", 0, HOSTILE), *analysed(1),
            AssignTask(at=at(2), actor=C, agent_id="a-1"), StartTask(at=at(3), actor="a-1", agent_id="a-1"))
        agent, alast, more = await drive(
            store, agent_state, agent, alast, StartAgentTask(at=at(3), actor="a-1", task_id="acme_shop-1", attempt=1),
            ReportWork(at=at(5), actor="a-1", task_id="acme_shop-1", attempt=1, report=ImplementationProduced(
                coder="scripted", summary=HOSTILE, files_changed=("x.py",), diff_ref=refs["diff"])),
            ReportWork(at=at(8), actor="a-1", task_id="acme_shop-1", attempt=1, report=TestsRun(
                command=("pytest",), exit_code=1, passed=2, failed=1, duration=1.5, log_ref=refs["log"])))
        seqs["a-1"] += more
        t1, last1, more = await drive(
            store, task_state, t1, last1,
            StartTests(at=at(6), actor="a-1", agent_id="a-1", files_changed=("x.py",), diff_ref=refs["diff"]),
            FailTask(at=at(9), actor="a-1", agent_id="a-1", reason=f"1 test failed {HOSTILE}", phase="testing",
                     retryable=False))
        seqs["acme_shop-1"] += more
    for tid, t, repo in (("acme_shop-2", 10, "acme/shop"), ("acme_shop-3", 20, "acme/shop"),
                         ("other_lib-4", 30, "other/lib")):
        _, _, seqs[tid] = await drive(store, task_state, None, 0, create(tid, t, repo=repo), *analysed(t + 1))
    hb = Heartbeat(agent_id="a-1", at=datetime.now(UTC) - timedelta(seconds=3), active_tasks=("acme_shop-1",), seq=4)
    await nc.jetstream().publish(ns.heartbeat_subject("a-1"), msgspec.json.encode(hb))
    return World(seqs=seqs, refs=refs, last=max(max(s) for s in seqs.values()))


@pytest_asyncio.fixture
async def served(store, nc):
    world = await build_world(store, nc)
    server = ApiServer(store, "127.0.0.1", 0, materialize=False)
    await server.start()  # the projection has caught up with the world
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            yield client, world, server
    finally:
        await server.stop()


def text_of(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", html))


def assert_page(r: httpx.Response, page: str) -> str:
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP and "default-src 'self'" in CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    assert f'<body data-page="{page}">' in html
    assert re.search(r'<meta name="ccc-last-seq" content="\d+">', html)
    assert '<script src="/static/live.js" defer></script>' in html and 'id="live"' in html
    for tag in re.findall(r"<[a-zA-Z][^>]*>", html):  # no inline handler: the CSP would refuse it
        assert not re.search(r"\son[a-z]+\s*=", re.sub(r'"[^"]*"', '""', tag)), tag
    assert "style=" not in html  # the CSP allows no inline style either
    return html


async def test_pages_render_over_real_http_beside_the_json_api(served):
    client, world, _ = served
    html = assert_page(await client.get("/"), "overview")
    assert 'data-live="overview"' in html
    text = text_of(html)
    assert "Tasks by state" in text and "Queues" in text and "dead letters" in text
    assert re.search(r'<tr data-specialty="backend">\s*<td><a [^>]+>backend</a></td>\s*<td class="num">3</td>', html)
    assert f'content="{world.last}"' in html

    html = assert_page(await client.get("/board"), "board")
    assert '<div id="board" data-live="board">' in html
    for status in task_state.TASK_STATUSES:
        assert re.search(f'<section class="column[^"]*" data-state="{status}"', html)
    failed = re.search(r'<section class="column[^"]*" data-state="failed".*?</section>', html, re.DOTALL).group(0)
    assert 'data-task="acme_shop-1"' in failed and 'href="/tasks/acme_shop-1"' in failed

    html = assert_page(await client.get("/agents/a-1"), "agent")
    assert 'data-live="agent"' in html and "acme_shop-1" in html
    assert re.search(r"heartbeat</dt><dd class=\"heartbeat\">\s*<time[^>]*>\d+s ago", html)

    css = await client.get("/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    cluster = await client.get("/api/v1/cluster")  # the JSON API is unchanged beside the pages
    assert cluster.status_code == 200 and cluster.json()["tasks_total"] == 4
    assert (await client.get("/api/v1/tasks/nope")).json()["error"] == "not_found"
    openapi = (await client.get("/schema/openapi.json")).json()
    pages = [p for p in openapi["paths"] if p == "/" or p.startswith(("/board", "/tasks", "/agents", "/static"))]
    assert not pages  # the pages are not part of the API's schema


async def test_task_page_timeline_traceparent_and_failure(served):
    client, world, _ = served
    html = assert_page(await client.get("/tasks/acme_shop-1"), "task")
    assert 'data-live="task"' in html
    seqs = [int(s) for s in re.findall(r'<li class="event[^"]*" data-seq="(\d+)"', html)]
    task_seqs = world.seqs["acme_shop-1"]
    assert set(task_seqs) <= set(seqs) and seqs == sorted(seqs)
    assert len(seqs) == len(task_seqs) + 3  # + the agent's task_started and its two reports
    scrubber = re.search(r'<input type="range" id="scrubber"[^>]*>', html, re.DOTALL).group(0)
    assert f'min="{task_seqs[0]}"' in scrubber and f'max="{task_seqs[-1]}"' in scrubber
    assert f'value="{task_seqs[-1]}"' in scrubber
    assert re.search(r'<div id="replay">\s*<div class="replayed" data-status="failed"', html)
    assert TRACEPARENT in html
    text = text_of(html)
    assert "1 test failed" in text and "testing" in text
    assert "Time in each state" in text and "Attempts" in text and "Test runs" in text
    # the forms the task's state allows (failed, not retryable: cancel, no retry; no pull request)
    assert 'id="cancel-form"' in html and 'id="retry-form"' not in html and 'id="merge-form"' not in html
    form = re.search(r'<form id="cancel-form".*?</form>', html, re.DOTALL).group(0)
    assert 'action="/ui/tasks/acme_shop-1/cancel"' in form and 'name="csrf"' in form and 'type="submit"' in form
    assert 'href="javascript:' not in html  # the issue's url is not a web link: shown as text


async def test_task_page_says_why_its_agent_and_where_a_queued_task_stands(served, store):
    client, _, server = served
    why = "lane: new issue; urgency 1.0 (priority normal, waited 0s); a-1: backend specialist, the only one free"
    _, last, _ = await drive(store, task_state, None, 0, create("acme_shop-9", 40), *analysed(41),
                             AssignTask(at=at(42), actor=C, agent_id="a-1", why=why))
    await server.live.wait_for_seq(last, timeout=5)
    text = re.sub(r"\s+", " ", text_of(assert_page(await client.get("/tasks/acme_shop-9"), "task")))
    assert f"why this agent {why}" in text and "in the queue" not in text
    assert f"why {why}" in text  # the assignment's own details in the timeline
    text = re.sub(r"\s+", " ", text_of(assert_page(await client.get("/tasks/acme_shop-2"), "task")))
    assert re.search(r"in the queue lane: new issue; urgency \d+\.\d \(priority normal, waited [^)]+\)", text)
    assert "waiting waiting for the scheduler (a capable agent has a free slot)" in text
    assert "why this agent" not in text


async def test_escapes_a_hostile_title_everywhere(served):
    client, _, _ = served
    for path in ("/board", "/tasks/acme_shop-1", "/agents/a-1", "/board?fragment=board",
                 "/tasks/acme_shop-1?fragment=task", "/board?q=%3Cscript%3E"):
        html = (await client.get(path)).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;alert(" in html, path


async def test_board_filters_search_and_pages(served):
    client, _, _ = served

    def cards(html: str) -> list[str]:
        return re.findall(r'<article class="card" data-task="([^"]+)"', html)

    html = (await client.get("/board?state=queued")).text
    assert cards(html) == ["other_lib-4", "acme_shop-3", "acme_shop-2"]
    assert re.findall(r'<section class="column[^"]*" data-state="([^"]+)"', html) == ["queued"]
    assert cards((await client.get("/board?state=queued,failed&repo=acme/shop")).text) == [
        "acme_shop-3", "acme_shop-2", "acme_shop-1"]
    assert cards((await client.get("/board", params=[("state", "failed"), ("state", "queued"),
                                                     ("repo", "other/lib")])).text) == ["other_lib-4"]
    assert cards((await client.get("/board?agent=a-1")).text) == ["acme_shop-1"]
    assert cards((await client.get("/board?specialty=frontend")).text) == []
    assert cards((await client.get("/board?q=ALERT")).text) == ["acme_shop-1"]  # the title
    assert cards((await client.get("/board?q=other")).text) == ["other_lib-4"]  # the repository

    first = (await client.get("/board?limit=2")).text
    assert cards(first) == ["other_lib-4", "acme_shop-3"]
    older = re.search(r'<a rel="next" href="([^"]+)"', first).group(1)
    assert unescape(older) == "/board?limit=2&offset=2"
    second = (await client.get(unescape(older))).text
    assert cards(second) == ["acme_shop-2", "acme_shop-1"] and 'rel="prev"' in second and 'rel="next"' not in second
    # every page counts the whole filtered set per column
    assert re.search(r'data-state="queued".*?<span class="count">3</span>', second, re.DOTALL)

    for bad in ("/board?state=flying", "/board?specialty=magic", "/board?limit=0", "/board?offset=-1",
                "/board?limit=lots"):
        r = await client.get(bad)
        assert r.status_code == 400 and r.headers["content-type"].startswith("text/html"), bad
        assert r.headers["content-security-policy"] == CSP


async def test_unknown_task_and_agent_are_404_pages(served):
    client, _, _ = served
    for path in ("/tasks/acme_shop-999", "/agents/nobody", "/tasks/bad.id*", "/tasks/acme_shop-1/artifacts/x/y"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("text/html") and '<body data-page="error">' in r.text


async def test_fragments_are_the_live_elements_inner_html(served):
    client, world, _ = served
    for path, marker in (("/?fragment=overview", "Tasks by state"), ("/board?fragment=board", 'class="column"'),
                         ("/tasks/acme_shop-1?fragment=task", 'id="timeline"'),
                         ("/agents/a-1?fragment=agent", "Current work")):
        r = await client.get(path)
        assert r.status_code == 200, path
        assert "<html" not in r.text and "<body" not in r.text and marker in r.text, path
        assert r.headers["x-ccc-last-seq"] == str(world.last)
        assert r.headers["content-security-policy"] == CSP
    r = await client.get("/board?fragment=board&state=failed")
    assert re.findall(r'<section class="column[^"]*" data-state="([^"]+)"', r.text) == ["failed"]
    assert (await client.get("/board?fragment=task")).status_code == 400
    assert (await client.get("/?fragment=../../etc")).status_code == 400


async def test_replay_at_a_past_sequence_shows_that_state(served):
    client, world, _ = served
    created, analysing, analysed_seq, assigned, started, testing, failed = world.seqs["acme_shop-1"]
    expected = {created: "pending", analysing: "analyzing", analysed_seq: "queued", assigned: "assigned",
                started: "in_progress", testing: "testing", failed: "failed"}
    for seq, status in expected.items():
        r = await client.get(f"/tasks/acme_shop-1?fragment=replay&seq={seq}")
        assert r.status_code == 200 and "<html" not in r.text
        assert f'<div class="replayed" data-status="{status}" data-seq="{seq}">' in r.text, (seq, status)
    r = await client.get(f"/tasks/acme_shop-1?fragment=replay&seq={created - 1}")
    assert 'data-status="none"' in r.text
    # without JavaScript: the scrubber's form asks for the whole page at that sequence
    html = (await client.get(f"/tasks/acme_shop-1?seq={analysed_seq}")).text
    assert re.search(r'<div id="replay">\s*<div class="replayed" data-status="queued"', html)
    assert f'value="{analysed_seq}"' in re.search(r'<input type="range" id="scrubber"[^>]*>', html).group(0)
    assert (await client.get("/tasks/acme_shop-1?fragment=replay&seq=x")).status_code == 400


async def test_artifacts_are_masked_bounded_and_only_the_tasks_own(served):
    client, world, _ = served
    page = (await client.get("/tasks/acme_shop-1")).text
    diff_link = f'/tasks/acme_shop-1/artifacts/{quote(world.refs["diff"])}'
    assert f'href="{diff_link}"' in page
    r = await client.get(diff_link)
    html = assert_page(r, "artifact")
    assert SECRET not in html and "+new ***" in text_of(html)  # masked again on the way out
    assert '<span class="add">+new ***</span>' in html and '<span class="del">-old</span>' in html

    log = await client.get(f'/tasks/acme_shop-1/artifacts/{quote(world.refs["log"])}')
    assert log.status_code == 200 and "&lt;b&gt;bold&lt;/b&gt;" in log.text and "<b>bold" not in log.text
    assert "Only the first 512 KiB are shown" in text_of(log.text)
    assert len(log.text) < MAX_ARTIFACT_SHOWN + 20_000

    other = await client.get(f'/tasks/acme_shop-1/artifacts/{quote(world.refs["other"])}')
    assert other.status_code == 404  # in the bucket, but not named by this task's events
    # a link of an older version (``<bucket>/<name>``) still finds the artifact
    old = await client.get(f'/tasks/acme_shop-1/artifacts/{world.refs["diff"].replace(" ", "/", 1)}')
    assert old.status_code == 200 and "+new ***" in text_of(old.text)


async def test_a_new_event_shows_on_the_next_fetch(served, store):
    client, _, server = served
    tid = f"acme_shop-{uuid.uuid4().int % 1000 + 100}"
    _, _, seqs = await drive(store, task_state, None, 0, create(tid, 100, title="fresh one"))
    await server.live.wait_for_seq(seqs[-1])
    r = await client.get("/board?fragment=board&state=pending")
    assert f'data-task="{tid}"' in r.text and r.headers["x-ccc-last-seq"] == str(seqs[-1])
    html = (await client.get(f"/tasks/{tid}")).text
    assert re.search(r'data-status="pending"', html)


async def test_overview_counts_dead_letters_from_their_stream(served, nc, store):
    client, _, _ = served
    html = (await client.get("/?fragment=overview")).text
    assert re.search(r"<th>dead letters</th><td class=\"num\">0</td>", html) and 'data-kind="dead_letters"' not in html
    await nc.jetstream().publish(store.ns.dlq_subject("coordinator-intake"), b'{"reason":"poison"}')

    async def alerted() -> bool:  # (the count is asked at most every SIDE_CACHE_SECONDS)
        html = (await client.get("/?fragment=overview")).text
        return bool(re.search(r'<li class="alert alert-warning" data-kind="dead_letters">1 dead letter', html))

    await eventually(alerted, timeout=SIDE_CACHE_SECONDS + 5, interval=0.2)


async def test_a_dashboard_started_after_the_replay_still_shows_whole_histories(store, nc):
    """Built on a live model that is already running (its fold missed the past): a task's
    page reads the task's events from the log instead."""
    world = await build_world(store, nc)
    live = LiveReadModel(store)
    await live.start()
    server = ApiServer(store, "127.0.0.1", 0, live=live)
    try:
        await server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            html = (await client.get("/tasks/acme_shop-1")).text
        seqs = [int(s) for s in re.findall(r'<li class="event[^"]*" data-seq="(\d+)"', html)]
        assert set(world.seqs["acme_shop-1"]) <= set(seqs)
        assert re.search(r'<div id="replay">\s*<div class="replayed" data-status="failed"', html)
    finally:
        await server.stop()
        await live.stop()


async def test_static_files_and_the_favicon(served):
    client, _, _ = served
    for path, kind in (("/static/dashboard.css", "text/css"), ("/static/favicon.svg", "image/svg+xml"),
                       ("/favicon.ico", "image/svg+xml")):
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    assert (await client.get("/static/../pages.py")).status_code == 404
    assert (await client.get("/static/nothing.js")).status_code == 404
