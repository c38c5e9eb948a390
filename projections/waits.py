"""Why a task waits, pure: one short sentence for a task that is not moving by itself.

A task with an agent, or being analysed, moves by itself; every other non-final task
waits for something: its pull request's checks, the merge queue, a human, a file lease
held by another task, a dependency, a retry backoff, a fairness limit, a free agent.
The board (``ccc tasks``) and the status API show that sentence beside the state, so
nobody has to read the log to see what a task is waiting for.

A queued task's reasons come in the scheduler's order of checks (:mod:`actors.scheduling`):
dependencies, retry backoff, file lease, budget (``budget:<scope>``: a scope of the spend
ledger, :mod:`events.spend`, is exhausted — given the ledger as ``budget=``), fairness
(:mod:`projections.fairness`: its repository or author at its limit of tasks with an
agent, or kept for a task starving ahead of it — the same check the scheduler makes,
given the same policy), a hook plugin's assignment policy holding it back (``plugin
<name> vetoes it: ...`` / ``... delays it until ...``: the words of the coordinator's
holds, :mod:`actors.plugins`, given as ``plugins=``), then which
agent it needs. The fairness reason appears only when the caller passes the cluster's
:class:`~projections.fairness.FairnessPolicy` (``fairness=``).

:func:`why_waiting` answers for one task; :class:`Waits` answers for many, building the
file leases (:mod:`projections.leases`) and the merge queues once. Both read only the
task states and ``now`` (no clock here), so the same log and the same ``now`` always
give the same words. A task that is not waiting gets ``""``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple
from datetime import UTC, datetime

from events.agent_state import ACCEPTING, ONLINE, AgentState
from events.checks import failing
from events.spend import Book
from events.task import SECURITY_LEVELS
from events.task_state import WITH_AGENT, TaskState

from projections.fairness import Admission, FairnessPolicy, Limit, age, in_order
from projections.leases import LeaseIndex

MAX_WAIT_CHARS = 200  # one cell of a table; the rest is in the task's own fields
MAX_NAMES = 3  # paths, checks, dependencies listed before "+n more"
RERUN_KIND = {"flaky": "flaky?", "infrastructure": "infrastructure"}
# the statuses whose reason reads ``now`` (a backoff left, checks running for so long, a
# fairness pass): any other status's words change only with the task and the board, so a
# view may keep them for as long as both are unchanged (the status API does)
CLOCKED: frozenset[str] = frozenset({"queued", "checking", "merging"})


# -- words ------------------------------------------------------------------------------
def clock(at: datetime, now: datetime) -> str:
    """``at`` in UTC: the time of day if it is ``now``'s UTC day, else date and time."""
    at_utc, now_utc = at.astimezone(UTC), now.astimezone(UTC)
    if at_utc.date() == now_utc.date():
        return at_utc.strftime("%H:%M:%S")
    return at_utc.strftime("%Y-%m-%d %H:%M")


def names(values: Iterable[str], limit: int = MAX_NAMES) -> str:
    """``a, b, c +2 more`` (in the order given)."""
    items = [v for v in values if v]
    shown = ", ".join(items[:limit])
    return shown + (f" +{len(items) - limit} more" if len(items) > limit else "")


def sha7(sha: str) -> str:
    return sha[:7] if sha else "(no commit)"


def _since(at: datetime | None, now: datetime) -> str:
    return f" since {clock(at, now)} ({age((now - at).total_seconds())})" if at is not None else ""


