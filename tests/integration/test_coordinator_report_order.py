"""The coordinator handles an agent's reports in log order where order matters (about
one task; an agent-wide report between everything before and after it) and reports
about different tasks of one agent concurrently; a decision refused or conflicting on a
view the model has left behind in the meantime is made again on the fresh one.

Against a real nats-server; the agents are played by the test (``FakeAgent`` appends
what a real agent appends). ``GatedCoordinator`` is the real coordinator with a gate
in front of each report's translation, so the test can hold one report and watch what
else goes on meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from actors.coordinator import Coordinator, CoordinatorConfig
from events import agent_state as ag
from events import task_state as ts
from events.issue import IssueCancelRequested
from events.work_reports import ImplementationProduced, PullRequestOpened
from tests.conftest import eventually
from tests.integration.test_coordinator import FakeAgent, now, opened, publish_issue, status

pytestmark = pytest.mark.timeout(60)


class GatedCoordinator(Coordinator):
    """Records which reports it began and finished handling (``(task id or None, event
    tag)``), and holds those about a task in ``gates`` until its gate opens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gates: dict[str, asyncio.Event] = {}
        self.began: list[tuple[str | None, str]] = []
        self.finished: list[tuple[str | None, str]] = []

    async def _on_agent_event_in_order(self, event, seq: int) -> None:
        key = (getattr(event, "task_id", None), event.__struct_config__.tag)
        self.began.append(key)
        gate = self.gates.get(key[0] or "")
        if gate is not None:
            await gate.wait()
        await super()._on_agent_event_in_order(event, seq)
        self.finished.append(key)


@pytest.fixture
async def gated(nc, ns, store):
    c = GatedCoordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60))
    await c.start()
    yield c
    await c.stop()


async def two_tasks_assigned(nc, ns, store, c) -> FakeAgent:
    agent = FakeAgent(store, "a1", capacity=2)
    await agent.register()
    for n in (1, 2):
        await publish_issue(nc, ns, opened(n, f"Fix server handler {n}", labels=["backend"]))
    await eventually(lambda: all(status(c, f"acme_app-{n}") == "assigned" for n in (1, 2)))
    return agent


async def test_reports_about_two_tasks_of_one_agent_run_side_by_side_each_task_in_order(nc, ns, store, gated):
    agent = await two_tasks_assigned(nc, ns, store, gated)
    gated.gates["acme_app-1"] = asyncio.Event()
    await agent.start("acme_app-1")
    await eventually(lambda: ("acme_app-1", "agent.task_started") in gated.began)
    # the same agent's report about its other task is not held up by the first one
    await agent.start("acme_app-2")
    await eventually(lambda: status(gated, "acme_app-2") == "in_progress")
    assert ("acme_app-1", "agent.task_started") not in gated.finished
    # the next report about the held task waits for it: a later report about the other
    # task (delivered after it) is handled, the held task's next one has not begun
    await agent.report("acme_app-1", ImplementationProduced(files_changed=("a.py",), diff_stat="1 file"))
    await agent.report("acme_app-2", ImplementationProduced(files_changed=("b.py",), diff_stat="1 file"))
    await eventually(lambda: status(gated, "acme_app-2") == "testing")
    assert ("acme_app-1", "agent.implementation_produced") not in gated.began
    assert status(gated, "acme_app-1") == "assigned"
    gated.gates["acme_app-1"].set()
    await eventually(lambda: status(gated, "acme_app-1") == "testing")
    assert [k for k in gated.finished if k[0] == "acme_app-1"] == [
        ("acme_app-1", "agent.task_started"), ("acme_app-1", "agent.implementation_produced")]


async def test_an_agent_wide_report_waits_for_the_agents_earlier_reports_and_holds_its_later_ones(
        nc, ns, store, gated):
    agent = await two_tasks_assigned(nc, ns, store, gated)
    await eventually(lambda: (None, "agent.registered") in gated.finished)  # a1's own
    gated.began.clear()
    gated.finished.clear()
    other = FakeAgent(store, "b1")
    gated.gates["acme_app-1"] = asyncio.Event()
    await agent.start("acme_app-1")
    await eventually(lambda: ("acme_app-1", "agent.task_started") in gated.began)
    await agent.do(ag.ReportError(at=now(), actor="a1", reason="disk full"))  # about the agent as a whole
    await agent.do(ag.Recover(at=now(), actor="a1"))
    await agent.start("acme_app-2")
    # another agent's report, delivered after all of those, is handled meanwhile
    await other.register()
    await eventually(lambda: (None, "agent.registered") in gated.finished)
    assert [k for k in gated.began if k[0] != "acme_app-1"] == [(None, "agent.registered")]
    gated.gates["acme_app-1"].set()
    await eventually(lambda: status(gated, "acme_app-2") == "in_progress")
    await eventually(lambda: len(gated.finished) == 5)
    assert gated.finished == [(None, "agent.registered"), ("acme_app-1", "agent.task_started"),
                              (None, "agent.errored"), (None, "agent.recovered"),
                              ("acme_app-2", "agent.task_started")]
    assert status(gated, "acme_app-1") == "in_progress"


class RacedCoordinator(Coordinator):
    """Before its first append on ``race_task``, another writer moves the task on and the
    model catches up with it: the decision was made on a view that the model has left
    behind by itself by the time the conflict is seen."""

    race_task = ""
    raced = False

    async def _append_chain(self, task_id, commands, start, *, atomic=True):
        if task_id == self.race_task and not self.raced:
            self.raced = True
            state, last = await self.store.load_task(task_id)
            [event] = ts.decide(state, ts.AssignTask(at=now(), actor="another-coordinator", agent_id="a1"))
            seq = (await self.store.append([event], expected_last_seq=last))[-1]
            await self.live.wait_for_seq(seq)
        return await super()._append_chain(task_id, commands, start, atomic=atomic)


