"""Fair admission, pure: in which order queued tasks are offered to agents, and which
ones wait because their repository or their author already has enough agents.

The scheduler (:mod:`actors.scheduling`) and the board's wait reasons
(:mod:`projections.waits`) both decide with this module, so what the board says is what
the scheduler does.

**Order (lanes, then priority, then aging).** Every eligible queued task gets an
*urgency*, in levels::

    urgency = LANE_LEVELS * lane + priority + waited / aging

* ``lane`` 2: a round on an open pull request (``work`` is ``ci_fix`` or ``rebase``);
  lane 1: a review follow-up (a retry of the implementation carrying guidance);
  lane 0: a new issue. A lane is worth ``LANE_LEVELS`` (= the number of priorities)
  levels, so without waiting any follow-up comes before any new issue, whatever their
  priorities.
* ``priority``: 0 (low) to 3 (urgent).
* ``waited``: seconds since the task became ready — the latest of when it (last)
  entered the queue, its retry backoff's end and each dependency's completion.
  ``aging`` seconds of waiting are worth one level (``FairnessPolicy.aging``, 300 s by
  default; ``None`` turns aging off: lanes and priority only, then age).

Highest urgency first; ties by readiness (older first), then task id. Because urgency
grows without bound while a newcomer starts at most at ``TOP_LEVEL`` (an urgent CI fix),
a task that has waited ``horizon = aging * TOP_LEVEL`` (55 min by default) outranks
every task that arrives from then on: only finitely many tasks are ever ahead of it.

**Limits.** ``repo_limit``/``author_limit`` (and per-name overrides) cap the tasks *with
an agent* (assigned, in progress, testing) per repository (``issue.repo``) and per author
(``issue.author``; tasks without an author are not author-limited). A task whose
repository or author is at its limit waits (``fairness: repository r at its limit (n
running)``) and lets the tasks behind it go. Limits count tasks with an agent only: an
open pull request waiting for checks or review holds no slot.

**No starvation across two limits.** A task blocked on one limit could otherwise be
overtaken for ever by tasks using the other (its author's slots taken by its other
repositories while its repository is full, and the other way round). So a task that has
waited past the horizon and is blocked by a limit *keeps* its repository and its author:
tasks behind it in the order, of the same repository or author, wait too (``fairness:
repository r kept for <task> (waiting 1h 5m)``) until it is assigned. Tasks ahead of it
are not held back, and they are finitely many; so given continuing capacity (running
tasks finish), every task is assigned after a bounded wait
(``tests/unit/test_fair_admission.py`` checks it over random arrival sequences).

**In words.** :func:`explain` says where a queued task stands in this order (its lane and
its urgency now); the scheduler's reason for an assignment (``actors.assignment_why``)
starts with the same words, so the task view reads the same before and after the choice.

Everything here is a pure function of the task view, the policy and ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from events.task import PRIORITIES
from events.task_state import WITH_AGENT, TaskState

LANE_LEVELS = len(PRIORITIES)  # a lane outranks every priority
LANES = ("new issue", "review follow-up", "pull request round")
TOP_LEVEL = LANE_LEVELS * (len(LANES) - 1) + len(PRIORITIES) - 1  # the most urgent newcomer
DEFAULT_AGING = 300.0  # seconds of waiting per level


class FairnessPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster's admission policy. Limits: ``None`` = unlimited; ``repo_limits`` and
    ``author_limits`` override the default for named repositories / authors."""

    repo_limit: int | None = None
    author_limit: int | None = None
    repo_limits: dict[str, int] = msgspec.field(default_factory=dict)
    author_limits: dict[str, int] = msgspec.field(default_factory=dict)
    aging: float | None = DEFAULT_AGING

    def __post_init__(self) -> None:
        for what, value in (("repo_limit", self.repo_limit), ("author_limit", self.author_limit),
                            *((f"repo_limits[{k!r}]", v) for k, v in self.repo_limits.items()),
                            *((f"author_limits[{k!r}]", v) for k, v in self.author_limits.items())):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{what} must be a whole number >= 1 (or unset: unlimited), got {value!r}")
        if self.aging is not None and (isinstance(self.aging, bool) or not isinstance(self.aging, int | float)
                                       or not self.aging > 0 or self.aging == float("inf")):
            raise ValueError(f"aging must be a number of seconds > 0 (or None: no aging), got {self.aging!r}")

    @property
    def limited(self) -> bool:
        return bool(self.repo_limit or self.author_limit or self.repo_limits or self.author_limits)

    @property
    def horizon(self) -> float | None:
        """Seconds after which a waiting task outranks every newcomer (and keeps its
        repository and author when a limit holds it back)."""
        return None if self.aging is None else self.aging * TOP_LEVEL

    def repo_cap(self, repo: str) -> int | None:
        return self.repo_limits.get(repo, self.repo_limit)

    def author_cap(self, author: str) -> int | None:
        return self.author_limits.get(author, self.author_limit) if author else None


