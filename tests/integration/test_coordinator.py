"""The coordinator against a real nats-server, with agents played by the test
(appending the agent events a real agent would)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from actors.coordinator import Coordinator, CoordinatorConfig
from events import agent_state as ag
from events.codec import encode
from events.issue import IssueOpened, IssuePullRequestMerged
from events.work_reports import ImplementationProduced, PullRequestOpened, WorkFailed
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)


def now() -> datetime:
    return datetime.now(timezone.utc)


async def publish_issue(nc, ns, event) -> None:
    await nc.jetstream().publish(ns.subject(event.rel_subject), encode(event),
                                 headers={"Nats-Msg-Id": event.event_id})


def opened(number: int, title: str, body: str = "", labels=(), repo="acme/app",
           author_association="OWNER") -> IssueOpened:
    # OWNER explicitly: a fact that does not say who wrote it is refused at intake
    return IssueOpened(event_id=f"test:{repo}#{number}", repo=repo, number=number, title=title,
                       body=body, labels=tuple(labels), occurred_at=now(), author="tester",
                       author_association=author_association)


class FakeAgent:
    """Writes exactly what a real agent writes to its own aggregate."""

    def __init__(self, store, agent_id, specialties=("backend",), capacity=1, clearance="internal"):
        self.store, self.id = store, agent_id
        self.specialties, self.capacity, self.clearance = specialties, capacity, clearance

    async def do(self, command) -> None:
        state, last = await self.store.load_agent(self.id)
        await self.store.append(ag.decide(state, command), expected_last_seq=last)

    async def register(self):
        await self.do(ag.RegisterAgent(at=now(), actor=self.id, agent_id=self.id,
                                       specialties=self.specialties, capacity=self.capacity,
                                       clearance=self.clearance))

    async def start(self, task_id, attempt=1):
        await self.do(ag.StartAgentTask(at=now(), actor=self.id, task_id=task_id, attempt=attempt))

    async def report(self, task_id, report, attempt=1):
        await self.do(ag.ReportWork(at=now(), actor=self.id, task_id=task_id, attempt=attempt, report=report))

    async def release(self, task_id, outcome="done", attempt=1):
        await self.do(ag.ReleaseAgentTask(at=now(), actor=self.id, task_id=task_id, outcome=outcome,
                                          attempt=attempt))


@pytest.fixture
async def coordinator(nc, ns, store):
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, retry_base=0.05, retry_max=0.2))
    await c.start()
    yield c
    await c.stop()


def status(c, task_id):
    t = c.model.tasks.get(task_id)
    return t.status if t else None


async def test_issue_becomes_a_queued_task_then_assigned_when_an_agent_appears(nc, ns, store, coordinator):
    await publish_issue(nc, ns, opened(1, "Fix the API endpoint for users", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-1") == "queued")
    task = coordinator.model.tasks["acme_app-1"]
    assert task.specialty == "backend" and any("label 'backend'" in r for r in task.reasons)
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await eventually(lambda: status(coordinator, "acme_app-1") == "assigned")
    assert coordinator.model.tasks["acme_app-1"].agent_id == "agent-1"


async def test_repeated_issue_event_is_one_task(nc, ns, store, coordinator):
    for i in range(5):
        ev = opened(2, "Add docs")
        await nc.jetstream().publish(ns.subject(ev.rel_subject), encode(ev),
                                     headers={"Nats-Msg-Id": f"delivery-{i}"})  # distinct deliveries
    await eventually(lambda: status(coordinator, "acme_app-2") == "queued")
    await coordinator.live.catch_up()
    loaded = await store.load(ns.task_filter("acme_app-2"))
    # the rules answer at once: created with their analysis, queued, in one event
    assert [type(e.event).__name__ for e in loaded.events] == ["TaskCreated"]
    assert loaded.events[0].event.analysis is not None and loaded.events[0].event.analyser == "rules"


async def test_full_happy_path_through_reports(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(3, "Fix crash in server handler", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-3") == "assigned")
    await agent.start("acme_app-3")
    await eventually(lambda: status(coordinator, "acme_app-3") == "in_progress")
    await agent.report("acme_app-3", ImplementationProduced(files_changed=["app.py"], diff_stat="1 file"))
    await eventually(lambda: status(coordinator, "acme_app-3") == "testing")
    await agent.report("acme_app-3", PullRequestOpened(branch="ccc/task-acme_app-3-fix", tests_passed=3))
    await eventually(lambda: status(coordinator, "acme_app-3") == "checking")
    await agent.release("acme_app-3")
    await publish_issue(nc, ns, IssuePullRequestMerged(event_id="m3", repo="acme/app", number=3, occurred_at=now()))
    await eventually(lambda: status(coordinator, "acme_app-3") == "completed")


async def test_routing_by_specialty_and_dependencies(nc, ns, store, coordinator):
    fe, be = FakeAgent(store, "fe", ("frontend",), capacity=2), FakeAgent(store, "be", ("backend",), capacity=2)
    await fe.register()
    await be.register()
    await publish_issue(nc, ns, opened(10, "Button CSS broken", labels=["frontend"]))
    await publish_issue(nc, ns, opened(11, "Add API endpoint", body="depends on #12", labels=["backend"]))
    await publish_issue(nc, ns, opened(12, "Database migration", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-10") == "assigned"
                     and status(coordinator, "acme_app-12") == "assigned")
    assert coordinator.model.tasks["acme_app-10"].agent_id == "fe"
    assert coordinator.model.tasks["acme_app-12"].agent_id == "be"
    assert status(coordinator, "acme_app-11") == "queued"  # waits for #12
    # finish #12
    await be.start("acme_app-12")
    await eventually(lambda: status(coordinator, "acme_app-12") == "in_progress")
    await be.report("acme_app-12", ImplementationProduced())
    await eventually(lambda: status(coordinator, "acme_app-12") == "testing")
    await be.report("acme_app-12", PullRequestOpened(branch="b"))
    await be.release("acme_app-12")
    await eventually(lambda: status(coordinator, "acme_app-12") == "checking")
    assert status(coordinator, "acme_app-11") == "queued"
    await publish_issue(nc, ns, IssuePullRequestMerged(event_id="m12", repo="acme/app", number=12, occurred_at=now()))
    await eventually(lambda: status(coordinator, "acme_app-11") == "assigned")
    assert coordinator.model.tasks["acme_app-11"].agent_id == "be"


async def test_failure_retries_with_backoff_then_fails_for_good(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(20, "Fix flaky server test", labels=["backend"]))
    for attempt in (1, 2, 3):
        await eventually(lambda: status(coordinator, "acme_app-20") == "assigned"
                         and coordinator.model.tasks["acme_app-20"].attempt == attempt)
        await agent.start("acme_app-20", attempt)
        await eventually(lambda: status(coordinator, "acme_app-20") == "in_progress")
        await agent.report("acme_app-20", ImplementationProduced(), attempt=attempt)
        await eventually(lambda: status(coordinator, "acme_app-20") == "testing")
        await agent.report("acme_app-20", WorkFailed(phase="testing", reason="2 tests failed"),
                           attempt=attempt)
        await agent.release("acme_app-20", "failed", attempt)
    await eventually(lambda: status(coordinator, "acme_app-20") == "failed")
    task = coordinator.model.tasks["acme_app-20"]
    assert task.attempt == 3 and task.failure_reason == "2 tests failed"


async def test_lost_agent_tasks_are_requeued_and_reassigned(nc, ns, store):
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=0.3))
    await c.start()
    try:
        a1, a2 = FakeAgent(store, "a1"), FakeAgent(store, "a2")
        await a1.register()
        await publish_issue(nc, ns, opened(30, "server bug", labels=["backend"]))
        await eventually(lambda: status(c, "acme_app-30") == "assigned")
        await a1.start("acme_app-30")
        await eventually(lambda: status(c, "acme_app-30") == "in_progress")
        # a1 never heartbeats: after the timeout it is offline and its task goes back
        await a2.register()
        await nc.jetstream().publish(ns.heartbeat_subject("a2"), b"{}")

        async def a2_alive():
            await nc.jetstream().publish(ns.heartbeat_subject("a2"), b"{}")
            t = c.model.tasks["acme_app-30"]
            return t.agent_id == "a2" and t.status == "assigned"
        await eventually(a2_alive, timeout=15)
        assert c.model.agents["a1"].status == "offline"
        assert c.model.tasks["acme_app-30"].attempt == 2
        # the stale agent's late report is refused and does not corrupt the task
        with pytest.raises(Exception):
            await a1.report("acme_app-30", PullRequestOpened(branch="b"))
    finally:
        await c.stop()


async def test_cancel_while_agent_works(nc, ns, store, coordinator):
    from events.issue import IssueCancelRequested
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(40, "backend thing", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-40") == "assigned")
    await agent.start("acme_app-40")
    await eventually(lambda: status(coordinator, "acme_app-40") == "in_progress")
    cancel = IssueCancelRequested(event_id="c40", repo="acme/app", number=40, occurred_at=now(),
                                  author="tester", author_association="OWNER")
    await publish_issue(nc, ns, cancel)
    await eventually(lambda: coordinator.model.tasks["acme_app-40"].cancel_requested)
    await agent.release("acme_app-40", "cancelled")
    await eventually(lambda: status(coordinator, "acme_app-40") == "cancelled")


async def test_two_coordinators_never_double_assign(nc, ns, store):
    c1 = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60))
    c2 = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60))
    await c1.start()
    await c2.start()
    try:
        agents = [FakeAgent(store, f"ag{i}", ("backend", "general"), capacity=3) for i in range(3)]
        for a in agents:
            await a.register()
        for n in range(1, 13):
            await publish_issue(nc, ns, opened(100 + n, f"server issue {n}", labels=["backend"]))
        ids = [f"acme_app-{100 + n}" for n in range(1, 13)]
        # no stuck task: every one is analysed, and at least the 9 slots are used
        await eventually(lambda: all(status(c1, t) in ("queued", "assigned") for t in ids)
                         and sum(status(c1, t) == "assigned" for t in ids) >= 9, timeout=20)
        await c1.live.catch_up()
        for task_id in ids:
            loaded = await store.load(ns.task_filter(task_id))
            kinds = [type(e.event).__name__ for e in loaded.events]
            assert kinds.count("TaskCreated") == 1
            assert kinds.count("TaskAssigned") <= 1  # never two assignments in one attempt
        # Each coordinator books agent slots from its own view, so between two of them an
        # agent can be offered more than its capacity; a real agent declines the extra
        # task, which goes back to Queued (tests/e2e/test_actors.py runs real agents).
    finally:
        await c1.stop()
        await c2.stop()


async def test_poison_messages_are_parked_and_processing_continues(nc, ns, store, coordinator):
    from events.dead_letter import dead_letter_decoder

    js = nc.jetstream()
    poison = [
        (ns.subject("issue.local.acme_app.50.opened"), b"not json"),
        (ns.subject("issue.local.acme_app.51.opened"), b'{"type":"issue.teleported"}'),
        (ns.subject("issue.local.acme_app.52.opened"), b'{"type":"issue.opened","event_id":"x","repo":"acme/app"}'),
        (ns.subject("issue.local.acme_app.53.opened"), b"{" + b" " * (300 * 1024) + b"}"),  # oversize
        (ns.subject("agent.ghost.registered"), b"\xff\xfe garbage"),
    ]
    seqs = [(await js.publish(s, d)).seq for s, d in poison]
    await publish_issue(nc, ns, opened(54, "A real issue after the poison", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-54") == "queued")

    async def parked() -> list:
        letters = []
        try:
            info = await js.stream_info(ns.dlq_stream)
        except Exception:  # noqa: BLE001
            return letters
        for seq in range(1, info.state.last_seq + 1):
            letters.append(dead_letter_decoder.decode((await js.get_msg(ns.dlq_stream, seq)).data))
        return letters

    await eventually(lambda: _count(parked, 5), timeout=15)
    letters = await parked()
    assert {(d.stream, d.seq) for d in letters} == {
        (ns.issues_stream, seqs[0]), (ns.issues_stream, seqs[1]), (ns.issues_stream, seqs[2]),
        (ns.issues_stream, seqs[3]), (ns.events_stream, seqs[4])}
    assert all(d.reason == "poison" and d.error for d in letters)
    assert any("oversize" in d.error for d in letters)


def _count(parked, n):
    async def check():
        return len(await parked()) >= n
    return check()


async def test_changes_requested_retries_with_the_review_as_guidance(nc, ns, store, coordinator):
    from events.issue import IssueChangesRequested
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(60, "server endpoint", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-60") == "assigned")
    await agent.start("acme_app-60")
    await agent.report("acme_app-60", ImplementationProduced())
    await agent.report("acme_app-60", PullRequestOpened(branch="ccc/task-acme_app-60-server"))
    await agent.release("acme_app-60")
    await eventually(lambda: status(coordinator, "acme_app-60") == "checking")
    await publish_issue(nc, ns, IssueChangesRequested(
        event_id="review-1", repo="acme/app", number=60, occurred_at=now(), pr_number=60,
        branch="ccc/task-acme_app-60-server", body="Please add a test for the empty case.", author="maria",
        author_association="MEMBER"))
    await eventually(lambda: coordinator.model.tasks["acme_app-60"].attempt == 2
                     and status(coordinator, "acme_app-60") in ("queued", "assigned"))
    task = coordinator.model.tasks["acme_app-60"]
    assert "Please add a test for the empty case." in task.guidance
    assert task.agent_id in (None, "agent-1")


@pytest.mark.parametrize("redelivered", [True, False], ids=["issue-redelivered", "reconciled-on-start"])
async def test_an_intake_cut_short_by_a_crash_is_finished(nc, ns, store, redelivered):
    """The intake writes its chain one event at a time (an atomic batch would serialise
    intake at ~300/s in the server): created (with the rules' analysis) -> assigned, or
    created -> analysis started -> analysed -> assigned for an analyser that takes time.
    A coordinator that died after the first two of the long chain leaves a legal prefix;
    its successor finishes it, from the redelivered issue message or, if that is gone,
    from the log alone."""
    from events import task_state as ts
    from events.task import IssueRef

    issue = opened(7, "Fix the API endpoint", labels=["backend"])
    ref = IssueRef(source=issue.source, repo=issue.repo, number=issue.number, title=issue.title,
                   labels=issue.labels)
    state, events = None, []
    for command in (ts.CreateTask(at=now(), actor="coordinator", task_id="acme_app-7", issue=ref),
                    ts.StartAnalysis(at=now(), actor="coordinator")):
        for e in ts.decide(state, command):
            state = ts.evolve(state, e)
            events.append(e)
    for e in events:  # one at a time, as the intake writes them
        await store.append([e], expected_last_seq=(await store.load_task("acme_app-7"))[1])
    if redelivered:
        await publish_issue(nc, ns, issue)  # not acked: the dead coordinator never finished it
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, retry_base=0.05, retry_max=0.2))
    await c.start()
    try:
        await eventually(lambda: status(c, "acme_app-7") == "assigned")
        await c.live.catch_up()
        loaded = await store.load(ns.task_filter("acme_app-7"))
        assert [type(e.event).__name__ for e in loaded.events] == [
            "TaskCreated", "TaskAnalysisStarted", "TaskAnalyzed", "TaskAssigned"]
        assert c.model.tasks["acme_app-7"].specialty == "backend" and not c.model.bad
    finally:
        await c.stop()


async def test_the_intake_writes_its_chain_as_single_events(nc, ns, store, coordinator):
    """No atomic batch on the hot path: each intake event is its own JetStream message."""
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(8, "Fix the API endpoint", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-8") == "assigned")
    sub = await nc.jetstream().subscribe(f"{ns.prefix}.task.acme_app-8.>", stream=ns.events_stream,
                                         ordered_consumer=True)
    try:
        headers = [(await sub.next_msg(timeout=5)).headers or {} for _ in range(2)]  # created, assigned
    finally:
        await sub.unsubscribe()
    assert all("Nats-Batch-Id" not in h for h in headers)


async def test_a_slot_freed_in_the_task_view_wakes_the_scheduler(nc, ns, store, coordinator):
    """An agent releases its task right after reporting the PR: the release reaches the
    scheduler while the task still counts as held (testing), and only the coordinator's
    own ``task.pr_opened`` frees the slot. That event must wake the scheduler, or the
    next queued task waits for ever (found by `ccc chaos`, nats-restart scenario)."""
    agent = FakeAgent(store, "agent-1", capacity=1)
    await agent.register()
    await publish_issue(nc, ns, opened(9, "Fix the API endpoint", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-9") == "assigned")
    await publish_issue(nc, ns, opened(10, "Fix the other endpoint", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-10") == "queued")
    await agent.start("acme_app-9")
    await agent.report("acme_app-9", ImplementationProduced(files_changed=["app.py"], diff_stat="1 file"))
    await agent.report("acme_app-9", PullRequestOpened(branch="ccc/task-acme_app-9-fix", tests_passed=1))
    await agent.release("acme_app-9")  # back to back, as a real agent does
    await eventually(lambda: status(coordinator, "acme_app-9") == "checking")
    await eventually(lambda: status(coordinator, "acme_app-10") == "assigned", timeout=10)


async def test_a_late_offline_takes_back_only_what_the_agent_held_before_it(nc, ns, store):
    """An ``agent.offline`` processed after the agent came back with the same id (a
    restarted ``ccc up``'s autoscaler starts ``auto-backend-1`` again at once) takes back
    what the old incarnation held, not what the new one was given since."""
    from events import task_state as ts

    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, retry_base=0.05, retry_max=0.2))
    a1 = FakeAgent(store, "a1")
    await c.start()
    try:
        await a1.register()
        await publish_issue(nc, ns, opened(60, "first", labels=["backend"]))
        await eventually(lambda: status(c, "acme_app-60") == "assigned")
        await a1.start("acme_app-60")
        await publish_issue(nc, ns, opened(61, "second", labels=["backend"]))
        await eventually(lambda: status(c, "acme_app-61") == "queued")  # a1 is full
    finally:
        await c.stop()
    # while no coordinator runs: a1 is declared offline, comes back, and is given the second
    # task (as a coordinator that saw the registration before the offline would do)
    await a1.do(ag.GoOffline(at=now(), actor="health", reason="heartbeat_timeout"))
    a1.capacity = 2
    await a1.register()
    state, last = await store.load_task("acme_app-61")
    await store.append(ts.decide(state, ts.AssignTask(at=now(), actor="coordinator", agent_id="a1")),
                       expected_last_seq=last)
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, retry_base=0.05, retry_max=0.2))
    await c.start()  # its reports consumer now delivers the offline, late
    try:
        await eventually(lambda: c.model.tasks["acme_app-60"].attempt == 2)  # the old incarnation's
        t61 = c.model.tasks["acme_app-61"]
        assert t61.agent_id == "a1" and t61.status == "assigned" and t61.attempt == 1  # the new one's
    finally:
        await c.stop()
