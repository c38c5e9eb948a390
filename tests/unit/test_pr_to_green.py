"""A pull request's way to green, pure: whole chains through ``decide`` and ``evolve``
(no NATS). Each test starts from a log the machine itself wrote (tests/support/domain.py)
and checks the exact events one decision writes, then the state they leave.

Red CI -> a fix round -> green; a flaky check -> a re-run -> green; the infrastructure
-> re-runs -> a human; a workflow awaiting approval -> a human -> a re-run; fixes
exhausted -> Failed; stale checks refused; checks that never finish; conflicts -> a
rebase round; the merge queue, its ejections and merges; a person merging or cancelling.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from events.checks import CheckRun, Verdict, guidance_for
from events.errors import DomainError, IllegalTransition
from events.task import (
    TaskApproved, TaskAssigned, TaskCancellationRequested, TaskCancelled, TaskChecksFailed, TaskChecksPassed,
    TaskChecksRerun, TaskCompleted, TaskConflicted, TaskFailed, TaskFixQueued, TaskMerged, TaskMergeDequeued,
    TaskMergeQueued, TaskMergeTesting, TaskNeedsHuman, TaskRequeued,
)
from events.task_state import (
    PR_OPEN, ApprovePullRequest, CancelTask, ChecksTimedOut, CompleteMerge, CompleteTask, DequeueMerge,
    RecordConflict, RequestRerun, RequeueTask, RetryTask, StartMergeTest, fold,
)
from tests.support.domain import (
    A1, A2, AT, B1, CHANGED, FLAKY, GREEN_BASE, H1, H2, INFRA, M1, PASS, Q1, RED, RED_BASE, WAITING, Cut,
    checks, cmd, ev, history, round_trip, run, task,
)

R_CHANGE = "test failed (failure) and its log names src/calc.py, which the change touches"
R_AGAIN = "test failed again after a re-run: caused by the change"
R_FLAKY = ("test passed on the base commit and its log names nothing the change touches: "
           "possibly flaky, re-run once")
R_INFRA = "the CI infrastructure failed (test: failure)"
R_WAITING = ("test waits for a maintainer to approve the workflow run (first-time contributors' and "
             "bots' runs need approval)")
NEEDED_CI = "look at the CI: a check is stuck, waits for a runner, or never started"
NEEDED_APPROVAL = "a maintainer approves the pending workflow run(s) on the pull request"
CONFLICT = dict(base_branch="main", base_sha=B1, files=CHANGED)
REBASE_GUIDANCE = (f"main moved ({B1[:12]}) and this branch conflicts with it in: src/calc.py. "
                   "Rebase the change on it, keeping both sides' intent.")
MERGE_TEST = dict(queue_ref="ccc/queue/main", queue_sha=Q1, base_sha=B1)
LATER = AT + timedelta(hours=1)


def fix_queued(version: int, number: int, reason: str = R_CHANGE, runs=RED, max_fixes: int = 2, **kw):
    guidance = guidance_for(runs, Verdict(classification="change", reason=reason), number, max_fixes)
    return ev(TaskFixQueued, version, kind="ci_fix", number=number, of=max_fixes, reason=reason, guidance=guidance,
              **kw)


def rebase_queued(version: int, number: int = 1, **kw):
    return ev(TaskFixQueued, version, kind="rebase", number=number, reason="rebase on main: conflicts in "
              "src/calc.py", guidance=REBASE_GUIDANCE, **kw)


def head(n: int) -> str:
    return f"{n:x}" * 40


# -- red CI -> a fix round -> green ---------------------------------------------------------
def test_red_ci_then_a_fix_round_on_the_same_branch_then_green():
    log = history("checking")
    n = len(log)
    after = task(log).when(checks(H1, RED)).then([
        ev(TaskChecksFailed, n + 1, head_sha=H1, classification="change", reason=R_CHANGE, checks=RED),
        fix_queued(n + 2, 1)])
    assert (after.status, after.work, after.agent_id) == ("queued", "ci_fix", None)
    assert (after.ci_fixes, after.attempt) == (1, 1)
    assert after.guidance.startswith(f"CI fix 1 of 2: the pull request's checks failed ({R_CHANGE}).")
    assert "FAILED tests/test_calc.py::test_add - assert add(1, 2) == 3" in after.guidance
    assert (after.classification, after.checks, after.checks_since) == ("change", RED, None)

    log = run([checks(H1, RED), *round_trip(H2, agent=A2)], log)  # another agent may take the round
    state = fold(log)
    assert (state.status, state.head_sha, state.branch, state.pr_number) == ("checking", H2, "ccc/7", 3)
    assert (state.attempt, state.ci_fixes, state.reruns, state.checks_since) == (1, 1, 0, AT)
    assert state.agent_id == A2
    assert [e.attempt for e in log if isinstance(e, TaskAssigned)] == [1, 1]  # a round is not an attempt

    task(log).when(checks(H1)).then_raises(DomainError, "stale")  # the old head's checks count no more
    after = task(log).when(checks(H2, at=LATER)).then([
        ev(TaskChecksPassed, len(log) + 1, at=LATER, head_sha=H2, checks=PASS)])
    assert (after.status, after.checks, after.green_at, after.ci_fixes) == ("review", PASS, LATER, 1)
    assert (after.status_reason, after.needed, after.checks_since) == ("", "", None)


# -- flaky -> re-run -> green, without a fix ------------------------------------------------
def test_a_flaky_check_is_re_run_once_and_passes_without_a_fix():
    log = history("checking")
    n = len(log)
    after = task(log).when(checks(H1, FLAKY, base=GREEN_BASE, at=LATER)).then([
        ev(TaskChecksFailed, n + 1, at=LATER, head_sha=H1, classification="flaky", reason=R_FLAKY,
           checks=FLAKY),
        ev(TaskChecksRerun, n + 2, at=LATER, head_sha=H1, checks=("test",), reason=R_FLAKY, rerun=1,
           cause="flaky")])
    assert (after.status, after.reruns, after.checks_since) == ("checking", 1, LATER)
    assert after.status_reason == R_FLAKY
    log = run([checks(H1, FLAKY, base=GREEN_BASE), checks(H1)], log)
    state = fold(log)
    assert state.status == "review" and state.ci_fixes == 0 and state.work == "implement"
    assert not any(isinstance(e, TaskFixQueued) for e in log)


def test_a_check_failing_again_after_its_re_run_is_the_change():
    log = run([checks(H1, FLAKY, base=GREEN_BASE)], history("checking"))
    n = len(log)
    after = task(log).when(checks(H1, FLAKY, base=GREEN_BASE)).then([
        ev(TaskChecksFailed, n + 1, head_sha=H1, classification="change", reason=R_AGAIN, checks=FLAKY),
        fix_queued(n + 2, 1, reason=R_AGAIN, runs=FLAKY)])
    assert after.status == "queued" and after.work == "ci_fix"
    # a new push's checks start over: its flaky check gets its own re-run
    log = run([checks(H1, FLAKY, base=GREEN_BASE), *round_trip(H2)], log)
    assert fold(log).reruns == 0
    assert [type(e) for e in run([checks(H2, FLAKY, base=GREEN_BASE)], log)[len(log):]] == [
        TaskChecksFailed, TaskChecksRerun]


def test_an_infrastructure_re_run_does_not_use_up_the_flaky_checks_second_chance():
    """The runner was lost, the re-run then really ran the tests and failed naming nothing
    the change touched: that failure still gets its one flaky re-run (the first run told
    nothing about the tests); only a failure after *that* is the change's."""
    log = run([checks(H1, INFRA)], history("checking"))
    assert (fold(log).reruns, fold(log).flaky_reruns) == (1, 0)
    n = len(log)
    task(log).when(checks(H1, FLAKY, base=GREEN_BASE)).then([
        ev(TaskChecksFailed, n + 1, head_sha=H1, classification="flaky", reason=R_FLAKY, checks=FLAKY),
        ev(TaskChecksRerun, n + 2, head_sha=H1, checks=("test",), reason=R_FLAKY, rerun=2, cause="flaky")])
    log = run([checks(H1, FLAKY, base=GREEN_BASE)], log)
    assert (fold(log).reruns, fold(log).flaky_reruns) == (2, 1)
    assert [type(e) for e in run([checks(H1, FLAKY, base=GREEN_BASE)], log)[len(log):]] == [
        TaskChecksFailed, TaskFixQueued]


