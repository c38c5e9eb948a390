"""File leases (projections/leases.py), pure: tasks of one repository predicted to touch
the same files do not run at the same time. Who holds a lease (by status), what
overlaps (the same file, a file in a predicted directory), what never blocks (another
repository, a fix or rebase round, a task without predicted paths), and which holder is
named when several are."""

from __future__ import annotations

from itertools import permutations

import pytest
from msgspec.structs import replace

from events.task_state import TASK_STATUSES, RecordConflict, TaskState, fold
from projections.leases import HOLDING, Lease, LeaseIndex, holds_lease, lease_blocker, shared_paths
from tests.support.domain import H1, RED, checks, cmd, history, run

CALC = ("src/calc.py",)


def state(status: str, task_id: str, paths: tuple[str, ...] = CALC, repo: str = "acme/repo",
          log: list | None = None) -> TaskState:
    """A task of ``repo`` in ``status`` (its log written by the machine), predicted to
    touch ``paths``."""
    s = fold(log if log is not None else history(status))
    assert s.status == status
    return replace(s, task_id=task_id, paths=paths, issue=replace(s.issue, repo=repo))


def fix_round(task_id: str, paths=CALC) -> TaskState:
    return state("queued", task_id, paths, log=run([checks(H1, RED)], history("checking")))


def rebase_round(task_id: str, paths=CALC) -> TaskState:
    log = run([cmd(RecordConflict, base_branch="main")], history("review"))
    return state("queued", task_id, paths, log=log)


def tasks(*states: TaskState) -> dict[str, TaskState]:
    return {t.task_id: t for t in states}


def blocker(task: TaskState, *others: TaskState) -> Lease | None:
    """Both ways of asking must agree: one task's question, and a scheduling pass's index."""
    everyone = tasks(task, *others)
    one = lease_blocker(task, everyone)
    assert LeaseIndex.of(everyone).blocker(task) == one
    return one


def test_the_same_file_in_the_same_repository_blocks_with_its_reason():
    holder = state("in_progress", "acme_repo-1")
    waiting = state("queued", "acme_repo-2", ("README.md", "src/calc.py"))
    lease = blocker(waiting, holder)
    assert lease == Lease(holder="acme_repo-1", paths=("src/calc.py",))
    assert lease.reason == "file lease: src/calc.py held by acme_repo-1"
    assert blocker(state("queued", "acme_repo-3", ("README.md",)), holder) is None  # no overlap


@pytest.mark.parametrize(("mine", "theirs", "shared"), [
    (("src/calc.py",), ("src/",), ("src/calc.py",)),  # a file inside their directory
    (("src/calc.py",), ("src",), ("src/calc.py",)),
    (("src",), ("src/calc.py",), ("src",)),  # my directory holds their file
    (("/src/calc.py",), ("src/calc.py/",), ("/src/calc.py",)),  # slashes at the ends do not matter
    (("src/deep/a.py", "docs/x.md", "src/b.py"), ("src/deep",), ("src/deep/a.py",)),
    (("src2/calc.py",), ("src/",), ()),  # a prefix of the name is not a directory
    (("src/calculator.py",), ("src/calc.py",), ()),
    (("src/calc.py",), (), ()),
])
def test_overlap_is_the_same_file_or_one_inside_a_predicted_directory(mine, theirs, shared):
    assert shared_paths(mine, theirs) == shared
    lease = blocker(state("queued", "acme_repo-2", mine), state("testing", "acme_repo-1", theirs))
    assert (lease.paths if lease else ()) == shared


def test_another_repository_never_blocks():
    holder = state("in_progress", "acme_repo-1", repo="acme/repo")
    assert blocker(state("queued", "acme_other-1", repo="acme/other"), holder) is None
    index = LeaseIndex([holder])
    assert index.blocker(state("queued", "acme_other-1", repo="acme/other")) is None


@pytest.mark.parametrize("round_of", [fix_round, rebase_round], ids=["ci_fix", "rebase"])
def test_a_fix_or_rebase_round_is_never_blocked_and_holds_its_lease_while_queued(round_of):
    mine = round_of("acme_repo-2")
    assert mine.status == "queued" and mine.work != "implement"
    assert blocker(mine, state("in_progress", "acme_repo-1")) is None  # even by an older holder
    assert holds_lease(mine)
    lease = blocker(state("queued", "acme_repo-3"), mine)  # a new task waits for the round
    assert lease == Lease(holder="acme_repo-2", paths=CALC)


@pytest.mark.parametrize("status", TASK_STATUSES)
def test_who_holds_a_lease_by_status(status):
    """From assignment until the pull request is merged or the task ends: with an agent,
    while its pull request is open (checks, review, a human, the merge queue)."""
    task = state(status, "acme_repo-1")
    expected = status in {"assigned", "in_progress", "testing", "checking", "checks_failed", "review",
                          "needs_human", "conflicted", "merge_queued", "merging"}
    assert (status in HOLDING) == expected
    assert holds_lease(task) == expected
    assert (blocker(state("queued", "acme_repo-2"), task) is not None) == expected
    assert not holds_lease(replace(task, paths=()))  # predicting nothing, it holds nothing


def test_a_task_without_predicted_paths_is_never_blocked():
    assert blocker(state("queued", "acme_repo-2", ()), state("in_progress", "acme_repo-1")) is None


def test_a_holder_is_not_blocked_by_itself_or_by_another_holder():
    first, second = state("in_progress", "acme_repo-1"), state("review", "acme_repo-2")
    assert blocker(first, second) is None and blocker(second, first) is None
    queued = state("queued", "acme_repo-1")
    assert LeaseIndex([replace(queued, status="assigned")]).blocker(queued) is None  # its own lease


def test_the_holder_named_is_the_same_whatever_the_order():
    holders = [state("in_progress", f"acme_repo-{n}") for n in (5, 12, 3)]
    waiting = state("queued", "acme_repo-9")
    for order in permutations(holders):
        # the first by id (as text), not by the order the tasks were seen in
        assert LeaseIndex(order).blocker(waiting) == Lease(holder="acme_repo-12", paths=CALC)
        assert lease_blocker(waiting, tasks(waiting, *order)).holder == "acme_repo-12"


def test_a_scheduling_pass_takes_the_lease_of_each_task_it_assigns():
    first, second = state("queued", "acme_repo-1"), state("queued", "acme_repo-2")
    index = LeaseIndex.of(tasks(first, second))  # neither holds anything yet
    assert index.blocker(first) is None and index.blocker(second) is None
    index.take(first)  # assigned in this pass
    assert index.blocker(second) == Lease(holder="acme_repo-1", paths=CALC)
    other_repo = state("queued", "acme_other-1", repo="acme/other")
    assert index.blocker(other_repo) is None
    index.take(replace(second, paths=()))  # a task predicting nothing takes nothing
    assert index.blocker(state("queued", "acme_repo-3")) == Lease(holder="acme_repo-1", paths=CALC)


def test_a_lease_ends_with_its_task():
    holder = state("merging", "acme_repo-1")
    waiting = state("queued", "acme_repo-2")
    assert blocker(waiting, holder) is not None
    for status in ("completed", "failed", "cancelled"):
        assert blocker(waiting, replace(holder, status=status)) is None
