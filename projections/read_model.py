"""The read model: a pure, incremental fold of the whole event log into the task
view, the agent view and the cluster counters.

``apply(seq, item)`` is idempotent by stream sequence: an item at or below the last
applied sequence is a no-op, so redelivery and overlapping catch-up reads are safe,
and folding the log in any batch sizes gives exactly the same result as one rebuild
from sequence 0. A message that does not decode, or an event the state machine
rejects, is recorded in ``bad`` (with its sequence) and skipped; nothing after it is
lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import msgspec

from events.agent import AgentEvent
from events.agent_state import AgentState
from events.agent_state import evolve as evolve_agent
from events.codec import BadMessage, Event
from events.errors import DomainError
from events.task import TaskAssigned, TaskEventBase
from events.task_state import WITH_AGENT, TaskState
from events.task_state import evolve as evolve_task

MAX_BAD_KEPT = 1000
FOLLOWED: frozenset[str] = frozenset({"checking", "merging", "merge_queued"})  # the count is exact; only the newest details are kept


class ClusterView(msgspec.Struct, frozen=True, kw_only=True):
    tasks_total: int
    tasks_by_status: dict[str, int]
    tasks_by_specialty: dict[str, int]
    agents_total: int
    agents_by_status: dict[str, int]
    agents_by_specialty: dict[str, int]
    capacity: int  # task slots on online agents
    active: int  # tasks held by online agents
    load: float  # active / capacity
    last_seq: int
    bad_events: int


class ReadModel:
    """Task, agent and cluster views, plus what could not be applied."""

    def __init__(self, prefix: str = "ccc") -> None:
        self.prefix = prefix  # bad items are reported with their absolute subject
        self.last_seq = 0
        self.tasks: dict[str, TaskState] = {}
        self.agents: dict[str, AgentState] = {}
        self.task_seq: dict[str, int] = {}  # stream seq of the last event applied per task
        self.agent_seq: dict[str, int] = {}
        self.agent_tasks: dict[str, set[str]] = {}  # every task ever assigned to an agent
        # stream seq of each task's latest assignment: an agent's report about the task
        # stored before it belongs to an earlier round (the coordinator drops it)
        self.assigned_seq: dict[str, int] = {}
        self.task_status_counts: dict[str, int] = {}
        self.queued: set[str] = set()  # tasks in Queued: the scheduler's work list
        # tasks whose pull request the coordinator follows by the clock or the queue (checks
        # awaited, in the merge queue): its pull-request pass's work list
        self.following: set[str] = set()
        self.holder: dict[str, str] = {}  # task -> agent, for tasks an agent is working on
        self._held: dict[str, int] = {}  # agent -> how many of those (kept with ``holder``)
        self.bad: list[BadMessage] = []
        self.bad_count = 0
        self.applied_count = 0
        self.dirty_tasks: set[str] = set()  # changed since the last materialisation
        self.dirty_agents: set[str] = set()

    # -- folding -------------------------------------------------------------------
    def apply(self, seq: int, item: Event | BadMessage) -> bool:
        """Apply one log item. Returns False for a no-op (already applied, or bad)."""
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        try:
            if isinstance(item, TaskEventBase):  # the common case first: this runs per event
                tid = item.task_id
                old = self.tasks.get(tid)
                new = evolve_task(old, item)
                self.tasks[tid] = new
                self.task_seq[tid] = seq
                if old is None or old.status != new.status or old.agent_id != new.agent_id:
                    counts = self.task_status_counts
                    if old is not None:
                        counts[old.status] -= 1
                    counts[new.status] = counts.get(new.status, 0) + 1
                    if new.status == "queued":
                        self.queued.add(tid)
                    else:
                        self.queued.discard(tid)
                    if new.status in FOLLOWED:
                        self.following.add(tid)
                    else:
                        self.following.discard(tid)
                    self._hold(tid, new.agent_id if new.status in WITH_AGENT else None)
                if type(item) is TaskAssigned:
                    self.agent_tasks.setdefault(item.agent_id, set()).add(tid)
                    self.assigned_seq[tid] = seq
                self.dirty_tasks.add(tid)
            elif isinstance(item, BadMessage):
                self._reject(item)
                self._advance(item.subject, seq)
                return False
            else:
                aid = item.agent_id
                self.agents[aid] = evolve_agent(self.agents.get(aid), item)
                self.agent_seq[aid] = seq
                self.dirty_agents.add(aid)
        except DomainError as e:
            subject = f"{self.prefix}.{item.rel_subject}"
            self._reject(BadMessage(
                seq=seq, subject=subject, error=f"{type(e).__name__}: {e}",
                preview=msgspec.json.encode(item)[:200].decode(errors="replace"),
            ))
            self._advance(subject, seq)
            return False
        self.applied_count += 1
        return True

    def apply_many(self, items: Iterable[tuple[int, Event | BadMessage]]) -> int:
        n = 0
        for seq, item in items:
            n += self.apply(seq, item)
        return n

    def _advance(self, subject: str, seq: int) -> None:
        """A skipped message still sits on its aggregate's subjects: the aggregate's last
        sequence must include it, or every concurrency-checked write to that aggregate
        would conflict for ever (one poison message would wedge the task)."""
        parts = subject.split(".", 3)
        if len(parts) >= 3 and parts[0] == self.prefix:
            if parts[1] == "task" and parts[2] in self.tasks:
                self.task_seq[parts[2]] = seq
            elif parts[1] == "agent" and parts[2] in self.agents:
                self.agent_seq[parts[2]] = seq

    def _reject(self, bad: BadMessage) -> None:
        self.bad_count += 1
        self.bad.append(bad)
        if len(self.bad) > MAX_BAD_KEPT:
            del self.bad[0]

    # -- queries -------------------------------------------------------------------
    def cluster(self) -> ClusterView:
        by_specialty: Counter[str] = Counter(t.specialty for t in self.tasks.values())
        agents_by_status: Counter[str] = Counter(a.status for a in self.agents.values())
        agents_by_specialty: Counter[str] = Counter()
        capacity = active = 0
        for a in self.agents.values():
            if a.status == "offline":
                continue
            agents_by_specialty.update(a.specialties)
            capacity += a.capacity
            active += len(a.active_tasks)
        return ClusterView(
            tasks_total=len(self.tasks),
            tasks_by_status={k: v for k, v in sorted(self.task_status_counts.items()) if v},
            tasks_by_specialty=dict(sorted(by_specialty.items())),
            agents_total=len(self.agents),
            agents_by_status=dict(sorted(agents_by_status.items())),
            agents_by_specialty=dict(sorted(agents_by_specialty.items())),
            capacity=capacity,
            active=active,
            load=round(active / capacity, 4) if capacity else 0.0,
            last_seq=self.last_seq,
            bad_events=self.bad_count,
        )

    def tasks_of_agent(self, agent_id: str) -> list[TaskState]:
        return [self.tasks[t] for t in sorted(self.agent_tasks.get(agent_id, ()))]

    def snapshot(self) -> dict:
        """Everything observable, as builtins: equal snapshots = equal read models."""
        return {
            "last_seq": self.last_seq,
            "tasks": msgspec.to_builtins(self.tasks),
            "agents": msgspec.to_builtins(self.agents),
            "task_seq": dict(self.task_seq),
            "agent_seq": dict(self.agent_seq),
            "agent_tasks": {k: sorted(v) for k, v in self.agent_tasks.items()},
            "cluster": msgspec.to_builtins(self.cluster()),
            "bad": msgspec.to_builtins(self.bad),
            "queued": sorted(self.queued),
            "holder": dict(sorted(self.holder.items())),
        }

    def _hold(self, tid: str, agent_id: str | None) -> None:
        held = self._held
        before = self.holder.pop(tid, None)
        if before is not None:
            if held[before] == 1:
                del held[before]
            else:
                held[before] -= 1
        if agent_id:
            self.holder[tid] = agent_id
            held[agent_id] = held.get(agent_id, 0) + 1

    def held(self) -> dict[str, int]:
        """How many tasks each agent is working on, by the task view (a copy; kept
        up to date as tasks change hands, so the scheduler's every pass is O(agents
        holding work), not O(tasks held))."""
        return dict(self._held)


__all__ = ["ClusterView", "ReadModel", "AgentEvent"]