# -- infrastructure -> re-runs -> a human ------------------------------------------------------
@pytest.mark.parametrize("max_reruns", [0, 1, 2, 3])
def test_the_infrastructure_failing_is_re_run_at_most_max_infra_reruns_then_a_human(max_reruns):
    log = history("checking")
    for rerun in range(1, max_reruns + 1):
        n = len(log)
        task(log).when(checks(H1, INFRA, max_infra_reruns=max_reruns)).then([
            ev(TaskChecksFailed, n + 1, head_sha=H1, classification="infrastructure", reason=R_INFRA,
               checks=INFRA),
            ev(TaskChecksRerun, n + 2, head_sha=H1, checks=("test",), reason=R_INFRA, rerun=rerun,
               cause="infrastructure")])
        log = run([checks(H1, INFRA, max_infra_reruns=max_reruns)], log)
    n = len(log)
    after = task(log).when(checks(H1, INFRA, max_infra_reruns=max_reruns)).then([
        ev(TaskChecksFailed, n + 1, head_sha=H1, classification="infrastructure", reason=R_INFRA,
           checks=INFRA),
        ev(TaskNeedsHuman, n + 2, reason=f"{R_INFRA}; still failing after {max_reruns} re-run(s)",
           needed="look at the CI runners")])
    assert (after.status, after.needed, after.ci_fixes, after.checks_since) == (
        "needs_human", "look at the CI runners", 0, None)


