"""The coordinator's pull-request loop against a real nats-server: checks facts on the
issue stream drive the task (re-runs, CI fix rounds, a human, a timeout), and file
leases keep tasks predicted to touch the same file apart. The agents are played by the
test (they append exactly what a real agent appends)."""

from __future__ import annotations

import pytest

from actors.coordinator import Coordinator, CoordinatorConfig
from events.checks import CheckRun
from events.issue import IssueChecksCompleted, IssuePullRequestMerged, IssueRetryRequested
from events.work_reports import ImplementationProduced, PullRequestOpened
from tests.conftest import eventually
from tests.integration.test_coordinator import FakeAgent, now, opened, publish_issue, status

pytestmark = pytest.mark.timeout(60)
BRANCH = "ccc/task-acme_app-{n}-fix"


def checks_fact(n: int, sha: str, *checks: CheckRun, base: dict | None = None, key: str = "") -> IssueChecksCompleted:
    return IssueChecksCompleted(event_id=f"ci:{n}:{sha}:{key}", repo="acme/app", number=n, occurred_at=now(),
                                head_sha=sha, branch=BRANCH.format(n=n), checks=checks, base=base or {})


GREEN = CheckRun(name="ci/test", conclusion="success")


def red(log: str = "FAILED tests/test_cart.py::test_total - assert 5 == 10") -> CheckRun:
    return CheckRun(name="ci/test", conclusion="failure", log_tail=log)


async def open_pr(coordinator, agent, n: int, sha: str, *, attempt: int = 1, files=("shop/cart.py",)) -> None:
    """Play the agent's round: started, implemented, tests, pull request (head ``sha``)."""
    tid = f"acme_app-{n}"
    await eventually(lambda: status(coordinator, tid) == "assigned")
    await agent.start(tid, attempt=attempt)
    await eventually(lambda: status(coordinator, tid) == "in_progress")
    await agent.report(tid, ImplementationProduced(files_changed=files, diff_stat="1 file"), attempt=attempt)
    await eventually(lambda: status(coordinator, tid) == "testing")
    await agent.report(tid, PullRequestOpened(branch=BRANCH.format(n=n), pr_url=f"https://forge/pr/{n}", pr_number=n,
                                              tests_passed=2, head_sha=sha, base_branch="main"), attempt=attempt)
    await eventually(lambda: status(coordinator, tid) == "checking")
    await agent.release(tid, attempt=attempt)


@pytest.fixture
async def coordinator(nc, ns, store):
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, retry_base=0.05, retry_max=0.2,
                                              max_ci_fixes=1, checks_timeout=30))
    await c.start()
    yield c
    await c.stop()


async def test_red_checks_lead_to_a_fix_round_then_green(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(1, "Cart total ignores quantity in shop/cart.py", labels=["backend"]))
    await open_pr(coordinator, agent, 1, "a" * 40)
    # the log names the changed file: caused by the change -> a fix round, no re-run
    await publish_issue(nc, ns, checks_fact(1, "a" * 40, red(), base={"ci/test": "success"}))
    await eventually(lambda: coordinator.model.tasks["acme_app-1"].work == "ci_fix")
    task = coordinator.model.tasks["acme_app-1"]
    assert task.classification == "change" and task.ci_fixes == 1 and task.attempt == 1
    assert "assert 5 == 10" in task.guidance and "CI fix 1 of 1" in task.guidance
    # the fix round: same pull request, a new head commit
    await open_pr(coordinator, agent, 1, "b" * 40)
    # checks of the old commit arriving late are stale: dropped, not parked
    await publish_issue(nc, ns, checks_fact(1, "a" * 40, GREEN, key="late"))
    await publish_issue(nc, ns, checks_fact(1, "b" * 40, GREEN))
    await eventually(lambda: status(coordinator, "acme_app-1") == "review")
    task = coordinator.model.tasks["acme_app-1"]
    assert task.head_sha == "b" * 40 and task.pr_number == 1 and task.green_at is not None
    events = [type(e.event).__name__ for e in (await store.load(ns.task_filter("acme_app-1"))).events]
    assert events.count("TaskChecksFailed") == 1 and events.count("TaskFixQueued") == 1
    assert events[-1] == "TaskChecksPassed"
    await publish_issue(nc, ns, IssuePullRequestMerged(event_id="m1", repo="acme/app", number=1, occurred_at=now()))
    await eventually(lambda: status(coordinator, "acme_app-1") == "completed")


async def test_a_flaky_check_is_re_run_and_passes_without_a_fix(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(2, "Speed up checkout", labels=["backend"]))
    await open_pr(coordinator, agent, 2, "c" * 40)
    flaky = CheckRun(name="ci/test", conclusion="failure", log_tail="ConnectionError: upstream timed out")
    await publish_issue(nc, ns, checks_fact(2, "c" * 40, flaky, base={"ci/test": "success"}))
    await eventually(lambda: coordinator.model.tasks["acme_app-2"].reruns == 1)
    task = coordinator.model.tasks["acme_app-2"]
    assert task.status == "checking" and task.classification == "flaky" and task.ci_fixes == 0
    await publish_issue(nc, ns, checks_fact(2, "c" * 40, GREEN, key="rerun"))
    await eventually(lambda: status(coordinator, "acme_app-2") == "review")
    assert coordinator.model.tasks["acme_app-2"].ci_fixes == 0


