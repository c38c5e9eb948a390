"""The autoscaling policy, pure: from the read model (tasks, agents) and ``now`` to at most
one decision — start an agent of the bottleneck specialty, stop an idle agent of the
least-needed one, or nothing.

The signal per specialty is what the seed's ``ClusterManager`` describes: the queue depth
(queued tasks an agent could start now: not waiting for a dependency, a retry backoff or
a file lease, which no new agent would speed up) and the oldest wait, against the capacity of the
agents that can take that specialty (an agent with the specialty, or a ``general`` one:
the scheduler's one fallback) and a target load.

* **Scale up** (at most ``max_agents`` managed agents, ``cooldown_up`` seconds apart):
  a specialty is a bottleneck when its queue exceeds ``target_load`` tasks per capable
  agent slot *and* no capable slot is free, or when its oldest task has waited longer
  than ``max_wait`` with no free capable slot; the bottleneck is the specialty with the
  most queued tasks per capable slot (then the longest wait, then the name). Below
  ``min_agents`` it starts an agent regardless (for the busiest specialty, or the
  first of ``specialties`` when nothing is queued).
* **Scale down** (never below ``min_agents``, ``cooldown_down`` seconds after the last
  decision of either kind, so a burst's tail does not thrash): only an *idle* managed
  agent (online, holding no task) whose specialties have nothing queued; among those,
  one of the least-needed specialty (the fewest queued tasks per capable slot, then the
  most agents of it), the newest first (the highest id).

Only agents the autoscaler manages are started or stopped; every online agent counts as
capacity. No clock and no I/O here: the same views and ``now`` give the same decision.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from events.agent_state import ACCEPTING, AgentState
from events.errors import ConfigError
from events.task import SPECIALTIES
from events.spend import Book
from events.task_state import WITH_AGENT, TaskState
from projections.leases import LeaseIndex


class AutoscalePolicy(msgspec.Struct, frozen=True, kw_only=True):
    min_agents: int = 0
    max_agents: int = 4
    target_load: float = 1.0  # queued tasks per capable agent slot before one more agent
    max_wait: float = 60.0  # seconds the oldest queued task may wait (with no free slot)
    cooldown_up: float = 5.0  # seconds between two scale-ups
    cooldown_down: float = 30.0  # seconds after the last decision before a scale-down
    specialties: tuple[str, ...] = ("general",)  # what an agent started below the minimum gets

    def validate(self) -> AutoscalePolicy:
        if self.min_agents < 0:
            raise ConfigError(f"autoscale: the minimum must be >= 0 (got {self.min_agents})")
        if self.max_agents < 1 or self.max_agents < self.min_agents:
            raise ConfigError(f"autoscale: the maximum must be >= 1 and >= the minimum "
                              f"(got {self.min_agents}:{self.max_agents})")
        if not (self.target_load > 0 and math.isfinite(self.target_load)):
            raise ConfigError(f"autoscale: the target load must be > 0 (got {self.target_load})")
        for name in ("max_wait", "cooldown_up", "cooldown_down"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"autoscale: {name.replace('_', ' ')} must be >= 0 seconds (got {value})")
        bad = [s for s in self.specialties if s not in SPECIALTIES]
        if not self.specialties or bad:
            raise ConfigError(f"autoscale: unknown specialties {', '.join(bad) or '(none)'}; "
                              f"choose from {', '.join(SPECIALTIES)}")
        return self


def parse_autoscale(text: str) -> tuple[int, int]:
    """``--autoscale MIN:MAX`` -> ``(min, max)``; a clear error for anything else."""
    lo, sep, hi = (text or "").strip().partition(":")
    try:
        if not sep:
            raise ValueError
        bounds = int(lo), int(hi)
    except ValueError:
        raise ConfigError(f"--autoscale {text!r}: use MIN:MAX, e.g. 1:8") from None
    AutoscalePolicy(min_agents=bounds[0], max_agents=bounds[1]).validate()
    return bounds


class SpecialtyLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One specialty's queue against the agents that can take it."""

    specialty: str
    queued: int  # tasks an agent could start now
    oldest_wait: float  # seconds, 0 when nothing is queued
    agents: int  # online agents taking work with this specialty or general
    slots: int  # their capacity
    free: int  # their free slots

    @property
    def pressure(self) -> float:
        """Queued tasks per capable slot (infinite with none and something queued)."""
        if self.slots == 0:
            return math.inf if self.queued else 0.0
        return self.queued / self.slots