def _bounded(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_WAIT_CHARS else text[: MAX_WAIT_CHARS - 1] + "…"


# -- the merge queues -------------------------------------------------------------------
class MergeQueues:
    """Each repository's (and base branch's) merge queue, in order: the task under test
    (``merging``) first, then the queued ones by when they entered (their last change,
    then their id)."""

    def __init__(self, tasks: Iterable[TaskState] = ()) -> None:
        lanes: dict[tuple[str, str], list[TaskState]] = {}
        for t in tasks:
            if t.status in ("merging", "merge_queued"):
                lanes.setdefault(self.lane(t), []).append(t)
        self._order: dict[tuple[str, str], list[str]] = {
            lane: [t.task_id for t in sorted(queue, key=lambda t: (t.status != "merging",
                                                                   t.merge_queued_at or t.updated_at,
                                                                   t.task_id))]
            for lane, queue in lanes.items()
        }

    @staticmethod
    def lane(task: TaskState) -> tuple[str, str]:
        return task.issue.repo, task.base_branch

    def position(self, task: TaskState) -> tuple[int, int]:
        """(1-based place of ``task``, the queue's length); (0, length) if not in it."""
        order = self._order.get(self.lane(task), [])
        return (order.index(task.task_id) + 1 if task.task_id in order else 0), len(order)


# -- the reasons ------------------------------------------------------------------------
def why_waiting(
    task: TaskState,
    tasks: Mapping[str, TaskState],
    now: datetime,
    lease_index: LeaseIndex | None = None,
    *,
    merge_queues: MergeQueues | None = None,
    agents: Mapping[str, AgentState] | None = None,
    fairness: FairnessPolicy | None = None,
    budget: Book | None = None,
    plugins: Mapping[str, str] | None = None,
) -> str:
    """What ``task`` waits for, in a few words, or ``""`` if it moves by itself (or is
    done). ``tasks``: every task (dependencies, leases, queue order); ``lease_index`` and
    ``merge_queues``: built once by a caller asking about many tasks (see :class:`Waits`);
    ``agents``: the agent view, to say *which* agent a queued task waits for (none online
    with its specialty, or all capable ones full); ``fairness``: the cluster's admission
    policy, to say when a fairness limit holds the task back; ``budget``: the spend
    ledger, to say when an exhausted scope does; ``plugins``: ``{task id: words}`` of the
    hook plugins' holds in force (the coordinator's, :mod:`actors.plugins`)."""
    held_back = None
    if fairness is not None and task.status == "queued" and fairness.limited:
        held_back = fairness_pass(tasks, now, fairness, lease_index, budget)
    return _bounded(_reason(task, tasks, now, lease_index, merge_queues, agents, held_back, budget, plugins))


def fairness_pass(tasks: Mapping[str, TaskState], now: datetime, policy: FairnessPolicy,
                  leases: LeaseIndex | None = None, budget: Book | None = None) -> dict[str, Limit]:
    """The scheduler's fairness checks over the eligible queued tasks, in its order
    (:class:`~projections.fairness.Admission`): which ones a limit holds back now, and why."""
    if not policy.limited:
        return {}
    leases = LeaseIndex.of(tasks) if leases is None else leases
    admission = Admission(policy, tasks)
    held_back: dict[str, Limit] = {}
    for t, since in in_order(tasks, now, policy):
        if leases.blocker(t) is not None or (
                budget is not None and budget.holds_back(t.task_id, t.issue.repo, t.issue.author, now)):
            continue  # the scheduler skips it before its fairness check
        if (limit := admission.hold_back(t, since, now)) is not None:
            held_back[t.task_id] = limit
    return held_back


def fairness_words(limit: Limit) -> str:
    """``fairness: repository acme/app at its limit (2 running)``, or ``... kept for T
    (waiting 1h 5m)``."""
    if limit.kept_for:
        return f"fairness: {limit.kind} {limit.name} kept for {limit.kept_for} (waiting {age(limit.waited)})"
    return f"fairness: {limit.kind} {limit.name} at its limit ({limit.running} running)"


def _reason(task: TaskState, tasks: Mapping[str, TaskState], now: datetime,
            leases: LeaseIndex | None, queues: MergeQueues | None,
            agents: Mapping[str, AgentState] | None = None,
            held_back: Mapping[str, Limit] | None = None, budget: Book | None = None,
            plugins: Mapping[str, str] | None = None,
            which_agent: Callable[[TaskState], str] | None = None) -> str:
    t = task
    match t.status:
        case "pending":
            return "waiting for analysis"
        case "queued":
            return _queued(t, tasks, now, leases, agents, held_back, budget, plugins, which_agent)
        case "checking":
            if t.reruns and failing(t.checks):
                return f"re-running {_rerun(t)} on {sha7(t.head_sha)}{_since(t.checks_since, now)}"
            return f"checks running on {sha7(t.head_sha)}{_since(t.checks_since, now)}"
        case "checks_failed":
            return f"checks failed on {sha7(t.head_sha)} ({t.classification or 'unclassified'})"
        case "review":
            if t.approved:
                by = f" by {t.approved_by}" if t.approved_by else ""
                return f"approved{by}; waiting for the pull request to be merged"
            return "checks green; waiting for approval"
        case "needs_human":
            return f"needs a human: {t.needed or t.status_reason or 'see the task'}"
        case "conflicted":
            files = names(t.conflict_files) or "some files"
            return f"conflicts with {t.base_branch or 'the base'} in {files}"
        case "merge_queued":
            place, length = (MergeQueues(tasks.values()) if queues is None else queues).position(t)
            return f"queued for merge (position {place} of {length})" if place else "queued for merge"
        case "merging":
            if t.reruns:  # (the queue's failing checks are not kept: only the reason)
                return (f"merge queue: re-running the checks of {sha7(t.queue_sha)} (re-run {t.reruns})"
                        f"{_since(t.checks_since, now)}")
            return f"merge queue: testing {sha7(t.queue_sha)}{_since(t.checks_since, now)}"
        case "failed":
            return "failed; a retry follows" if t.can_retry else ""
    if t.status in WITH_AGENT and t.cancel_requested:
        return f"cancellation requested; waiting for {t.agent_id or 'the agent'} to stop"
    return ""  # analysing, with an agent, or final: moving by itself, or done


def _rerun(t: TaskState) -> str:
    checks = names(sorted(c.name for c in failing(t.checks)))
    return f"{checks} ({RERUN_KIND.get(t.classification, 'requested')})"


def _queued(t: TaskState, tasks: Mapping[str, TaskState], now: datetime, leases: LeaseIndex | None,
            agents: Mapping[str, AgentState] | None = None,
            held_back: Mapping[str, Limit] | None = None, budget: Book | None = None,
            plugins: Mapping[str, str] | None = None,
            which_agent: Callable[[TaskState], str] | None = None) -> str:
    open_deps = [(d, tasks[d].status if d in tasks else "unknown task") for d in t.dependencies
                 if d not in tasks or tasks[d].status != "completed"]
    if open_deps:
        word = "dependency" if len(open_deps) == 1 else "dependencies"
        return f"waiting for {word} " + names(f"{d} ({status})" for d, status in open_deps)
    if t.not_before is not None and t.not_before > now:
        left = age((t.not_before - now).total_seconds())
        return f"retry backoff until {clock(t.not_before, now)} ({left} left)"
    if leases is None:
        leases = LeaseIndex(x for x in tasks.values() if x.issue.repo == t.issue.repo)
    lease = leases.blocker(t)
    if lease is not None:
        return f"file lease: {names(lease.paths)} held by {lease.holder}"
    if budget is not None and (money := budget.holds_back(t.task_id, t.issue.repo, t.issue.author, now)):
        return money
    if held_back and (limit := held_back.get(t.task_id)) is not None:
        return fairness_words(limit)
    if plugins and (words := plugins.get(t.task_id)):
        return words
    agent = ("an agent" if agents is None else which_agent(t) if which_agent is not None
             else _which_agent(t, tasks, agents))
    if t.work == "ci_fix":
        of = f" of {t.max_ci_fixes}" if t.max_ci_fixes >= t.ci_fixes > 0 else ""
        return f"CI fix round {t.ci_fixes}{of} queued, waiting for {agent}"
    if t.work == "rebase":
        on = f" on {t.base_branch}" if t.base_branch else ""
        files = f" (conflicts in {names(t.conflict_files)})" if t.conflict_files else ""
        return f"rebase{on} queued{files}, waiting for {agent}"
    return f"waiting for {agent}"


def _which_agent(t: TaskState, tasks: Mapping[str, TaskState], agents: Mapping[str, AgentState]) -> str:
    """Which agent the queued task waits for, as the scheduler would pick one: online,
    taking work, with its specialty (or ``general``: a general agent takes any task; no
    other fallback) and the clearance for its security level."""
    online = [a for a in agents.values() if a.status in ONLINE]
    if not online:
        return "an agent: none is online"
    rank = SECURITY_LEVELS.index(t.security_level) if t.security_level in SECURITY_LEVELS else 0
    can_do = [a for a in online if t.specialty in a.specialties or "general" in a.specialties]
    if not can_do:
        have = names(sorted({s for a in online for s in a.specialties}))
        return f"a {t.specialty} or general agent: none online (online: {have})"
    cleared = [a for a in can_do
               if (SECURITY_LEVELS.index(a.clearance) if a.clearance in SECURITY_LEVELS else 0) >= rank]
    if not cleared:
        return f"an agent cleared for {t.security_level} work: none of the {t.specialty} agents online is"
    taking = [a for a in cleared if a.status in ACCEPTING]
    if not taking:
        return f"a {t.specialty} agent to take work: {names(sorted(a.agent_id for a in cleared))} overloaded"
    held: dict[str, int] = {}
    for x in tasks.values():
        if x.status in WITH_AGENT and x.agent_id:
            held[x.agent_id] = held.get(x.agent_id, 0) + 1
    used = sum(min(held.get(a.agent_id, 0), a.capacity) for a in taking)
    slots = sum(a.capacity for a in taking)
    if used >= slots:
        return f"a free {t.specialty} agent: all {len(taking)} capable busy ({used}/{slots} slots)"
    return "the scheduler (a capable agent has a free slot)"


class Holds(NamedTuple):
    """What holds queued tasks back that the log does not show: the spend ledger as last
    seen and the hook plugins' holds in force (``{task id: words}``). A view that keeps
    its :class:`Waits` per log position keys it with :meth:`key` too."""

    budget: Book | None = None
    plugins: Mapping[str, str] | None = None

    def key(self) -> tuple:
        return (self.budget.version if self.budget is not None else -1,
                frozenset(self.plugins.items()) if self.plugins else frozenset())


class Waits:
    """:func:`why_waiting` for many tasks of one board: the leases and the merge queues
    are built once, from ``tasks`` as they are now (and the fairness pass once per ``now``)."""

    @classmethod
    def of(cls, tasks: Mapping[str, TaskState], agents: Mapping[str, AgentState] | None,
           fairness: FairnessPolicy | None, holds: Holds) -> Waits:
        return cls(tasks, agents, fairness=fairness, budget=holds.budget, plugins=holds.plugins)

    def __init__(self, tasks: Mapping[str, TaskState], agents: Mapping[str, AgentState] | None = None,
                 fairness: FairnessPolicy | None = None, budget: Book | None = None,
                 plugins: Mapping[str, str] | None = None) -> None:
        self.tasks = tasks
        self.plugins = plugins
        self.agents = agents
        self.fairness = fairness
        self.budget = budget
        self.leases = LeaseIndex.of(tasks)
        self.queues = MergeQueues(tasks.values())
        self._held_back: tuple[datetime, dict[str, Limit]] | None = None
        # which agent a queued task waits for depends on its specialty and security level
        # and on the board, not on the task or the time: worked out once per kind (a scan
        # of every task per queued task made a page of the board cost O(tasks) per item)
        self._which: dict[tuple[str, str], str] = {}

    def _which_agent(self, task: TaskState) -> str:
        key = (task.specialty, task.security_level)
        words = self._which.get(key)
        if words is None:
            assert self.agents is not None
            words = self._which[key] = _which_agent(task, self.tasks, self.agents)
        return words

    def why(self, task: TaskState, now: datetime) -> str:
        held_back = None
        if self.fairness is not None and task.status == "queued" and self.fairness.limited:
            if self._held_back is None or self._held_back[0] != now:
                self._held_back = (now, fairness_pass(self.tasks, now, self.fairness, self.leases, self.budget))
            held_back = self._held_back[1]
        return _bounded(_reason(task, self.tasks, now, self.leases, self.queues, self.agents, held_back,
                                self.budget, self.plugins, self._which_agent))


__all__ = ["CLOCKED", "MAX_WAIT_CHARS", "Holds", "MergeQueues", "Waits", "age", "clock", "fairness_pass",
           "fairness_words", "names", "sha7", "why_waiting"]
