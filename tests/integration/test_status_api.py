"""The status API against a real nats-server: events are appended through the real
store, the projection follows them, and every endpoint is checked over ASGI (and once
over real HTTP through uvicorn)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest
import pytest_asyncio

from events import agent_state, task_state
from events.agent_state import EnterMaintenance, RegisterAgent, StartAgentTask
from events.checks import CheckRun
from events.store import EventStore
from events.task import Analysis, IssueRef
from events.task_state import (
    AssignTask,
    CancelTask,
    CreateTask,
    RecordAnalysis,
    StartAnalysis,
    StartTask,
)
from infra.adapters.http.status_server import ApiServer
from infra.adapters.nats.connection import connect
from projections.fairness import FairnessPolicy
from projections.live import LiveReadModel
from projections.status_api import create_app
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def drive(store: EventStore, machine, state, last: int, *commands) -> tuple[object, int, list[int]]:
    """Decide and append commands one by one, as a writer would; returns the new
    state, the aggregate's last sequence and every sequence appended."""
    seqs: list[int] = []
    for command in commands:
        events = machine.decide(state, command)
        seqs += await store.append(events, expected_last_seq=last)
        state, last = machine.fold(events, state), seqs[-1]
    return state, last, seqs


def create(task_id: str, seconds: int) -> CreateTask:
    issue = IssueRef(source="local", repo="acme/shop", number=int(task_id.split("-")[1]),
                     title=f"issue {task_id}")
    return CreateTask(at=at(seconds), actor="coordinator", task_id=task_id, issue=issue)


def analysed(seconds: int, specialty: str) -> list:
    return [StartAnalysis(at=at(seconds), actor="coordinator"),
            RecordAnalysis(at=at(seconds), actor="coordinator", analysis=Analysis(specialty=specialty))]


class World(msgspec.Struct):
    seqs: dict[str, list[int]]  # aggregate id -> stream sequences of its events
    last: int


async def build_world(store: EventStore) -> World:
    """Two agents, four tasks in different states. By (created_at, task_id) the tasks
    are r-1 (t0), r-3 (t5), r-0 (t10), r-2 (t10)."""
    seqs: dict[str, list[int]] = {}
    c = "coordinator"
    back, last, seqs["a-back"] = await drive(store, agent_state, None, 0, RegisterAgent(
        at=at(0), actor="a-back", agent_id="a-back", specialties=("backend", "database"), capacity=2))
    _, _, seqs["a-front"] = await drive(store, agent_state, None, 0,
        RegisterAgent(at=at(0), actor="a-front", agent_id="a-front", specialties=("frontend",)),
        EnterMaintenance(at=at(1), actor="a-front", reason="upgrade"))
    _, _, seqs["r-1"] = await drive(store, task_state, None, 0, create("r-1", 0), *analysed(1, "backend"),
        AssignTask(at=at(2), actor=c, agent_id="a-back"),
        StartTask(at=at(3), actor="a-back", agent_id="a-back"))
    _, _, more = await drive(store, agent_state, back, last,
                             StartAgentTask(at=at(3), actor="a-back", task_id="r-1"))
    seqs["a-back"] += more
    _, _, seqs["r-2"] = await drive(store, task_state, None, 0, create("r-2", 10), *analysed(11, "frontend"))
    _, _, seqs["r-3"] = await drive(store, task_state, None, 0, create("r-3", 5))
    _, _, seqs["r-0"] = await drive(store, task_state, None, 0, create("r-0", 10), *analysed(11, "backend"),
        AssignTask(at=at(12), actor=c, agent_id="a-back"),
        CancelTask(at=at(13), actor="user", reason="duplicate", force=True))
    return World(seqs=seqs, last=max(max(s) for s in seqs.values()))


@pytest_asyncio.fixture
async def client(live):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(live, min_seq_timeout=0.5)),
                                 base_url="http://status") as client:
        yield client


@pytest_asyncio.fixture
async def idle_client(store):
    """For the HTTP surface alone (parameters, routing, schema): a projection that
    is never started, so it holds nothing and needs no stopping."""
    app = create_app(LiveReadModel(store))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://status") as client:
        yield client


@pytest_asyncio.fixture
async def world(store, live) -> World:
    world = await build_world(store)
    await live.wait_for_seq(world.last, timeout=5)
    return world


def ids(body: dict, key: str = "task_id") -> list[str]:
    return [item[key] for item in body["items"]]


