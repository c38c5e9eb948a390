"""Demand per specialty, pure: how many agent slots of each specialty the tasks need now —
the number KEDA scales each specialty's agent Deployment on.

A task needs a slot of a specialty while it

* **waits** for an agent: queued, and an agent could start it now. That is the
  autoscaler's definition (:func:`projections.autoscale.startable`: not waiting for a
  dependency, a retry backoff or a file lease, which no new agent would hurry), used
  here as it is, so ``ccc up --autoscale`` and KEDA see the same queues. Its specialty
  is the task's own when the cluster has agents of it; any other (an old log, a newer
  analyser) is ``general``'s, the one kind of agent the scheduler would give it
  (``actors.scheduling.can_take``: the task's specialty, or ``general``);
* **holds** an agent (assigned, in progress, testing), under the specialty of the agent
  that holds it (the task's own if the agent has it, else the agent's first): that
  agent's pod is busy, and must not be counted as spare.

Why both: KEDA's ``nats-jetstream`` scaler reports ``num_pending + num_ack_pending`` of a
consumer and the HPA sizes the Deployment as ``ceil(metric / lagThreshold)``. A metric of
the waiting tasks alone drops to 0 exactly when every task has an agent, and the HPA
would then scale the busy agents away (each hands its task back, which waits again: a
loop). Waiting + held is the load, the same sum KEDA makes of a work queue (in flight
counts); with ``lagThreshold`` = an agent's capacity, it is the number of agents needed.

An entry is keyed by ``(specialty, task_id)``: a task's entry moves only when its
specialty does (a general agent took a backend task), not when it goes from waiting to
held, so the board changes only where the count does. ``since`` is when the task last
changed as its entry was made (for a waiting task: when it was queued). No clock and no
I/O here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from events.agent_state import AgentState
from events.task import SPECIALTIES
from events.spend import Book
from events.task_state import WITH_AGENT, TaskState
from projections.autoscale import startable
from projections.leases import LeaseIndex

Key = tuple[str, str]  # (specialty, task_id): one entry's subject on the board


class Demand(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One task needing an agent slot of ``specialty``: the body of its board entry."""

    task_id: str
    specialty: str
    since: datetime

    @property
    def key(self) -> Key:
        return (self.specialty, self.task_id)


def demand_specialty(task: TaskState) -> str:
    """Whose demand a waiting task is: its specialty, or ``general`` for one the cluster
    has no agents of (only a general agent could take it)."""
    return task.specialty if task.specialty in SPECIALTIES else "general"


def holder_specialty(task: TaskState, agent: AgentState | None) -> str:
    """Whose slot a task with an agent takes: the task's specialty if its agent has it,
    else the agent's first (a general agent holding a backend task is a general pod
    busy), else (an agent the view does not know) the task's demand specialty."""
    if agent is None or not agent.specialties or task.specialty in agent.specialties:
        return demand_specialty(task)
    return agent.specialties[0]


def _queued(tasks: Mapping[str, TaskState], queued: Iterable[str] | None) -> list[TaskState]:
    ids = [tid for tid, t in tasks.items() if t.status == "queued"] if queued is None else queued
    return [t for tid in ids if (t := tasks.get(tid)) is not None]


def waiting(tasks: Mapping[str, TaskState], now: datetime, queued: Iterable[str] | None = None,
            budget: Book | None = None) -> dict[Key, Demand]:
    """Every task an agent could start now. ``queued``: the queued task ids if the caller
    keeps them (the read model does), else found in ``tasks``; only they are looked at (the
    lease index, which needs every task, is built only when one of them predicts the
    files it touches)."""
    candidates = _queued(tasks, queued)
    leases = LeaseIndex.of(tasks) if any(t.paths for t in candidates) else LeaseIndex()
    out: dict[Key, Demand] = {}
    for t in candidates:
        if startable(t, tasks, now, leases, budget):
            d = Demand(task_id=t.task_id, specialty=demand_specialty(t), since=t.updated_at)
            out[d.key] = d
    return out


def holding(tasks: Mapping[str, TaskState], agents: Mapping[str, AgentState],
            holder: Mapping[str, str] | None = None) -> dict[Key, Demand]:
    """Every task an agent is working on (assigned, in progress, testing), under its
    holder's specialty. ``holder``: task -> agent for those tasks, if the caller keeps it
    (the read model does), else found in ``tasks``."""
    if holder is None:
        holder = {tid: t.agent_id for tid, t in tasks.items() if t.status in WITH_AGENT and t.agent_id}
    out: dict[Key, Demand] = {}
    for tid, agent_id in holder.items():
        t = tasks.get(tid)
        if t is None or t.status not in WITH_AGENT:
            continue
        d = Demand(task_id=tid, specialty=holder_specialty(t, agents.get(agent_id)), since=t.updated_at)
        out[d.key] = d
    return out


def demand(tasks: Mapping[str, TaskState], agents: Mapping[str, AgentState], now: datetime, *,
           queued: Iterable[str] | None = None, holder: Mapping[str, str] | None = None,
           budget: Book | None = None) -> dict[Key, Demand]:
    """The board: every task that waits for an agent or holds one (a task is never both);
    ``budget``: the spend ledger (a task held back by an exhausted scope needs no agent)."""
    return {**waiting(tasks, now, queued, budget), **holding(tasks, agents, holder)}


def counts(entries: Iterable[Key]) -> dict[str, int]:
    """Entries per specialty (what each ``demand-<specialty>`` consumer reports pending),
    every known specialty included."""
    by = Counter(sp for sp, _ in entries)
    return {sp: by.get(sp, 0) for sp in sorted({*SPECIALTIES, *by})}


def next_change(tasks: Mapping[str, TaskState], now: datetime, queued: Iterable[str] | None = None) -> float | None:
    """Seconds until the demand may change with no event at all: the earliest end of a
    retry backoff among the queued tasks (None: only an event can change it)."""
    waits = [(t.not_before - now).total_seconds() for t in _queued(tasks, queued)
             if t.status == "queued" and t.not_before is not None and t.not_before > now]
    return min(waits) if waits else None


__all__ = ["Demand", "Key", "counts", "demand", "demand_specialty", "holder_specialty", "holding", "next_change",
           "waiting"]
