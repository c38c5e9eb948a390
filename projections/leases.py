"""File leases, pure: tasks of one repository predicted to touch the same files do not
run at the same time.

The analysis predicts which files a change will touch (``TaskState.paths``: named in
the issue, or by the model). A task *holds* a lease on its predicted paths from its
assignment until its pull request is merged or the task ends (failed, cancelled):
while it is with an agent, while its pull request is open (checks, review, the merge
queue), and while a fix or rebase round of it waits in the queue. A queued task whose
predicted paths overlap a holder's (the same file, or one inside a predicted
directory) waits: :func:`lease_blocker` says for whom and on which paths, for the
scheduler and for the board (``ccc tasks``, the status API).

The first task to be assigned wins; a fix or rebase round of a task already holding a
pull request is never held back (it owns its paths already, and waiting could
deadlock two rounds on each other).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from events.task_state import PR_OPEN, WITH_AGENT, TaskState

HOLDING: frozenset[str] = WITH_AGENT | PR_OPEN


class Lease(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    holder: str  # the task holding the lease
    paths: tuple[str, ...]  # the overlapping predicted paths

    @property
    def reason(self) -> str:
        return f"file lease: {', '.join(self.paths)} held by {self.holder}"


def holds_lease(task: TaskState) -> bool:
    return bool(task.paths) and (
        task.status in HOLDING or (task.status == "queued" and task.work != "implement"))


def _overlap(a: str, b: str) -> bool:
    a, b = a.strip("/"), b.strip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def shared_paths(mine: Iterable[str], theirs: Iterable[str]) -> tuple[str, ...]:
    theirs = tuple(theirs)
    return tuple(p for p in mine if any(_overlap(p, q) for q in theirs))


class LeaseIndex:
    """The lease holders of each repository, built once per scheduling pass (or view),
    and updated as the pass assigns tasks."""

    def __init__(self, tasks: Iterable[TaskState] = ()) -> None:
        self._by_repo: dict[str, dict[str, tuple[str, ...]]] = {}
        for t in tasks:
            if holds_lease(t):
                self.take(t)

    @classmethod
    def of(cls, tasks: Mapping[str, TaskState]) -> LeaseIndex:
        return cls(tasks.values())

    def take(self, task: TaskState) -> None:
        if task.paths:
            self._by_repo.setdefault(task.issue.repo, {})[task.task_id] = task.paths

    def blocker(self, task: TaskState) -> Lease | None:
        """Who holds a lease ``task`` must wait for, or None."""
        if not task.paths or task.work != "implement" or holds_lease(task):
            return None
        for holder, paths in sorted(self._by_repo.get(task.issue.repo, {}).items()):
            if holder == task.task_id:
                continue
            if shared := shared_paths(task.paths, paths):
                return Lease(holder=holder, paths=shared)
        return None


def lease_blocker(task: TaskState, tasks: Mapping[str, TaskState]) -> Lease | None:
    """Who holds a lease ``task`` must wait for (one task's question; a pass over many
    builds a :class:`LeaseIndex` once)."""
    if not task.paths or task.work != "implement":
        return None
    return LeaseIndex(t for t in tasks.values() if t.issue.repo == task.issue.repo).blocker(task)


class PredictionScore(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """How well the analysis predicted the files a change touches, over the tasks whose
    change is known (their pull request was opened)."""

    tasks: int = 0  # tasks with a prediction and a known change
    hits: int = 0  # ... whose change touched a predicted file (the lease was about the right files)
    predicted: int = 0  # predicted files, over those tasks
    touched: int = 0  # ... of which the change touched
    changed: int = 0  # files the changes touched
    unpredicted_tasks: int = 0  # tasks with a known change and no prediction at all

    @property
    def hit_rate(self) -> float:
        return self.hits / self.tasks if self.tasks else 0.0

    @property
    def precision(self) -> float:
        return self.touched / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.touched / self.changed if self.changed else 0.0


def prediction_score(tasks: Iterable[TaskState]) -> PredictionScore:
    tasks_n = hits = predicted = touched = changed = unpredicted = 0
    for t in tasks:
        if not t.files_changed:
            continue
        if not t.paths:
            unpredicted += 1
            continue
        tasks_n += 1
        right = shared_paths(t.paths, t.files_changed)
        hits += bool(right)
        predicted += len(t.paths)
        touched += len(right)
        changed += len(t.files_changed)
    return PredictionScore(tasks=tasks_n, hits=hits, predicted=predicted, touched=touched, changed=changed,
                           unpredicted_tasks=unpredicted)
