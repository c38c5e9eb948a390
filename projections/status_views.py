"""Response shapes and queries of the status API.

The JSON bodies the API answers with (msgspec structs), :class:`ApiError`, and
:class:`StatusReader`: filtering, ordering and paging over a :class:`LiveReadModel`.
No HTTP here; the Litestar handlers and app are in :mod:`projections.status_api`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from events.agent_state import AgentState
from events.codec import BadMessage
from events.task_state import TaskState

from projections.fairness import DEFAULT_POLICY, FairnessPolicy, explain
from projections.live import LiveReadModel
from projections.read_model import ReadModel
from projections.waits import Holds, Waits

MIN_SEQ_TIMEOUT = 5.0


# -- response bodies ------------------------------------------------------------------
class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    error: str
    detail: str
    parameter: str | None = None


class TaskOut(TaskState, frozen=True, kw_only=True):
    """A task as the projection sees it, at stream sequence ``applied_seq``, what it
    waits for now (:func:`projections.waits.why_waiting`; "" when it is not waiting) and,
    while it is queued, its place in the scheduler's order (``queue``: its lane and
    urgency now, :func:`projections.fairness.explain`). Once assigned, ``assigned_why``
    (of the state) says why that agent got it."""

    applied_seq: int
    waiting: str = ""
    queue: str = ""


class AgentOut(AgentState, frozen=True, kw_only=True):
    """An agent as the projection sees it, at stream sequence ``applied_seq``."""

    applied_seq: int


class TaskPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[TaskOut]
    total: int  # matching the filters, before paging
    limit: int
    offset: int
    next_offset: int | None
    last_seq: int  # the log position this page reflects


class AgentPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[AgentOut]
    total: int
    limit: int
    offset: int
    next_offset: int | None
    last_seq: int


class TaskEvents(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    # each item: {"seq": <stream seq>, "type": <event tag>, ...the event's fields}
    items: list[dict[str, Any]]
    bad: list[BadMessage]  # messages on this task's subjects that do not decode
    last_seq: int


class BadEvents(msgspec.Struct, frozen=True, kw_only=True):
    count: int  # exact, since the projection started
    items: list[BadMessage]  # the newest ones (the model keeps a bounded number), by seq


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok", "degraded"]
    nats_connected: bool
    last_seq: int  # applied by the projection
    stream_last_seq: int  # the log's end (as last observed if NATS is unreachable)
    lag: int
    bad_events: int
    projection_following: bool = True  # False if the projection's follower died


class ApiError(Exception):
    def __init__(self, status: int, detail: str, parameter: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.parameter = parameter


# -- the queries ----------------------------------------------------------------------
class StatusReader:
    """Filtering, ordering and paging over the live model. Handlers run on the event
    loop that also applies events, and never await while iterating, so every answer
    is a consistent snapshot at one log position."""

    def __init__(self, live: LiveReadModel, *, min_seq_timeout: float = MIN_SEQ_TIMEOUT,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 fairness: FairnessPolicy | None = None, holds: Callable[[], Holds] | None = None) -> None:
        self.live = live
        self.fairness = fairness  # the coordinator's admission policy: its limits explain waits
        self.holds = holds  # the spend ledger and the plugins' holds: they explain waits too
        self.min_seq_timeout = min_seq_timeout
        self.clock = clock  # "now" for the waiting reasons (backoff left, checks running for)
        self._order: list[str] = []  # task ids by (created_at, task_id)
        self._waits: tuple[tuple, Waits] | None = None  # ((log position, the holds' key), ...)

    @property
    def model(self) -> ReadModel:
        return self.live.model

    async def wait_for(self, seq: int) -> None:
        if self.model.last_seq >= seq:
            return
        try:
            await self.live.wait_for_seq(seq, timeout=self.min_seq_timeout)
        except TimeoutError:
            raise ApiError(
                504, f"the projection has applied up to {self.model.last_seq}, not {seq}, "
                f"after {self.min_seq_timeout:g} s", "min_seq",
            ) from None

    def task_ids_in_order(self) -> list[str]:
        # tasks are never removed and created_at never changes, so the order only
        # needs rebuilding when tasks were added
        tasks = self.model.tasks
        if len(self._order) != len(tasks):
            self._order = sorted(tasks, key=lambda t: (tasks[t].created_at, t))
        return self._order

    def waits(self) -> Waits:
        """The board's leases and merge queues, built once per log position."""
        holds = self.holds() if self.holds is not None else Holds()
        key = (self.model.last_seq, holds.key())
        if self._waits is None or self._waits[0] != key:
            self._waits = (key, Waits.of(self.model.tasks, self.model.agents, self.fairness, holds))
        return self._waits[1]

    def _task_out(self, state: TaskState, waits: Waits, now: datetime) -> TaskOut:
        # (no policy given: the coordinator's default, whose aging the urgency then assumes)
        queue = explain(state, now, self.fairness or DEFAULT_POLICY, self.model.tasks)
        return _out(TaskOut, state, self.model.task_seq[state.task_id], waiting=waits.why(state, now),
                    queue=queue)

    def task_out(self, task_id: str) -> TaskOut:
        state = self.model.tasks.get(task_id)
        if state is None:
            raise ApiError(404, f"no task {task_id!r}", "task_id")
        return self._task_out(state, self.waits(), self.clock())

    def agent_out(self, agent_id: str) -> AgentOut:
        state = self.model.agents.get(agent_id)
        if state is None:
            raise ApiError(404, f"no agent {agent_id!r}", "agent_id")
        return _out(AgentOut, state, self.model.agent_seq[agent_id])

    def task_page(self, ids: list[str], *, states: frozenset[str] | None,
                  specialties: frozenset[str] | None, agent: str | None,
                  limit: int, offset: int) -> TaskPage:
        tasks = self.model.tasks
        chosen = [
            t for t in ids
            if (states is None or tasks[t].status in states)
            and (specialties is None or tasks[t].specialty in specialties)
            and (agent is None or tasks[t].agent_id == agent)
        ]
        waits, now = self.waits(), self.clock()
        items = [self._task_out(tasks[t], waits, now) for t in chosen[offset:offset + limit]]
        return TaskPage(items=items, total=len(chosen), limit=limit, offset=offset,
                        next_offset=_next(offset, limit, len(chosen)), last_seq=self.model.last_seq)

    def agent_page(self, *, states: frozenset[str] | None, specialties: frozenset[str] | None,
                   limit: int, offset: int) -> AgentPage:
        agents = self.model.agents
        chosen = [
            a for a in sorted(agents)
            if (states is None or agents[a].status in states)
            and (specialties is None or not specialties.isdisjoint(agents[a].specialties))
        ]
        items = [_out(AgentOut, agents[a], self.model.agent_seq[a]) for a in chosen[offset:offset + limit]]
        return AgentPage(items=items, total=len(chosen), limit=limit, offset=offset,
                         next_offset=_next(offset, limit, len(chosen)), last_seq=self.model.last_seq)


def _out(cls: type, state: msgspec.Struct, seq: int, **extra: Any) -> Any:
    return cls(**msgspec.structs.asdict(state), applied_seq=seq, **extra)


def _next(offset: int, limit: int, total: int) -> int | None:
    return offset + limit if offset + limit < total else None