def test_a_red_base_needs_a_human_not_a_fix():
    log = history("checking")
    n = len(log)
    reason = "test fails on the base commit too: the base branch is red"
    after = task(log).when(checks(H1, RED, base=RED_BASE)).then([
        ev(TaskChecksFailed, n + 1, head_sha=H1, classification="base", reason=reason, checks=RED),
        ev(TaskNeedsHuman, n + 2, reason=reason, needed="make the base branch green again")])
    assert after.status == "needs_human" and after.ci_fixes == 0


# -- action_required -> a human -> a re-run -------------------------------------------------
def test_a_workflow_awaiting_approval_needs_a_human_whose_re_run_awaits_the_checks_again():
    log = history("checking")
    n = len(log)
    after = task(log).when(checks(H1, WAITING)).then([
        ev(TaskChecksFailed, n + 1, head_sha=H1, classification="action_required", reason=R_WAITING,
           checks=WAITING),
        ev(TaskNeedsHuman, n + 2, reason=R_WAITING, needed=NEEDED_APPROVAL)])
    assert (after.status, after.needed, after.status_reason) == ("needs_human", NEEDED_APPROVAL, R_WAITING)

    log = run([checks(H1, WAITING)], log)
    n = len(log)
    rerun = cmd(RequestRerun, actor="alice", reason="alice asked for a re-run", at=LATER)
    after = task(log).when(rerun).then([
        ev(TaskChecksRerun, n + 1, actor="alice", at=LATER, head_sha=H1, reason="alice asked for a re-run",
           rerun=1, cause="requested")])
    assert (after.status, after.needed, after.checks_since, after.reruns) == ("checking", "", LATER, 1)
    assert fold(run([rerun, checks(H1)], log)).status == "review"
    # only a task that needs a human is re-run on request
    task(run([rerun], log)).when(rerun).then_raises(IllegalTransition, "re-run")


def test_a_maintainer_approving_the_run_lets_its_checks_complete_the_wait():
    log = run([checks(H1, WAITING)], history("checking"))
    after = task(log).when(checks(H1)).then([ev(TaskChecksPassed, len(log) + 1, head_sha=H1, checks=PASS)])
    assert (after.status, after.needed, after.status_reason) == ("review", "", "")
    task(log).when(checks(H2)).then_raises(DomainError, "stale")