DEFAULT_POLICY = FairnessPolicy()


def parse_limits(values: Iterable[str], what: str = "limit") -> tuple[int | None, dict[str, int]]:
    """``["3", "acme/app=5"]`` -> ``(3, {"acme/app": 5})``: a bare number is the default
    limit, ``name=n`` one name's (for repeatable CLI flags). Bad input: ValueError."""
    default: int | None = None
    named: dict[str, int] = {}
    for raw in values:
        name, sep, number = raw.rpartition("=")
        try:
            n = int(number.strip())
        except ValueError:
            raise ValueError(f"{what} {raw!r}: expected N or NAME=N with N a whole number >= 1") from None
        if n < 1 or (sep and not name.strip()):
            raise ValueError(f"{what} {raw!r}: expected N or NAME=N with N a whole number >= 1")
        if sep:
            named[name.strip()] = n
        else:
            default = n
    return default, named


# -- order -------------------------------------------------------------------------------------
def lane(task: TaskState) -> int:
    """2: a CI fix or rebase round; 1: a review follow-up (a retry with guidance); 0: new."""
    if task.work != "implement":
        return 2
    return 1 if task.guidance else 0


def ready_since(task: TaskState, tasks: Mapping[str, TaskState]) -> datetime | None:
    """When ``task`` became ready to assign (queued, its backoff over, its dependencies
    completed); None while a dependency is not completed (unknown counts as not)."""
    # a queued task changes only when it leaves the queue; one taken back from a lost
    # agent (or handed back) keeps the place it had (TaskState.queued_since)
    since = task.queued_since or task.updated_at
    if task.not_before is not None and task.not_before > since:
        since = task.not_before
    for d in task.dependencies:
        dep = tasks.get(d)
        if dep is None or dep.status != "completed":
            return None
        since = max(since, dep.updated_at)
    return since


def urgency(task: TaskState, since: datetime, now: datetime,
            policy: FairnessPolicy = DEFAULT_POLICY) -> float:
    level = LANE_LEVELS * lane(task) + (PRIORITIES.index(task.priority) if task.priority in PRIORITIES else 0)
    if policy.aging is None:
        return float(level)
    return level + max(0.0, (now - since).total_seconds()) / policy.aging


def in_order(tasks: Mapping[str, TaskState], now: datetime, policy: FairnessPolicy = DEFAULT_POLICY,
             queued: Iterable[str] | None = None) -> list[tuple[TaskState, datetime]]:
    """The eligible queued tasks (backoff over, dependencies completed) with their
    readiness, most urgent first. ``queued``: the candidate ids (default: all tasks)."""
    candidates = tasks.values() if queued is None else (tasks[t] for t in queued)
    ready: list[tuple[float, datetime, str, TaskState]] = []
    for t in candidates:
        if t.status != "queued" or (t.not_before is not None and t.not_before > now):
            continue
        since = ready_since(t, tasks)
        if since is not None:
            ready.append((-urgency(t, since, now, policy), since, t.task_id, t))
    ready.sort(key=lambda r: r[:3])
    return [(r[3], r[1]) for r in ready]


def starving(since: datetime, now: datetime, policy: FairnessPolicy = DEFAULT_POLICY) -> bool:
    """Waited past the horizon: it outranks every newcomer, and keeps its repository
    and author when a limit holds it back."""
    horizon = policy.horizon
    return horizon is not None and (now - since).total_seconds() >= horizon


# -- in words ----------------------------------------------------------------------------------
WORK_WORDS = {"ci_fix": "CI fix", "rebase": "rebase"}


def lane_words(task: TaskState) -> str:
    """``new issue``, ``review follow-up``, ``pull request round (CI fix)``."""
    work = WORK_WORDS.get(task.work)
    return f"{LANES[lane(task)]} ({work})" if work else LANES[lane(task)]


