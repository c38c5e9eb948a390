"""Response shapes and queries of the status API.

The JSON bodies the API answers with (msgspec structs), :class:`ApiError`, and
:class:`StatusReader`: filtering, ordering and paging over a :class:`LiveReadModel`.
No HTTP here; the Litestar handlers and app are in :mod:`projections.status_api`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import structlog

from events.agent_state import AgentState
from events.codec import BadMessage
from events.errors import StoreUnavailable
from events.task_state import TaskState

from projections.fairness import DEFAULT_POLICY, FairnessPolicy, explain
from projections.live import LiveReadModel
from projections.read_model import ReadModel
from projections.waits import CLOCKED, Holds, Waits

MIN_SEQ_TIMEOUT = 5.0
# /health asks NATS for the log's end at most this often (seconds); the requests meanwhile
# share the answer, so a probe costs what a task read costs, while NATS that stops
# answering still shows within this plus the ask's timeout (a dropped connection shows at
# once: that is the client's own state, read on every call)
HEALTH_TTL = 0.5
MAX_FILTERS_KEPT = 64  # filtered views of the board kept per log position (a bound, not a tuning)

log = structlog.get_logger("ccc.api")


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
        # the answer built last for each task / agent, reused while its state is the same
        # object (states are frozen: every event makes a new one) and, for a task, its wait
        # words are the same: a page of the board then copies no fields (asdict + a new
        # struct per item was a quarter of the list's CPU). A task's words are not even
        # worked out again while the board is the same (the same Waits) and its status's
        # words do not read the clock (waits.CLOCKED)
        self._task_outs: dict[str, _Answer] = {}
        self._agent_outs: dict[str, tuple[AgentState, AgentOut]] = {}
        # the board's task ids matching a filter (?state=, ?specialty=, ?agent=), kept while
        # the log has not moved: a filtered page otherwise scans every task per request
        self._filtered: dict[tuple, tuple[int, list[str]]] = {}
        self._stream_end: tuple[float, bool, int] | None = None  # (when asked, answered, last seq)
        self._asking: asyncio.Future | None = None

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

    async def stream_end(self, timeout: float, ttl: float = HEALTH_TTL) -> tuple[bool, int]:
        """(NATS answered, the log's last sequence) for /health: asked of NATS at most once
        per ``ttl`` seconds, one ask at a time (concurrent callers share it); a failed ask
        is remembered as long (a dead server is not asked by every probe). Also updates
        the live model's ``stream_last_seq`` (the lag the metrics report)."""
        now = time.monotonic()
        if self._stream_end is not None and now - self._stream_end[0] < ttl:
            return self._stream_end[1], self._stream_end[2]
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self._ask_stream_end(timeout))
        return await asyncio.shield(self._asking)

    async def _ask_stream_end(self, timeout: float) -> tuple[bool, int]:
        live = self.live
        try:
            end = await asyncio.wait_for(live.store.last_seq(), timeout)
            live.stream_last_seq = max(live.stream_last_seq, end)
            answer = (True, end)
        except (StoreUnavailable, TimeoutError) as e:
            log.warning("api.health_stream_unreadable", error=str(e))
            answer = (False, max(live.stream_last_seq, self.model.last_seq))
        self._stream_end = (time.monotonic(), *answer)
        return answer

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
        if holds.budget is not None and not holds.budget.caps.any:  # a ledger without caps holds nothing back
            holds = holds._replace(budget=None)
        key = (self.model.last_seq, holds.key())
        if self._waits is None or self._waits[0] != key:
            self._waits = (key, Waits.of(self.model.tasks, self.model.agents, self.fairness, holds))
        return self._waits[1]

    def _task_answer(self, state: TaskState, waits: Waits, now: datetime) -> _Answer:
        tid = state.task_id
        seq = self.model.task_seq[tid]
        cached = self._task_outs.get(tid)
        same = cached is not None and cached.state is state and cached.out.applied_seq == seq
        if same and cached.waits is waits and state.status not in CLOCKED:
            return cached  # (explain reads the clock for queued tasks only, which are CLOCKED)
        # (no policy given: the coordinator's default, whose aging the urgency then assumes)
        queue = explain(state, now, self.fairness or DEFAULT_POLICY, self.model.tasks)
        waiting = waits.why(state, now)
        if same:
            cached.waits = waits
            out = cached.out
            if out.waiting != waiting or out.queue != queue:  # the words moved on, not the task
                cached.out, cached.json = msgspec.structs.replace(out, waiting=waiting, queue=queue), None
            return cached
        answer = _Answer(state, waits, _out(TaskOut, state, seq, waiting=waiting, queue=queue))
        self._task_outs[tid] = answer
        return answer

    def _agent_out(self, state: AgentState) -> AgentOut:
        aid = state.agent_id
        seq = self.model.agent_seq[aid]
        cached = self._agent_outs.get(aid)
        if cached is not None and cached[0] is state and cached[1].applied_seq == seq:
            return cached[1]
        out = _out(AgentOut, state, seq)
        self._agent_outs[aid] = (state, out)
        return out

    def task_out(self, task_id: str) -> TaskOut:
        state = self.model.tasks.get(task_id)
        if state is None:
            raise ApiError(404, f"no task {task_id!r}", "task_id")
        return self._task_answer(state, self.waits(), self.clock()).out

    def agent_out(self, agent_id: str) -> AgentOut:
        state = self.model.agents.get(agent_id)
        if state is None:
            raise ApiError(404, f"no agent {agent_id!r}", "agent_id")
        return self._agent_out(state)

    def task_page(self, ids: list[str], *, states: frozenset[str] | None,
                  specialties: frozenset[str] | None, agent: str | None,
                  limit: int, offset: int) -> TaskPage:
        answers, page = self._task_page(ids, states, specialties, agent, limit, offset)
        return msgspec.structs.replace(page, items=[a.out for a in answers])

    def task_page_json(self, ids: list[str], *, states: frozenset[str] | None,
                       specialties: frozenset[str] | None, agent: str | None,
                       limit: int, offset: int) -> bytes:
        """:meth:`task_page` as the JSON the API answers with, built from each task's JSON
        as encoded when its answer was built (the same bytes msgspec gives the page)."""
        answers, page = self._task_page(ids, states, specialties, agent, limit, offset)
        for a in answers:
            if a.json is None:
                a.json = _encode(a.out)
        rest = _encode(page)  # {"items":[],"total":...}: the page without its items
        return b'{"items":[' + b",".join(a.json for a in answers) + b"]" + rest[_NO_ITEMS:]  # type: ignore[misc]

    def _task_page(self, ids: list[str], states: frozenset[str] | None, specialties: frozenset[str] | None,
                   agent: str | None, limit: int, offset: int) -> tuple[list[_Answer], TaskPage]:
        tasks = self.model.tasks
        if states is None and specialties is None and agent is None:
            chosen = ids
        else:
            key = (states, specialties, agent)
            kept = self._filtered.get(key) if ids is self._order else None
            if kept is not None and kept[0] == self.model.last_seq:
                chosen = kept[1]
            else:
                chosen = [
                    t for t in ids
                    if (states is None or tasks[t].status in states)
                    and (specialties is None or tasks[t].specialty in specialties)
                    and (agent is None or tasks[t].agent_id == agent)
                ]
                if ids is self._order:  # (the board's order; an agent's own list is built per request)
                    if len(self._filtered) >= MAX_FILTERS_KEPT:
                        self._filtered.clear()
                    self._filtered[key] = (self.model.last_seq, chosen)
        waits, now = self.waits(), self.clock()
        answers, seqs, cache = [], self.model.task_seq, self._task_outs
        for t in chosen[offset:offset + limit]:
            state, cached = tasks[t], cache.get(t)
            if cached is not None and cached.state is state and cached.waits is waits \
                    and cached.out.applied_seq == seqs[t] and state.status not in CLOCKED:
                answers.append(cached)  # (the hit of _task_answer, inline: most items of a page)
            else:
                answers.append(self._task_answer(state, waits, now))
        return answers, TaskPage(items=[], total=len(chosen), limit=limit, offset=offset,
                                 next_offset=_next(offset, limit, len(chosen)), last_seq=self.model.last_seq)

    def agent_page(self, *, states: frozenset[str] | None, specialties: frozenset[str] | None,
                   limit: int, offset: int) -> AgentPage:
        agents = self.model.agents
        chosen = [
            a for a in sorted(agents)
            if (states is None or agents[a].status in states)
            and (specialties is None or not specialties.isdisjoint(agents[a].specialties))
        ]
        items = [self._agent_out(agents[a]) for a in chosen[offset:offset + limit]]
        return AgentPage(items=items, total=len(chosen), limit=limit, offset=offset,
                         next_offset=_next(offset, limit, len(chosen)), last_seq=self.model.last_seq)


class _Answer:
    """A task's answer as last built: for which state (object) and board (:class:`Waits`),
    the struct, and its JSON once a page asked for it."""

    __slots__ = ("json", "out", "state", "waits")

    def __init__(self, state: TaskState, waits: Waits, out: TaskOut) -> None:
        self.state, self.waits, self.out = state, waits, out
        self.json: bytes | None = None


_encode = msgspec.json.Encoder().encode
_NO_ITEMS = len(b'{"items":[]')


def _out(cls: type, state: msgspec.Struct, seq: int, **extra: Any) -> Any:
    return cls(**msgspec.structs.asdict(state), applied_seq=seq, **extra)


def _next(offset: int, limit: int, total: int) -> int | None:
    return offset + limit if offset + limit < total else None