# -- fixes exhausted -> Failed ------------------------------------------------------------
@pytest.mark.parametrize("max_fixes", [0, 1, 2, 3])
def test_ci_fixes_are_bounded_and_counted_apart_from_attempts(max_fixes):
    log = history("checking", max_attempts=1)  # one attempt: the rounds do not use it up
    sha = H1
    for number in range(1, max_fixes + 1):
        n = len(log)
        decided = run([checks(sha, RED, max_ci_fixes=max_fixes)], log)[n:]
        assert decided == [
            ev(TaskChecksFailed, n + 1, head_sha=sha, classification="change", reason=R_CHANGE, checks=RED),
            fix_queued(n + 2, number, max_fixes=max_fixes)]
        sha = head(number + 3)
        log = run(round_trip(sha), log + decided)
    n = len(log)
    reason = f"checks still failing after {max_fixes} CI fix attempt(s): {R_CHANGE}"
    after = task(log).when(checks(sha, RED, max_ci_fixes=max_fixes)).then([
        ev(TaskChecksFailed, n + 1, head_sha=sha, classification="change", reason=R_CHANGE, checks=RED),
        ev(TaskFailed, n + 2, reason=reason, phase="checks", retryable=False)])
    assert (after.status, after.failure_reason, after.failure_phase) == ("failed", reason, "checks")
    assert (after.attempt, after.ci_fixes, after.can_retry) == (1, max_fixes, False)
    task(run([checks(sha, RED, max_ci_fixes=max_fixes)], log)).when(cmd(RetryTask)).then_raises(
        DomainError, "not retryable")


def test_an_agent_lost_during_a_fix_round_hands_the_round_on_as_a_new_attempt():
    log = run([checks(H1, RED), *round_trip(H2)[:2]], history("checking"))  # the round: assigned, started
    n = len(log)
    after = task(log).when(cmd(RequeueTask, reason="agent_lost", agent_id=A1)).then([
        ev(TaskRequeued, n + 1, reason="agent_lost", attempt=2, agent_id=A1)])
    assert (after.status, after.work, after.ci_fixes, after.attempt) == ("queued", "ci_fix", 1, 2)
    assert after.guidance.startswith("CI fix 1 of 2")  # the round's task is unchanged
    spent = history("checking", max_attempts=1)
    spent = run([checks(H1, RED), *round_trip(H2)[:2]], spent)
    task(spent).when(cmd(RequeueTask, reason="agent_lost", agent_id=A1)).then([
        ev(TaskFailed, len(spent) + 1, reason=f"agent {A1} lost; attempts exhausted", phase="in_progress",
           retryable=False)])


# -- stale checks ---------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "awaited", "stale"), [
    ("checking", H1, H2), ("checking", H1, ""), ("needs_human", H1, H2), ("merging", Q1, H1)])
def test_checks_of_another_commit_are_refused(status, awaited, stale):
    log = history(status)
    error = task(log).when(checks(stale)).then_raises(DomainError, "stale")
    assert awaited[:12] in str(error)
    assert task(log).when(checks(awaited)).decide()  # the awaited commit's are taken


@pytest.mark.parametrize("status", ["review", "merge_queued", "queued", "testing", "failed", "completed"])
def test_checks_are_refused_when_none_are_awaited(status):
    task(history(status)).when(checks(H1)).then_raises(IllegalTransition, "record checks")


# -- checks that never finish ------------------------------------------------------------
def test_checks_that_never_finish_time_out_and_say_so():
    log = history("checking")
    reason = f"the checks of {H1[:12]} did not finish within 45 min"
    after = task(log).when(cmd(ChecksTimedOut, waited=2700)).then([
        ev(TaskNeedsHuman, len(log) + 1, reason=reason, needed=NEEDED_CI)])
    assert (after.status, after.status_reason, after.needed, after.checks_since) == (
        "needs_human", reason, NEEDED_CI, None)
    for status in ("review", "needs_human", "merge_queued", "queued"):
        task(history(status)).when(cmd(ChecksTimedOut, waited=2700)).then_raises(
            IllegalTransition, "time out")


def test_queue_checks_that_never_finish_leave_the_queue_for_a_human():
    log = history("merging")
    n = len(log)
    reason = f"the checks of {Q1[:12]} did not finish within 60 min"
    after = task(log).when(cmd(ChecksTimedOut, waited=3600)).then([
        ev(TaskMergeDequeued, n + 1, reason=f"left the merge queue: {reason}"),
        ev(TaskNeedsHuman, n + 2, reason=reason, needed=NEEDED_CI)])
    assert (after.status, after.queue_sha, after.queue_ref, after.approved) == ("needs_human", "", "", True)