def explain(task: TaskState, now: datetime, policy: FairnessPolicy = DEFAULT_POLICY,
            tasks: Mapping[str, TaskState] | None = None) -> str:
    """Where a queued task stands in the scheduler's order now, in one line::

        lane: pull request round (CI fix); urgency 9.4 (priority high, waited 12m)

    ``""`` for a task that is not queued. ``tasks``: every task, so that readiness counts
    its dependencies' completion (without it: since it entered the queue or its backoff
    ended). A task not ready yet (a dependency open, a backoff running) has no urgency:
    the wait reason (:mod:`projections.waits`) says what it waits for."""
    if task.status != "queued":
        return ""
    head = f"lane: {lane_words(task)}"
    if tasks is not None:
        since = ready_since(task, tasks)
    else:
        since = task.not_before if task.not_before is not None and task.not_before > task.updated_at \
            else task.updated_at
    if since is None or since > now:
        return f"{head}; priority {task.priority}; not ready yet"
    waited = (now - since).total_seconds()
    level = urgency(task, since, now, policy)
    if policy.aging is None:
        return f"{head}; urgency {level:g} (priority {task.priority}, waited {age(waited)}; aging off)"
    past = ", past the aging horizon" if starving(since, now, policy) else ""  # (ahead of every newcomer)
    return f"{head}; urgency {level:.1f} (priority {task.priority}, waited {age(waited)}{past})"


def age(seconds: float) -> str:
    """A duration as a person reads it: ``40s``, ``5m``, ``1h 5m``, ``2d 3h`` (the words of
    every wait reason, :mod:`projections.waits` too)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m = s // 60
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d {h}h" if h else f"{d}d"


# -- limits ------------------------------------------------------------------------------------
class Limit(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Why a task waits for fairness: its repository or author is at its limit, or kept
    for an older task."""

    kind: str  # "repository" | "author"
    name: str
    running: int = 0
    limit: int = 0
    kept_for: str = ""  # the starving task that keeps it
    waited: float = 0.0  # ... and how long it had waited, seconds (the words: projections.waits)


def limit_blocker(task: TaskState, policy: FairnessPolicy, repo_running: Mapping[str, int],
                  author_running: Mapping[str, int]) -> Limit | None:
    """The one limit check (the scheduler's and the board's): is ``task``'s repository
    or author at its limit, given how many tasks of each have an agent now?"""
    repo, author = task.issue.repo, task.issue.author
    cap = policy.repo_cap(repo)
    if cap is not None and (n := repo_running.get(repo, 0)) >= cap:
        return Limit(kind="repository", name=repo, running=n, limit=cap)
    cap = policy.author_cap(author)
    if cap is not None and (n := author_running.get(author, 0)) >= cap:
        return Limit(kind="author", name=author, running=n, limit=cap)
    return None


class Admission:
    """One pass's fairness state: tasks with an agent per repository and author (from
    ``running``, the ids of the tasks holding an agent — the read model's holders plus
    reservations — or from the task view), updated as the pass assigns; and what starving
    tasks keep. Costs nothing when the policy has no limits."""

    def __init__(self, policy: FairnessPolicy, tasks: Mapping[str, TaskState],
                 running: Iterable[str] | None = None) -> None:
        self.policy = policy
        self.repos: dict[str, int] = {}
        self.authors: dict[str, int] = {}
        self.kept: dict[tuple[str, str], Limit] = {}  # (kind, name) -> kept for whom
        if not policy.limited:
            return
        if running is None:
            holding: Iterable[TaskState] = (t for t in tasks.values() if t.status in WITH_AGENT)
        else:
            holding = (tasks[tid] for tid in set(running) if tid in tasks)
        for t in holding:
            self.take(t)

    def take(self, task: TaskState) -> None:
        if self.policy.limited:
            self.repos[task.issue.repo] = self.repos.get(task.issue.repo, 0) + 1
            if task.issue.author:
                self.authors[task.issue.author] = self.authors.get(task.issue.author, 0) + 1

    def blocker(self, task: TaskState) -> Limit | None:
        if not self.policy.limited:
            return None
        if self.kept:
            for key in (("repository", task.issue.repo), ("author", task.issue.author)):
                kept = self.kept.get(key)
                if kept is not None and kept.kept_for != task.task_id:
                    return kept
        return limit_blocker(task, self.policy, self.repos, self.authors)

    def hold_back(self, task: TaskState, since: datetime, now: datetime) -> Limit | None:
        """The pass's question for the next task in order: its blocker, if any; a blocked
        starving task keeps its repository and author from the tasks behind it."""
        limit = self.blocker(task)
        if limit is not None and not limit.kept_for and starving(since, now, self.policy):
            waited = (now - since).total_seconds()
            for kind, name in (("repository", task.issue.repo), ("author", task.issue.author)):
                if name:
                    self.kept.setdefault((kind, name), Limit(kind=kind, name=name, kept_for=task.task_id,
                                                             waited=waited))
        return limit


__all__ = ["DEFAULT_POLICY", "LANES", "LANE_LEVELS", "TOP_LEVEL", "WORK_WORDS", "Admission", "FairnessPolicy",
           "Limit", "explain", "in_order", "lane", "lane_words", "limit_blocker", "parse_limits", "ready_since",
           "starving", "urgency"]
