"""Scheduling, pure: which queued task goes to which agent, now.

Eligible tasks: Queued, past their retry backoff, every dependency Completed.
Order (:mod:`projections.fairness`): lanes (a CI fix or rebase round, then a review
follow-up, then a new issue), then priority, raised by aging (one level per
``FairnessPolicy.aging`` seconds of waiting, so nothing starves); then the oldest.
Budget (:mod:`events.spend`): a task whose task, repository, author or day scope is
exhausted waits (``budget:<scope>``) and takes no fairness slot. Fairness limits: a task whose repository or author already has its limit of tasks with
an agent waits, and the tasks behind it go (a task starving past the horizon keeps its
repository and author from those behind it). Eligible agents: accepting work
(idle/busy) with a free slot, clearance >= the task's security level, and the
task's specialty (preferred) or ``general``. Among those: specialists before
generalists, then least loaded, then id (deterministic).

Load counts the tasks the *task view* says an agent holds (assigned, in progress,
testing): that view includes our own assignments as soon as they are applied, so
it never lags behind the agent's own reports.

File leases (:mod:`projections.leases`): a task predicted to touch files that a task of
the same repository holds (it runs, or its pull request is open) waits; the first one
assigned in a pass takes the lease for the rest of the pass."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from events.agent_state import ACCEPTING, AgentState
from events.spend import Book
from events.task_state import WITH_AGENT, TaskState

from projections.fairness import DEFAULT_POLICY, Admission, FairnessPolicy, in_order
from projections.leases import LeaseIndex

from actors.analysis import SECURITY_RANK


def held_by_agent(tasks: Mapping[str, TaskState]) -> dict[str, int]:
    held: dict[str, int] = {}
    for t in tasks.values():
        if t.status in WITH_AGENT and t.agent_id:
            held[t.agent_id] = held.get(t.agent_id, 0) + 1
    return held


def blocked_by(task: TaskState, tasks: Mapping[str, TaskState]) -> list[str]:
    """Dependencies not yet completed (unknown ones count as not completed)."""
    return [d for d in task.dependencies if (dep := tasks.get(d)) is None or dep.status != "completed"]


def eligible_tasks(
    tasks: Mapping[str, TaskState], now: datetime, queued: Iterable[str] | None = None,
    policy: FairnessPolicy = DEFAULT_POLICY,
) -> list[TaskState]:
    """The tasks a pass may assign, in the order it offers them (most urgent first)."""
    return [t for t, _ in in_order(tasks, now, policy, queued)]


def can_take(agent: AgentState, task: TaskState) -> bool:
    return (
        agent.status in ACCEPTING
        and (task.specialty in agent.specialties or "general" in agent.specialties)
        and SECURITY_RANK.get(agent.clearance, 0) >= SECURITY_RANK.get(task.security_level, 0)
    )


def plan_assignments(
    tasks: Mapping[str, TaskState],
    agents: Mapping[str, AgentState],
    now: datetime,
    held: dict[str, int] | None = None,
    queued: Iterable[str] | None = None,
    *,
    policy: FairnessPolicy = DEFAULT_POLICY,
    running: Iterable[str] | None = None,
    budget: Book | None = None,
) -> list[tuple[str, str]]:
    """``[(task_id, agent_id), ...]`` to assign now. Pure. ``held``, ``queued`` and
    ``running`` are indexes the read model keeps (derived from ``tasks`` when not
    given): tasks per agent, the queued task ids, and the ids of the tasks holding an
    agent (the model's holders plus reservations; read only when ``policy`` has limits).
    ``budget``: the spend ledger as last seen (no ledger: nothing is held back for money)."""
    held = dict(held_by_agent(tasks) if held is None else held)
    free = {
        a.agent_id: a.capacity - held.get(a.agent_id, 0)
        for a in agents.values()
        if a.status in ACCEPTING and a.capacity > held.get(a.agent_id, 0)
    }
    plan: list[tuple[str, str]] = []
    if not free:
        return plan
    ready = in_order(tasks, now, policy, queued)
    # leases only matter when a candidate names files: the index costs a pass over the tasks
    leases = LeaseIndex.of(tasks) if any(t.paths for t, _ in ready) else None
    admission = Admission(policy, tasks, running)
    for task, since in ready:
        if leases is not None and leases.blocker(task) is not None:
            continue  # waits for the holder's pull request (see why_waiting)
        if budget is not None and budget.holds_back(task.task_id, task.issue.repo, task.issue.author, now):
            continue  # waits for the day to reset or the cap to be raised (see why_waiting)
        if admission.hold_back(task, since, now) is not None:
            continue  # its repository or author has its share (see why_waiting)
        best = None
        best_key = None
        for agent_id in free:
            agent = agents[agent_id]
            if not can_take(agent, task):
                continue
            key = (
                task.specialty not in agent.specialties,  # specialists first
                held.get(agent_id, 0) / agent.capacity,  # least loaded
                agent_id,
            )
            if best_key is None or key < best_key:
                best, best_key = agent_id, key
        if best is None:
            continue  # waits in Queued until an agent frees up
        plan.append((task.task_id, best))
        if leases is not None:
            leases.take(task)
        admission.take(task)
        held[best] = held.get(best, 0) + 1
        free[best] -= 1
        if free[best] == 0:
            del free[best]
            if not free:
                break
    return plan