# -- conflicts -> a rebase round ---------------------------------------------------------------
def test_a_conflict_starts_a_rebase_round_whose_push_awaits_the_checks_again():
    log = history("review")
    n = len(log)
    after = task(log).when(cmd(RecordConflict, **CONFLICT, at=LATER)).then([
        ev(TaskConflicted, n + 1, at=LATER, **CONFLICT), rebase_queued(n + 2, at=LATER)])
    assert (after.status, after.work, after.rebases) == ("queued", "rebase", 1)
    assert (after.ci_fixes, after.attempt) == (0, 1)
    assert (after.conflict_files, after.guidance, after.agent_id) == (CHANGED, REBASE_GUIDANCE, None)

    log = run([cmd(RecordConflict, **CONFLICT), *round_trip(H2)], log)
    state = fold(log)
    assert (state.status, state.head_sha, state.checks_since) == ("checking", H2, AT)
    assert state.conflict_files == ()
    green = fold(run([checks(H2, at=LATER)], log))
    assert green.status == "review" and green.green_at == AT  # green first at AT, before the conflict


@pytest.mark.parametrize("status", ["checking", "needs_human", "review"])
def test_a_conflict_is_recorded_wherever_the_pull_request_waits(status):
    log = history(status)
    after = task(log).when(cmd(RecordConflict, **CONFLICT)).then([
        ev(TaskConflicted, len(log) + 1, **CONFLICT), rebase_queued(len(log) + 2)])
    assert (after.status, after.needed, after.checks_since) == ("queued", "", None)


def test_rebases_exhausted_need_a_human():
    log = history("checking")
    conflict = cmd(RecordConflict, max_rebases=1, **CONFLICT)
    log = run([conflict, *round_trip(H2)], log)
    n = len(log)
    after = task(log).when(conflict).then([
        ev(TaskConflicted, n + 1, **CONFLICT),
        ev(TaskNeedsHuman, n + 2, reason="still conflicting after 1 rebase(s)",
           needed="resolve the conflicts with main by hand")])
    assert (after.status, after.rebases, after.conflict_files) == ("needs_human", 1, CHANGED)
    for status in ("queued", "testing", "merging", "completed"):
        task(history(status)).when(conflict).then_raises(IllegalTransition, "record a conflict")


# -- the merge queue ----------------------------------------------------------------------------
def test_the_merge_queue_tests_the_combination_then_merges_it():
    log = history("review")
    n = len(log)
    approve = cmd(ApprovePullRequest, actor="alice", by="alice", merge_queue=True)
    after = task(log).when(approve).then([
        ev(TaskApproved, n + 1, actor="alice", by="alice"), ev(TaskMergeQueued, n + 2, actor="alice")])
    assert (after.status, after.approved, after.approved_by) == ("merge_queued", True, "alice")
    log = run([approve], log)

    test = cmd(StartMergeTest, **MERGE_TEST, at=LATER)
    after = task(log).when(test).then([ev(TaskMergeTesting, len(log) + 1, at=LATER, **MERGE_TEST)])
    assert (after.status, after.queue_sha, after.queue_ref, after.checks_since) == (
        "merging", Q1, "ccc/queue/main", LATER)
    log = run([test], log)

    merge = cmd(CompleteMerge, base_branch="main", merge_sha=M1)
    task(log).when(merge).then_raises(DomainError, "the queued commit's checks have not passed")
    after = task(log).when(checks(Q1)).then([ev(TaskChecksPassed, len(log) + 1, head_sha=Q1, checks=PASS)])
    assert (after.status, after.checks_since, after.checks) == ("merging", None, PASS)
    log = run([checks(Q1)], log)

    after = task(log).when(merge).then([ev(TaskMerged, len(log) + 1, base_branch="main", merge_sha=M1)])
    assert (after.status, after.merge_sha) == ("completed", M1)
    assert after.status_reason == "merged by the merge queue"
    assert after.final


def test_approved_before_green_enters_the_queue_when_the_checks_pass():
    log = run([cmd(ApprovePullRequest, by="alice", merge_queue=True)], history("checking"))
    assert fold(log).status == "checking" and fold(log).approved
    n = len(log)
    after = task(log).when(checks(H1, merge_queue=True)).then([
        ev(TaskChecksPassed, n + 1, head_sha=H1, checks=PASS), ev(TaskMergeQueued, n + 2)])
    assert after.status == "merge_queued"
    assert fold(run([checks(H1, merge_queue=False)], log)).status == "review"  # no queue: waits for a merge