async def test_task_list_order_filters_and_paging(client, world):
    body = (await client.get("/api/v1/tasks")).json()
    assert ids(body) == ["r-1", "r-3", "r-0", "r-2"]
    assert (body["total"], body["limit"], body["offset"], body["next_offset"]) == (4, 50, 0, None)
    assert body["last_seq"] == world.last
    first = body["items"][0]
    assert first["status"] == "in_progress" and first["agent_id"] == "a-back"
    assert first["applied_seq"] == world.seqs["r-1"][-1] and first["issue"]["repo"] == "acme/shop"
    assert {t["task_id"]: t["waiting"] for t in body["items"]} == {
        "r-1": "", "r-3": "waiting for analysis", "r-0": "",
        "r-2": "waiting for a frontend or general agent: none online (online: backend, database)"}

    async def listed(**params) -> list[str]:
        r = await client.get("/api/v1/tasks", params=params)
        assert r.status_code == 200, r.text
        return ids(r.json())

    assert await listed(state="queued") == ["r-2"]
    assert await listed(state="queued,pending") == ["r-3", "r-2"]
    assert await listed(state=["queued", "in_progress"]) == ["r-1", "r-2"]
    assert await listed(specialty="backend") == ["r-1", "r-0"]
    assert await listed(specialty="backend", state="cancelled") == ["r-0"]
    assert await listed(agent="a-back") == ["r-1", "r-0"]  # r-0 keeps its last assignee
    assert await listed(agent="a-back", state="in_progress") == ["r-1"]
    assert await listed(agent="nobody") == []

    page1 = (await client.get("/api/v1/tasks", params={"limit": 2})).json()
    assert ids(page1) == ["r-1", "r-3"] and page1["next_offset"] == 2 and page1["total"] == 4
    page2 = (await client.get("/api/v1/tasks", params={"limit": 2, "offset": 2})).json()
    assert ids(page2) == ["r-0", "r-2"] and page2["next_offset"] is None
    past = (await client.get("/api/v1/tasks", params={"offset": 10})).json()
    assert past["items"] == [] and past["total"] == 4


async def test_task_detail_and_events(client, world):
    r = await client.get("/api/v1/tasks/r-0")
    assert r.status_code == 200
    task = r.json()
    assert task["status"] == "cancelled" and task["status_reason"] == "duplicate"
    assert task["specialty"] == "backend" and task["version"] == 5
    assert task["applied_seq"] == world.seqs["r-0"][-1]
    assert task["created_at"] == "2026-02-01T09:00:10Z"

    events = (await client.get("/api/v1/tasks/r-1/events")).json()
    assert events["task_id"] == "r-1" and events["bad"] == []
    assert [e["seq"] for e in events["items"]] == world.seqs["r-1"]
    assert events["last_seq"] == world.seqs["r-1"][-1]
    assert [e["type"] for e in events["items"]] == [
        "task.created", "task.analysis_started", "task.analyzed", "task.assigned", "task.started"]
    assert events["items"][2]["specialty"] == "backend"
    assert events["items"][3]["agent_id"] == "a-back" and events["items"][3]["version"] == 4

    for path in ("/api/v1/tasks/nope", "/api/v1/tasks/nope/events"):
        r = await client.get(path)
        assert r.status_code == 404
        assert r.json() == {"error": "not_found", "detail": "no task 'nope'", "parameter": "task_id"}
    r = await client.get("/api/v1/tasks/a*b/events")  # never becomes a wildcard filter
    assert r.status_code == 400 and r.json()["parameter"] == "task_id"