async def test_action_required_needs_a_human_then_a_retry_re_runs(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(3, "Add a health endpoint", labels=["backend"]))
    await open_pr(coordinator, agent, 3, "d" * 40)
    await publish_issue(nc, ns, checks_fact(3, "d" * 40, CheckRun(name="CI", conclusion="action_required")))
    await eventually(lambda: status(coordinator, "acme_app-3") == "needs_human")
    task = coordinator.model.tasks["acme_app-3"]
    assert "approve" in task.needed and task.classification == "action_required"
    await publish_issue(nc, ns, IssueRetryRequested(event_id="r3", repo="acme/app", number=3, occurred_at=now(),
                                                    author="maintainer", author_association="OWNER"))
    await eventually(lambda: status(coordinator, "acme_app-3") == "checking")
    await publish_issue(nc, ns, checks_fact(3, "d" * 40, GREEN, key="approved"))
    await eventually(lambda: status(coordinator, "acme_app-3") == "review")


async def test_fix_attempts_are_bounded_and_end_in_failed_with_the_reason(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(4, "Fix shop/cart.py rounding", labels=["backend"]))
    await open_pr(coordinator, agent, 4, "e" * 40)
    await publish_issue(nc, ns, checks_fact(4, "e" * 40, red()))
    await eventually(lambda: coordinator.model.tasks["acme_app-4"].work == "ci_fix")
    await open_pr(coordinator, agent, 4, "f" * 40)
    await publish_issue(nc, ns, checks_fact(4, "f" * 40, red()))
    await eventually(lambda: status(coordinator, "acme_app-4") == "failed")
    task = coordinator.model.tasks["acme_app-4"]
    assert task.failure_phase == "checks" and not task.failure_retryable and task.attempt == 1
    assert "after 1 CI fix attempt" in task.failure_reason and "shop/cart.py" in task.failure_reason


async def test_checks_that_never_finish_time_out_and_say_so(nc, ns, store):
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, checks_timeout=0.5))
    await c.start()
    try:
        agent = FakeAgent(store, "agent-1")
        await agent.register()
        await publish_issue(nc, ns, opened(5, "Tidy the logs", labels=["backend"]))
        await open_pr(c, agent, 5, "1" * 40)
        await eventually(lambda: status(c, "acme_app-5") == "needs_human")
        task = c.model.tasks["acme_app-5"]
        assert "did not finish within" in task.status_reason and "111111111111" in task.status_reason
        # checks that arrive after all are still taken
        await publish_issue(nc, ns, checks_fact(5, "1" * 40, GREEN))
        await eventually(lambda: status(c, "acme_app-5") == "review")
    finally:
        await c.stop()


async def test_tasks_predicted_to_touch_the_same_file_do_not_run_together(nc, ns, store, coordinator):
    agent = FakeAgent(store, "agent-1", capacity=2)
    await agent.register()
    await publish_issue(nc, ns, opened(6, "Cart total wrong in shop/cart.py", labels=["backend"]))
    await eventually(lambda: status(coordinator, "acme_app-6") == "assigned")
    await publish_issue(nc, ns, opened(7, "Cart rounding in shop/cart.py", labels=["backend"]))
    await publish_issue(nc, ns, opened(8, "Docs for shop/pricing.py", labels=["backend"]))
    # the other file's task takes the free slot; the same file's waits for the lease
    await eventually(lambda: status(coordinator, "acme_app-8") == "assigned")
    assert status(coordinator, "acme_app-7") == "queued"
    assert coordinator.model.tasks["acme_app-7"].paths == ("shop/cart.py",)
    await open_pr(coordinator, agent, 6, "2" * 40)
    assert status(coordinator, "acme_app-7") == "queued"  # its PR is open: the lease holds
    await publish_issue(nc, ns, IssuePullRequestMerged(event_id="m6", repo="acme/app", number=6, occurred_at=now()))
    await eventually(lambda: status(coordinator, "acme_app-7") == "assigned")


async def test_checks_reported_before_the_push_is_recorded_are_taken_when_it_is(nc, ns, store, coordinator):
    """A quick CI (or the push of a round whose agent died before reporting it) can finish
    before the task records the commit: the fact is stale then, and taken when the push is
    recorded instead of waiting for the checks timeout."""
    agent = FakeAgent(store, "agent-1")
    await agent.register()
    await publish_issue(nc, ns, opened(9, "Fix shop/cart.py totals", labels=["backend"]))
    tid = "acme_app-9"
    await eventually(lambda: status(coordinator, tid) == "assigned")
    await agent.start(tid)
    await agent.report(tid, ImplementationProduced(files_changed=("shop/cart.py",), diff_stat="1 file"))
    await eventually(lambda: status(coordinator, tid) == "testing")
    await publish_issue(nc, ns, checks_fact(9, "9" * 40, GREEN, key="early"))  # before the report
    await agent.report(tid, PullRequestOpened(branch=BRANCH.format(n=9), pr_url="https://forge/pr/9", pr_number=9,
                                              head_sha="9" * 40, base_branch="main"))
    await eventually(lambda: status(coordinator, tid) == "review")
    events = [type(e.event).__name__ for e in (await store.load(ns.task_filter(tid))).events]
    assert events[-2:] == ["TaskPullRequestOpened", "TaskChecksPassed"]
