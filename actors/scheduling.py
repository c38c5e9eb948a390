"""Scheduling, pure: which queued task goes to which agent, now.

Eligible tasks: Queued, past their retry backoff, every dependency Completed.
Order: highest priority first, then oldest. Eligible agents: accepting work
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
from events.task import PRIORITIES
from events.task_state import WITH_AGENT, TaskState

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
    tasks: Mapping[str, TaskState], now: datetime, queued: Iterable[str] | None = None
) -> list[TaskState]:
    candidates = tasks.values() if queued is None else (tasks[t] for t in queued)
    ready = [
        t for t in candidates
        if t.status == "queued"
        and (t.not_before is None or t.not_before <= now)
        and not blocked_by(t, tasks)
    ]
    ready.sort(key=lambda t: (-PRIORITIES.index(t.priority), t.created_at, t.task_id))
    return ready


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
) -> list[tuple[str, str]]:
    """``[(task_id, agent_id), ...]`` to assign now. Pure. ``held`` and ``queued``
    are indexes the read model keeps (derived from ``tasks`` when not given)."""
    held = dict(held_by_agent(tasks) if held is None else held)
    free = {
        a.agent_id: a.capacity - held.get(a.agent_id, 0)
        for a in agents.values()
        if a.status in ACCEPTING and a.capacity > held.get(a.agent_id, 0)
    }
    plan: list[tuple[str, str]] = []
    if not free:
        return plan
    ready = eligible_tasks(tasks, now, queued)
    # leases only matter when a candidate names files: the index costs a pass over the tasks
    leases = LeaseIndex.of(tasks) if any(t.paths for t in ready) else None
    for task in ready:
        if leases is not None and leases.blocker(task) is not None:
            continue  # waits for the holder's pull request (see why_waiting)
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
        held[best] = held.get(best, 0) + 1
        free[best] -= 1
        if free[best] == 0:
            del free[best]
            if not free:
                break
    return plan