async def test_tasks_say_what_they_wait_for(store, live):
    """``waiting`` on every task view: checks running (with how long, by the app's
    clock), needs a human, queued for merge, a file lease; the state's own fields are
    all still there."""
    head = "c0ffee" + "0" * 34
    c, a = "coordinator", "a-back"

    def to_pr(n: int, paths: tuple[str, ...] = ()) -> list:
        return [StartAnalysis(at=at(1), actor=c),
                RecordAnalysis(at=at(1), actor=c, analysis=Analysis(paths=paths)),
                AssignTask(at=at(2), actor=c, agent_id=a), StartTask(at=at(2), actor=a, agent_id=a),
                task_state.StartTests(at=at(3), actor=a, agent_id=a, files_changed=("app.py",)),
                task_state.OpenPullRequest(at=at(4), actor=a, agent_id=a, branch=f"ccc/{n}", pr_number=n,
                                           head_sha=head, base_branch="main")]

    green = CheckRun(name="test", conclusion="success")
    await drive(store, task_state, None, 0, create("p-1", 0), *to_pr(1, ("app.py",)))
    await drive(store, task_state, None, 0, create("p-2", 0), *to_pr(2), task_state.RecordChecks(
        at=at(9), actor=c, head_sha=head, checks=(CheckRun(name="ci", conclusion="action_required"),)))
    await drive(store, task_state, None, 0, create("p-3", 0), *to_pr(3), task_state.RecordChecks(
        at=at(9), actor=c, head_sha=head, checks=(green,)),
        task_state.ApprovePullRequest(at=at(10), actor=c, by="alice", merge_queue=True))
    _, last, _ = await drive(store, task_state, None, 0, create("p-4", 0), StartAnalysis(at=at(1), actor=c),
                             RecordAnalysis(at=at(1), actor=c, analysis=Analysis(paths=("app.py",))))
    await live.wait_for_seq(last, timeout=5)
    app = create_app(live, clock=lambda: at(4 + 125))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://status") as client:
        body = (await client.get("/api/v1/tasks")).json()
        one = (await client.get("/api/v1/tasks/p-1")).json()
        schema = (await client.get("/schema/openapi.json")).json()["components"]["schemas"]["TaskOut"]
    assert {t["task_id"]: t["waiting"] for t in body["items"]} == {
        "p-1": "checks running on c0ffee0 since 09:00:04 (2m)",
        "p-2": "needs a human: a maintainer approves the pending workflow run(s) on the pull request",
        "p-3": "queued for merge (position 1 of 1)",
        "p-4": "file lease: app.py held by p-1",
    }
    assert one["waiting"] == body["items"][0]["waiting"] and one["status"] == "checking"
    assert one["head_sha"] == head and one["paths"] == ["app.py"] and one["applied_seq"] > 0
    assert {"waiting", "applied_seq", "status", "head_sha"} <= set(schema["properties"])


async def test_the_task_view_says_why_its_agent_and_where_a_queued_task_stands(store, live):
    """``assigned_why`` (the scheduler's words on ``task.assigned``) on an assigned task;
    ``queue`` (its lane and urgency now) on a queued one, whose ``waiting`` names the
    repository limit of the policy the API was given (none given: no fairness reason)."""
    c = "coordinator"
    why = "lane: new issue; urgency 1.0 (priority normal, waited 0s); a-back: backend specialist, the only one free"
    await drive(store, task_state, None, 0, create("q-1", 0), *analysed(1, "backend"),
                AssignTask(at=at(2), actor=c, agent_id="a-back", why=why))
    _, last, _ = await drive(store, task_state, None, 0, create("q-2", 0), *analysed(3, "backend"))
    await live.wait_for_seq(last, timeout=5)
    for fairness, waiting in ((FairnessPolicy(repo_limit=1), "fairness: repository acme/shop at its limit (1 running)"),
                              (None, "waiting for an agent: none is online")):
        app = create_app(live, clock=lambda: at(3 + 720), fairness=fairness)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://status") as client:
            assigned = (await client.get("/api/v1/tasks/q-1")).json()
            queued = (await client.get("/api/v1/tasks/q-2")).json()
            schema = (await client.get("/schema/openapi.json")).json()["components"]["schemas"]["TaskOut"]
        assert (assigned["assigned_why"], assigned["queue"]) == (why, "")
        assert queued["queue"] == "lane: new issue; urgency 3.4 (priority normal, waited 12m)"
        assert queued["waiting"] == waiting and queued["assigned_why"] == ""
        assert {"queue", "assigned_why"} <= set(schema["properties"])


async def test_agents(client, world):
    body = (await client.get("/api/v1/agents")).json()
    assert ids(body, "agent_id") == ["a-back", "a-front"] and body["total"] == 2
    assert ids((await client.get("/api/v1/agents", params={"state": "maintenance"})).json(),
               "agent_id") == ["a-front"]
    assert ids((await client.get("/api/v1/agents", params={"specialty": "database"})).json(),
               "agent_id") == ["a-back"]
    assert ids((await client.get("/api/v1/agents", params={"state": "idle,busy"})).json(),
               "agent_id") == ["a-back"]

    agent = (await client.get("/api/v1/agents/a-back")).json()
    assert agent["status"] == "busy" and agent["active_tasks"] == ["r-1"] and agent["capacity"] == 2
    assert agent["applied_seq"] == world.seqs["a-back"][-1]
    front = (await client.get("/api/v1/agents/a-front")).json()
    assert front["status"] == "maintenance" and front["reason"] == "upgrade"

    tasks = (await client.get("/api/v1/agents/a-back/tasks")).json()
    assert ids(tasks) == ["r-1", "r-0"] and tasks["total"] == 2  # ever assigned, by created_at
    cancelled = (await client.get("/api/v1/agents/a-back/tasks", params={"state": "cancelled"})).json()
    assert ids(cancelled) == ["r-0"]
    assert (await client.get("/api/v1/agents/a-front/tasks")).json()["items"] == []

    for path in ("/api/v1/agents/ghost", "/api/v1/agents/ghost/tasks"):
        r = await client.get(path)
        assert r.status_code == 404
        assert r.json() == {"error": "not_found", "detail": "no agent 'ghost'", "parameter": "agent_id"}