async def test_a_conflict_on_a_view_the_model_has_since_left_is_decided_again(nc, ns, store):
    c = RacedCoordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60))
    await c.start()
    try:
        await publish_issue(nc, ns, opened(5, "Fix server handler", labels=["backend"]))
        await eventually(lambda: status(c, "acme_app-5") == "queued")
        c.race_task = "acme_app-5"
        await publish_issue(nc, ns, IssueCancelRequested(
            event_id="cancel-5", repo="acme/app", number=5, occurred_at=now(), reason="not needed",
            author="tester", author_association="OWNER"))
        await eventually(lambda: (t := c.model.tasks["acme_app-5"]).cancel_requested and t.agent_id == "a1")
        assert c.raced
        # decided again, at once, on the assignment the other writer made (a cancel of a
        # task with an agent is a request to the agent): not refused, not redelivered
        intake = c.consumers[0]
        assert (intake.handled, intake.failed) == (2, 0)
        loaded = await store.load(ns.task_filter("acme_app-5"))
        assert [e.event.__struct_config__.tag for e in loaded.events][-2:] == [
            "task.assigned", "task.cancel_requested"]
    finally:
        await c.stop()


async def test_a_report_is_decided_before_the_model_has_caught_up_with_it(nc, ns, store):
    """Which command ``agent.task_started`` implies does not depend on the task's state:
    it is decided on the view the model has (the concurrency check on the append vouches
    for it), not after waiting for the model to apply the report itself. Here the model
    stops following the log before the report: the start is recorded all the same."""
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60))
    await c.start()
    try:
        agent = FakeAgent(store, "a1")
        await agent.register()
        await publish_issue(nc, ns, opened(6, "Fix server handler", labels=["backend"]))
        await eventually(lambda: status(c, "acme_app-6") == "assigned")
        await c.live.stop()  # the model stays where it is: it never sees the report
        await agent.start("acme_app-6")

        async def started() -> bool:
            state, _ = await store.load_task("acme_app-6")
            return state.status == "in_progress"
        await eventually(started, timeout=5)
        assert status(c, "acme_app-6") == "assigned"  # (the model indeed did not move)
        reports = c.consumers[1]
        await eventually(lambda: reports.handled == 2)  # registration, start: acked, none failed
        assert reports.failed == 0
    finally:
        await c.stop()


async def test_a_report_from_an_earlier_round_is_dropped_not_applied_to_the_next(nc, ns, store) -> None:
    """The full chaos run (ci-loop, seed 13): the coordinator was killed after applying an
    agent's ``pr_opened`` but before its acknowledgement reached the server; by the time
    the report came again the task was in its CI fix round (the same attempt, the same
    agent), and the old report was taken for the fix round's: its head's failed checks were
    adopted again and a second fix round queued. Here the reports of round 1 reach a
    restarted coordinator only once the log already holds round 2's assignment."""
    from tests.support.domain import CHANGED, RED

    config = CoordinatorConfig(heartbeat_timeout=60)
    first = Coordinator(nc, ns, config)
    await first.start()
    agent = FakeAgent(store, "a1")
    await agent.register()
    await publish_issue(nc, ns, opened(1, "Fix server handler", labels=["backend"]))
    tid = "acme_app-1"
    await eventually(lambda: status(first, tid) == "assigned")
    await first.stop()

    # round 1, reported while no coordinator runs (its reports wait in the durable consumer)
    head = "a" * 40
    await agent.start(tid)
    await agent.report(tid, ImplementationProduced(files_changed=CHANGED, diff_stat="1 file"))
    await agent.report(tid, PullRequestOpened(branch="ccc/1", pr_number=3, head_sha=head, base_branch="main"))
    # what a coordinator decided meanwhile: round 1 through, its checks red, the fix round
    # given to the same agent
    state, last = await store.load_task(tid)
    for command in (ts.StartTask(at=now(), actor="coordinator", agent_id="a1"),
                    ts.StartTests(at=now(), actor="coordinator", agent_id="a1", files_changed=CHANGED),
                    ts.OpenPullRequest(at=now(), actor="coordinator", agent_id="a1", branch="ccc/1", pr_number=3,
                                       head_sha=head, base_branch="main"),
                    ts.RecordChecks(at=now(), actor="coordinator", head_sha=head, checks=RED)):
        events = ts.decide(state, command)
        last = (await store.append(events, expected_last_seq=last))[-1]
        state = ts.fold(events, state)
    assert (state.status, state.work, state.attempt) == ("queued", "ci_fix", 1)
    events = ts.decide(state, ts.AssignTask(at=now(), actor="coordinator", agent_id="a1"))
    await store.append(events, expected_last_seq=last)

    second = Coordinator(nc, ns, config)
    await second.start()
    try:
        reports = second.consumers[1]
        await eventually(lambda: reports.handled >= 3)  # the three reports of round 1, each refused
        state, _ = await store.load_task(tid)
        # round 2 has not started: no report of round 1 was taken for it
        assert (state.status, state.work, state.ci_fixes, state.head_sha) == ("assigned", "ci_fix", 1, head)
        assert second.model.tasks[tid].status == "assigned"
    finally:
        await second.stop()