def test_an_approval_is_recorded_once_per_reviewer_and_without_a_queue_leaves_the_task_in_review():
    log = history("review")
    approve = cmd(ApprovePullRequest, by="alice")
    assert task(log).when(approve).then([ev(TaskApproved, len(log) + 1, by="alice")]).status == "review"
    log = run([approve], log)
    task(log).when(approve).then([])  # the same approval again: nothing new
    task(log).when(cmd(ApprovePullRequest, by="bob")).then([ev(TaskApproved, len(log) + 1, by="bob")])
    # approved already, the queue now on: it enters without a new approval
    task(log).when(cmd(ApprovePullRequest, by="alice", merge_queue=True)).then([
        ev(TaskMergeQueued, len(log) + 1)])
    for status in ("queued", "testing", "completed", "failed"):
        task(history(status)).when(approve).then_raises(IllegalTransition, "approve")


def test_a_combination_failing_its_checks_is_ejected_with_them_into_a_fix_round():
    log = history("merging")
    n = len(log)
    after = task(log).when(checks(Q1, RED)).then([
        ev(TaskMergeDequeued, n + 1, reason=f"ejected from the merge queue: {R_CHANGE}", checks=RED,
           classification="change"),
        fix_queued(n + 2, 1)])
    assert (after.status, after.work, after.queue_sha, after.checks, after.classification) == (
        "queued", "ci_fix", "", RED, "change")
    # the fix pushed and green, still approved: back into the queue by itself
    log = run([checks(Q1, RED), *round_trip(H2)], log)
    decided = run([checks(H2, merge_queue=True)], log)[len(log):]
    assert [type(e) for e in decided] == [TaskChecksPassed, TaskMergeQueued]


def test_a_flaky_check_in_the_queue_is_re_run_in_place_and_the_merge_waits_for_it():
    log = history("merging")
    n = len(log)
    after = task(log).when(checks(Q1, FLAKY, base=GREEN_BASE, at=LATER)).then([
        ev(TaskChecksRerun, n + 1, at=LATER, head_sha=Q1, checks=("test",), reason=R_FLAKY, rerun=1,
           cause="flaky")])
    assert (after.status, after.reruns, after.checks_since) == ("merging", 1, LATER)
    log = run([checks(Q1, FLAKY, base=GREEN_BASE)], log)
    task(log).when(cmd(CompleteMerge)).then_raises(DomainError, "have not passed")
    assert fold(run([checks(Q1), cmd(CompleteMerge, merge_sha=M1)], log)).status == "completed"
    # failing again after the re-run: ejected
    decided = run([checks(Q1, FLAKY, base=GREEN_BASE)], log)[len(log):]
    assert [type(e) for e in decided] == [TaskMergeDequeued, TaskFixQueued]
    assert decided[0].reason == f"ejected from the merge queue: {R_AGAIN}"


@pytest.mark.parametrize(("runs", "needed"), [(WAITING, NEEDED_APPROVAL), (INFRA, "look at the CI runners")])
def test_an_ejection_a_fix_cannot_help_needs_a_human(runs, needed):
    log = history("merging")
    decided = run([checks(Q1, runs, max_infra_reruns=0)], log)[len(log):]
    assert [type(e) for e in decided] == [TaskMergeDequeued, TaskNeedsHuman]
    assert decided[0].checks == runs and decided[1].needed == needed


@pytest.mark.parametrize("status", ["merge_queued", "merging"])
def test_leaving_the_queue_goes_back_to_review(status):
    log = history(status)
    after = task(log).when(cmd(DequeueMerge, reason="approval withdrawn")).then([
        ev(TaskMergeDequeued, len(log) + 1, reason="approval withdrawn")])
    assert (after.status, after.queue_sha, after.queue_ref, after.checks_since) == ("review", "", "", None)
    assert after.status_reason == "approval withdrawn"