async def test_cluster(client, world):
    view = (await client.get("/api/v1/cluster")).json()
    assert view["tasks_total"] == 4
    assert view["tasks_by_status"] == {"cancelled": 1, "in_progress": 1, "pending": 1, "queued": 1}
    assert view["tasks_by_specialty"] == {"backend": 2, "frontend": 1, "general": 1}
    assert view["agents_total"] == 2
    assert view["agents_by_status"] == {"busy": 1, "maintenance": 1}
    assert (view["capacity"], view["active"], view["load"]) == (3, 1, round(1 / 3, 4))
    assert view["last_seq"] == world.last and view["bad_events"] == 0


@pytest.mark.parametrize("path,params,parameter", [
    ("/api/v1/tasks", {"state": "bogus"}, "state"),
    ("/api/v1/tasks", {"state": "queued,bogus"}, "state"),
    ("/api/v1/tasks", {"specialty": "wizardry"}, "specialty"),
    ("/api/v1/tasks", {"limit": 0}, "limit"),
    ("/api/v1/tasks", {"limit": 501}, "limit"),
    ("/api/v1/tasks", {"limit": "ten"}, "limit"),
    ("/api/v1/tasks", {"offset": -1}, "offset"),
    ("/api/v1/tasks", {"min_seq": "soon"}, "min_seq"),
    ("/api/v1/agents", {"state": "pending"}, "state"),  # a task status, not an agent's
    ("/api/v1/agents/a-1/tasks", {"limit": 1000}, "limit"),
])
async def test_bad_parameters_are_400_naming_the_parameter(idle_client, path, params, parameter):
    r = await idle_client.get(path, params=params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_request" and body["parameter"] == parameter
    assert parameter in body["detail"]


async def test_unknown_route_is_a_json_404(idle_client):
    r = await idle_client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


async def test_openapi_document_lists_every_endpoint(idle_client):
    r = await idle_client.get("/schema/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["info"]["title"] == "claude-code-cluster status API"
    assert doc["info"]["version"] == "1.0.0" and "min_seq" in doc["info"]["description"]
    assert set(doc["paths"]) == {
        "/api/v1/tasks", "/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}/events",
        "/api/v1/agents", "/api/v1/agents/{agent_id}", "/api/v1/agents/{agent_id}/tasks",
        "/api/v1/cluster", "/api/v1/bad-events", "/health",
    }
    params = {p["name"] for p in doc["paths"]["/api/v1/tasks"]["get"]["parameters"]}
    assert params == {"state", "specialty", "agent", "limit", "offset", "min_seq"}
    assert "404" in doc["paths"]["/api/v1/tasks/{task_id}"]["get"]["responses"]
    assert "applied_seq" in doc["components"]["schemas"]["TaskOut"]["properties"]


async def test_bad_events_are_visible_and_do_not_stop_the_projection(nc, ns, store):
    js = nc.jetstream()
    garbage = await js.publish(ns.subject("task.x-1.created"), b"not json")  # before the projection starts
    live = LiveReadModel(store)
    await live.start()
    try:
        unknown = await js.publish(ns.subject("task.x-1.exploded"), msgspec.json.encode(
            {"type": "task.exploded", "task_id": "x-1", "version": 1}))  # seen by the follower
        _, good, _ = await drive(store, task_state, None, 0, create("x-2", 0))
        transport = httpx.ASGITransport(app=create_app(live))
        async with httpx.AsyncClient(transport=transport, base_url="http://status") as client:
            r = await client.get("/api/v1/tasks/x-2", params={"min_seq": good})
            assert r.status_code == 200 and r.json()["applied_seq"] == good  # later events still apply

            bad = (await client.get("/api/v1/bad-events")).json()
            assert bad["count"] == 2
            assert [b["seq"] for b in bad["items"]] == [garbage.seq, unknown.seq]
            assert [b["subject"] for b in bad["items"]] == [
                ns.subject("task.x-1.created"), ns.subject("task.x-1.exploded")]
            assert bad["items"][0]["preview"] == "not json" and bad["items"][0]["error"]
            assert "exploded" in bad["items"][1]["error"]

            assert (await client.get("/api/v1/cluster")).json()["bad_events"] == 2
            assert (await client.get("/health")).json()["bad_events"] == 2
            assert (await client.get("/api/v1/tasks/x-1")).status_code == 404
            # the log view of x-1 shows what is there, undecodable as it is
            events = (await client.get("/api/v1/tasks/x-1/events")).json()
            assert events["items"] == [] and [b["seq"] for b in events["bad"]] == [garbage.seq, unknown.seq]
    finally:
        await live.stop()


async def test_min_seq_reads_your_writes(store, live, client):
    start = await store.last_seq()
    # ask for the next sequence before it exists: the request waits for the append
    pending = asyncio.create_task(client.get("/api/v1/tasks/w-1", params={"min_seq": start + 1}))
    _, seq, _ = await drive(store, task_state, None, 0, create("w-1", 0))
    assert seq == start + 1
    r = await pending
    assert r.status_code == 200 and r.json()["task_id"] == "w-1" and r.json()["applied_seq"] == seq

    listed = (await client.get("/api/v1/tasks", params={"min_seq": seq})).json()
    assert listed["total"] == 1 and listed["last_seq"] >= seq

    r = await client.get("/api/v1/tasks", params={"min_seq": seq + 1000})  # never comes
    assert r.status_code == 504
    assert r.json()["error"] == "gateway_timeout" and r.json()["parameter"] == "min_seq"
    assert str(seq + 1000) in r.json()["detail"]


async def test_health_ok_lagging_and_degraded(nats_url, admin_kit, ns, store, live, client):
    _, last, _ = await drive(store, task_state, None, 0, create("h-1", 0), *analysed(1, "testing"))
    await live.wait_for_seq(last, timeout=5)
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "nats_connected": True, "last_seq": last,
                        "stream_last_seq": last, "lag": 0, "bad_events": 0,
                        "projection_following": True}

    idle = LiveReadModel(store)  # never started: it has applied nothing, so it lags
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(idle)),
                                 base_url="http://status") as c:
        lagging = (await c.get("/health")).json()
    assert (lagging["status"], lagging["last_seq"], lagging["lag"]) == ("ok", 0, last)

    own = await connect(nats_url, name="health-test", reconnect=False, kit=admin_kit)
    other = LiveReadModel(EventStore(own, ns))
    await other.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(other)),
                                     base_url="http://status") as c:
            assert (await c.get("/health")).status_code == 200
            await own.close()
            r = await c.get("/health")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "degraded" and body["nats_connected"] is False
            assert body["last_seq"] == last and body["lag"] == 0
            # the projection still answers from memory while NATS is away
            assert (await c.get("/api/v1/tasks/h-1")).json()["specialty"] == "testing"
    finally:
        await other.stop()