class Managed(msgspec.Struct, frozen=True, kw_only=True):
    """An agent the autoscaler runs (and so may stop)."""

    agent_id: str
    specialties: tuple[str, ...]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    action: str  # "scaled_up" | "scaled_down"
    specialty: str
    reason: str
    queue_depth: int
    oldest_wait: float
    agents_before: int
    agents_after: int
    agent_id: str = ""  # the agent to stop (scale down); the actor names the one it starts


def startable(task: TaskState, tasks: Mapping[str, TaskState], now: datetime,
              leases: LeaseIndex | None = None, budget: Book | None = None) -> bool:
    """A queued task an agent could start now: not waiting for a dependency, a retry
    backoff, a file lease or an exhausted spend scope (``budget``: the ledger as last
    seen) — more agents would not hurry those."""
    if task.status != "queued":
        return False
    if budget is not None and budget.holds_back(task.task_id, task.issue.repo, task.issue.author, now):
        return False
    if task.not_before is not None and task.not_before > now:
        return False
    if not all(d in tasks and tasks[d].status == "completed" for d in task.dependencies):
        return False
    return (LeaseIndex.of(tasks) if leases is None else leases).blocker(task) is None


def loads(tasks: Mapping[str, TaskState], agents: Mapping[str, AgentState], now: datetime,
          specialties: Iterable[str] = (), budget: Book | None = None) -> dict[str, SpecialtyLoad]:
    """Every specialty with queued tasks or online agents (and ``specialties``)."""
    queued: dict[str, list[TaskState]] = {}
    leases = LeaseIndex.of(tasks)
    for t in tasks.values():
        if startable(t, tasks, now, leases, budget):
            queued.setdefault(t.specialty, []).append(t)
    held: dict[str, int] = {}
    for t in tasks.values():
        if t.status in WITH_AGENT and t.agent_id:
            held[t.agent_id] = held.get(t.agent_id, 0) + 1
    taking = [a for a in agents.values() if a.status in ACCEPTING]
    names = set(queued) | set(specialties) | {s for a in taking for s in a.specialties}
    out: dict[str, SpecialtyLoad] = {}
    for sp in sorted(names):
        capable = [a for a in taking if sp in a.specialties or "general" in a.specialties]
        slots = sum(a.capacity for a in capable)
        used = sum(min(max(held.get(a.agent_id, 0), len(a.active_tasks)), a.capacity) for a in capable)
        waiting = queued.get(sp, [])
        oldest = max(((now - t.updated_at).total_seconds() for t in waiting), default=0.0)
        out[sp] = SpecialtyLoad(specialty=sp, queued=len(waiting), oldest_wait=max(0.0, oldest),
                                agents=len(capable), slots=slots, free=max(0, slots - used))
    return out


def _bottleneck(view: Mapping[str, SpecialtyLoad], policy: AutoscalePolicy) -> tuple[SpecialtyLoad, str] | None:
    candidates: list[tuple[SpecialtyLoad, str]] = []
    for load in view.values():
        if load.queued == 0 or load.free > 0:
            continue  # nothing waiting, or the scheduler can place it now
        if load.slots == 0:
            why = f"{load.queued} {load.specialty} task(s) queued and no agent online can take them"
        elif load.pressure > policy.target_load:
            why = (f"{load.queued} {load.specialty} task(s) queued for {load.slots} busy slot(s): "
                   f"{load.pressure:.2g} per slot > target {policy.target_load:g}")
        elif load.oldest_wait > policy.max_wait:
            why = (f"oldest {load.specialty} task waited {load.oldest_wait:.0f}s > {policy.max_wait:g}s "
                   f"with all {load.slots} slot(s) busy")
        else:
            continue
        candidates.append((load, why))
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[0].pressure, c[0].oldest_wait, c[0].specialty))