def test_the_base_moving_under_a_queued_pull_request_that_conflicts_takes_it_out_to_rebase():
    log = history("merge_queued")
    n = len(log)
    task(log).when(cmd(RecordConflict, **CONFLICT)).then([
        ev(TaskMergeDequeued, n + 1, reason="left the merge queue: main moved and the pull request conflicts "
                                            "with it"),
        ev(TaskConflicted, n + 2, **CONFLICT), rebase_queued(n + 3)])


def test_merge_steps_are_refused_out_of_order():
    task(history("review")).when(cmd(StartMergeTest, **MERGE_TEST)).then_raises(
        IllegalTransition, "merge queue")
    task(history("merging")).when(cmd(StartMergeTest, **MERGE_TEST)).then_raises(IllegalTransition)
    for status in ("review", "merge_queued", "checking"):
        task(history(status)).when(cmd(CompleteMerge)).then_raises(IllegalTransition, "merge")
    task(history("review")).when(cmd(DequeueMerge, reason="x")).then_raises(IllegalTransition, "leave")


def test_the_merge_queue_only_takes_a_green_and_approved_pull_request():
    unapproved = history("checking")
    assert fold(run([checks(H1, merge_queue=True)], unapproved)).status == "review"  # not approved: no queue
    for status in ("checking", "needs_human"):  # approved while not green: recorded, not queued
        log = history(status)
        decided = run([cmd(ApprovePullRequest, by="alice", merge_queue=True)], log)[len(log):]
        assert [type(e) for e in decided] == [TaskApproved] and fold(log + decided).status == status


# -- a person merges, or cancels ------------------------------------------------------------
@pytest.mark.parametrize("status", sorted(PR_OPEN))
def test_a_person_merging_the_pull_request_completes_the_task_from_any_open_state(status):
    log = history(status)
    after = task(log).when(cmd(CompleteTask, reason="pull request merged by alice")).then([
        ev(TaskCompleted, len(log) + 1, reason="pull request merged by alice")])
    assert (after.status, after.checks_since, after.needed) == ("completed", None, "")


NEW_STATES = ["checking", "checks_failed", "review", "needs_human", "conflicted", "merge_queued", "merging"]


@pytest.mark.parametrize("status", NEW_STATES)
def test_cancel_from_every_state_of_the_pull_request(status):
    log = history(status)
    after = task(log).when(cmd(CancelTask, reason="not needed")).then([
        ev(TaskCancelled, len(log) + 1, reason="not needed")])
    assert (after.status, after.checks_since, after.needed) == ("cancelled", None, "")
    task(run([cmd(CancelTask)], log)).when(checks(H1)).then_raises(IllegalTransition)


def test_cancel_during_a_fix_round_waits_for_the_agent_only_while_it_works():
    queued = run([checks(H1, RED)], history("checking"))
    task(queued).when(cmd(CancelTask, reason="stop")).then([
        ev(TaskCancelled, len(queued) + 1, reason="stop")])
    working = run(round_trip(H2)[:2], queued)
    task(working).when(cmd(CancelTask, reason="stop")).then([
        ev(TaskCancellationRequested, len(working) + 1, reason="stop", requested_by="coordinator")])


def test_a_chain_cut_short_is_a_state_the_log_can_hold_and_continue_from():
    """checks_failed and conflicted are passed through within one decision; a log cut
    between the two events still folds, and the commands of an open pull request apply."""
    log = run([Cut(checks(H1, RED))], history("checking"))
    assert fold(log).status == "checks_failed"
    assert fold(run([cmd(RecordConflict, **CONFLICT)], log)).status == "queued"
    log = run([Cut(cmd(RecordConflict, **CONFLICT))], history("review"))
    assert fold(log).status == "conflicted"
    assert fold(run([cmd(CompleteTask)], log)).status == "completed"


def test_every_failing_check_run_is_kept_with_its_log_on_the_event():
    runs = (CheckRun(name="unit", conclusion="failure", url="https://ci/9", log_ref="obj:9",
                     log_tail="calc.py:3: AssertionError", run_id=9, duration=3.5), *PASS)
    decided = run([checks(H1, runs)], history("checking"))[-2:]
    assert decided[0].checks == runs and decided[0].checks[0].log_ref == "obj:9"
    assert decided[1].guidance.count("calc.py:3: AssertionError") == 1  # the failing one's log only