async def test_api_server_over_real_http(store):
    _, seq, _ = await drive(store, task_state, None, 0, create("s-1", 0))
    server = ApiServer(store, "127.0.0.1", 0, materialize=True)
    port = await server.start()
    try:
        assert port > 0 and server.url == f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            health = await http.get("/health")
            assert health.status_code == 200 and health.json()["last_seq"] == seq
            tasks = (await http.get("/api/v1/tasks")).json()
            assert ids(tasks) == ["s-1"] and tasks["items"][0]["applied_seq"] == seq
            _, seq2, _ = await drive(store, task_state, None, 0, create("s-2", 1))
            r = await http.get("/api/v1/tasks/s-2", params={"min_seq": seq2})
            assert r.status_code == 200 and r.json()["status"] == "pending"
            # the server adds /metrics: the log's facts and the API's own requests
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            assert 'claude_api_requests_total{endpoint="/api/v1/tasks",method="GET",status="200"} 1.0' \
                in metrics.text
            assert 'claude_event_log_applied_seq{projection="read_model"}' in metrics.text
    finally:
        await server.stop()
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=2) as http:
            await http.get(f"{server.url}/health")


async def test_api_server_serves_until_cancelled(store):
    busy = ApiServer(store, "127.0.0.1", 0, materialize=False)
    port = await busy.start()
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{busy.url}/health")).status_code == 200
        with pytest.raises(OSError):  # a port in use is an error, not a process exit
            await ApiServer(store, "127.0.0.1", port, materialize=False).start()
    finally:
        await busy.stop()
    # the port is free again: another server takes it, serves until cancelled, then stops
    server = ApiServer(store, "127.0.0.1", port, materialize=False)
    await server.start()
    task = asyncio.create_task(server.serve_forever())
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/health")).json()["status"] == "ok"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def refused() -> bool:
        try:
            async with httpx.AsyncClient(timeout=1) as http:
                await http.get(f"http://127.0.0.1:{port}/health")
        except httpx.ConnectError:
            return True
        return False

    await eventually(refused, timeout=5)