def decide(
    tasks: Mapping[str, TaskState],
    agents: Mapping[str, AgentState],
    managed: Iterable[Managed],
    policy: AutoscalePolicy,
    now: datetime,
    *,
    last_up: datetime | None = None,
    last_down: datetime | None = None,
    budget: Book | None = None,
) -> Decision | None:
    """At most one decision (one agent more or less per round: the next round sees its
    effect). ``last_up`` / ``last_down``: when the autoscaler last scaled up / down;
    ``budget``: the spend ledger (tasks held back by an exhausted scope are no demand)."""
    fleet = list(managed)
    n = len(fleet)
    view = loads(tasks, agents, now, policy.specialties, budget)

    def since(at: datetime | None) -> float:
        return math.inf if at is None else (now - at).total_seconds()

    # -- up --------------------------------------------------------------------------
    if n < policy.max_agents and since(last_up) >= policy.cooldown_up:
        if n < policy.min_agents:
            busiest = max(view.values(), key=lambda v: (v.pressure, v.oldest_wait, v.specialty), default=None)
            sp = busiest.specialty if busiest is not None and busiest.queued else policy.specialties[0]
            load = view.get(sp) or SpecialtyLoad(specialty=sp, queued=0, oldest_wait=0.0, agents=0, slots=0, free=0)
            return Decision(action="scaled_up", specialty=sp, queue_depth=load.queued,
                            oldest_wait=load.oldest_wait, agents_before=n, agents_after=n + 1,
                            reason=f"{n} agent(s) below the minimum of {policy.min_agents}")
        found = _bottleneck(view, policy)
        if found is not None:
            load, why = found
            return Decision(action="scaled_up", specialty=load.specialty, reason=why, queue_depth=load.queued,
                            oldest_wait=load.oldest_wait, agents_before=n, agents_after=n + 1)
    # -- down ------------------------------------------------------------------------
    last = max((t for t in (last_up, last_down) if t is not None), default=None)
    if n <= policy.min_agents or since(last) < policy.cooldown_down:
        return None
    idle: list[tuple[Managed, AgentState]] = []
    for m in fleet:
        state = agents.get(m.agent_id)
        if state is None or state.status != "idle" or state.active_tasks:
            continue  # busy, draining, not registered yet, or gone: not a candidate
        if any(t.agent_id == m.agent_id and t.status in WITH_AGENT for t in tasks.values()):
            continue  # the log says it holds a task its own events have not caught up with
        if any(view[s].queued for s in m.specialties if s in view):
            continue
        if "general" in m.specialties and any(v.queued for v in view.values()):
            continue  # a general agent serves every queue
        idle.append((m, state))
    if not idle:
        return None

    def need(m: Managed) -> tuple[float, int]:
        v = view.get(m.specialties[0] if m.specialties else "general")
        return (v.pressure if v else 0.0, -(v.agents if v else 0))

    least = min(need(m) for m, _ in idle)
    chosen = max((m for m, _ in idle if need(m) == least), key=lambda m: _natural(m.agent_id))
    sp = chosen.specialties[0] if chosen.specialties else "general"
    v = view.get(sp)
    return Decision(action="scaled_down", specialty=sp, agent_id=chosen.agent_id,
                    queue_depth=v.queued if v else 0, oldest_wait=v.oldest_wait if v else 0.0,
                    agents_before=n, agents_after=n - 1,
                    reason=(f"{chosen.agent_id} idle and nothing queued for {sp}; "
                            f"{n} agent(s) above the minimum of {policy.min_agents}"))


def _natural(agent_id: str) -> tuple:
    """``auto-backend-10`` after ``auto-backend-9``: the newest the actor started last."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", agent_id))


__all__ = ["AutoscalePolicy", "Decision", "Managed", "SpecialtyLoad", "decide", "loads", "parse_autoscale",
           "startable"]
