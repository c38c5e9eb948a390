"""The read-side status API: a Litestar app over a :class:`LiveReadModel`.

Pure read side: answers come from the in-memory projection (which follows the log),
except ``/tasks/{id}/events``, read from the log itself. Nothing here writes an event.

JSON shapes (all stable; new fields may be added, none removed or retyped):

* task: the :class:`TaskState` fields + ``applied_seq`` (stream sequence of the last
  event folded into it), exactly what the ``<ns>_tasks`` KV bucket holds;
  agent: the :class:`AgentState` fields + ``applied_seq``.
* lists: ``{items, total, limit, offset, next_offset, last_seq}``; ``last_seq`` is the
  log position the page reflects, ``next_offset`` is null on the last page.
* errors, for every status >= 400: ``{error, detail, parameter?}``: ``error`` is the
  HTTP reason as a slug (``not_found``, ``bad_request``, ``gateway_timeout``...);
  ``parameter`` names the query/path parameter at fault (400, 404, 504), if any.

Read-your-writes: a writer that got stream sequence N back from ``append`` passes
``min_seq=N``; the request waits (bounded) until the projection has applied N and
answers 504 if it does not in time.

The OpenAPI document is at ``/schema/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
from http import HTTPStatus
from typing import Annotated, Any, Literal

import msgspec
import structlog
from litestar import Litestar, Request, Response, get
from prometheus_client import CollectorRegistry
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import FromPath, QueryParameter

from events.agent_state import AGENT_STATUSES, AgentState
from events.errors import ConfigError, StoreUnavailable
from events.store import BadMessage
from events.subjects import check_id
from events.task import SPECIALTIES
from events.task_state import TASK_STATUSES, TaskState

from .live import LiveReadModel
from .metrics import ApiMetrics, ClusterMetrics, LogCounters, metrics_route
from .read_model import ClusterView, ReadModel

log = structlog.get_logger("ccc.api")

API_VERSION = "1.0.0"
PREFIX = "/api/v1"
OPENAPI_PATH = "/schema"  # the document is at /schema/openapi.json
MIN_SEQ_TIMEOUT = 5.0
HEALTH_NATS_TIMEOUT = 2.0


# -- response bodies ------------------------------------------------------------------
class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    error: str
    detail: str
    parameter: str | None = None


class TaskOut(TaskState, frozen=True, kw_only=True):
    """A task as the projection sees it, at stream sequence ``applied_seq``."""

    applied_seq: int


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

    def __init__(self, live: LiveReadModel, *, min_seq_timeout: float = MIN_SEQ_TIMEOUT) -> None:
        self.live = live
        self.min_seq_timeout = min_seq_timeout
        self._order: list[str] = []  # task ids by (created_at, task_id)

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

    def task_out(self, task_id: str) -> TaskOut:
        state = self.model.tasks.get(task_id)
        if state is None:
            raise ApiError(404, f"no task {task_id!r}", "task_id")
        return _out(TaskOut, state, self.model.task_seq[task_id])

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
        items = [_out(TaskOut, tasks[t], self.model.task_seq[t]) for t in chosen[offset:offset + limit]]
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


def _out(cls: type, state: msgspec.Struct, seq: int) -> Any:
    return cls(**msgspec.structs.asdict(state), applied_seq=seq)


def _next(offset: int, limit: int, total: int) -> int | None:
    return offset + limit if offset + limit < total else None


def _choices(values: list[str] | None, allowed: tuple[str, ...], param: str) -> frozenset[str] | None:
    """``?state=a&state=b`` and ``?state=a,b`` both mean a or b; none means any."""
    chosen = {v.strip() for raw in values or () for v in raw.split(",") if v.strip()}
    unknown = sorted(chosen.difference(allowed))
    if unknown:
        raise ApiError(400, f"unknown {param} {', '.join(map(repr, unknown))}; "
                            f"expected one of: {', '.join(allowed)}", param)
    return frozenset(chosen) or None


# -- parameters -----------------------------------------------------------------------
Limit = Annotated[int, QueryParameter(ge=1, le=500, description="page size, 1..500")]
Offset = Annotated[int, QueryParameter(ge=0, description="items to skip")]
MinSeq = Annotated[int | None, QueryParameter(
    ge=0, description=f"wait (at most {MIN_SEQ_TIMEOUT:g} s, else 504) until the projection "
                      "has applied this stream sequence: read-your-writes after an append")]
TaskStates = Annotated[list[str] | None, QueryParameter(
    name="state", description="task status, repeated or comma-separated: " + ", ".join(TASK_STATUSES))]
AgentStates = Annotated[list[str] | None, QueryParameter(
    name="state", description="agent status, repeated or comma-separated: " + ", ".join(AGENT_STATUSES))]
Specialties = Annotated[list[str] | None, QueryParameter(
    name="specialty", description="specialty, repeated or comma-separated: " + ", ".join(SPECIALTIES))]
AgentFilter = Annotated[str | None, QueryParameter(
    name="agent", description="the task's agent_id (its current or, once finished, last assignee)")]

Reader = NamedDependency[StatusReader]  # the reader, as is
View = NamedDependency[StatusReader]  # the reader, once it has applied min_seq


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(data_container=ErrorBody, description=HTTPStatus(c).phrase) for c in codes}


async def _provide_view(reader: Reader, min_seq: MinSeq = None) -> StatusReader:
    if min_seq:
        await reader.wait_for(min_seq)
    return reader


# -- handlers ----------------------------------------------------------------------------
@get(f"{PREFIX}/tasks", tags=["tasks"], responses=_errors(400, 504),
     summary="Tasks, ordered by created_at then task_id")
async def list_tasks(view: View, states: TaskStates = None, specialty: Specialties = None,
                     agent: AgentFilter = None, limit: Limit = 50, offset: Offset = 0) -> TaskPage:
    return view.task_page(
        view.task_ids_in_order(), states=_choices(states, TASK_STATUSES, "state"),
        specialties=_choices(specialty, SPECIALTIES, "specialty"), agent=agent,
        limit=limit, offset=offset,
    )


@get(f"{PREFIX}/tasks/{{task_id:str}}", tags=["tasks"], responses=_errors(404, 504),
     summary="One task")
async def get_task(view: View, task_id: FromPath[str]) -> TaskOut:
    return view.task_out(task_id)


@get(f"{PREFIX}/tasks/{{task_id:str}}/events", tags=["tasks"], responses=_errors(400, 404, 503),
     summary="A task's events, read from the log")
async def task_events(reader: Reader, task_id: FromPath[str]) -> TaskEvents:
    try:
        check_id(task_id, "task_id")  # never let a wildcard into a subject filter
    except ConfigError as e:
        raise ApiError(400, str(e), "task_id") from None
    store = reader.live.store
    loaded = await store.load(store.ns.task_filter(task_id))
    if not loaded.events and not loaded.bad and task_id not in reader.model.tasks:
        raise ApiError(404, f"no task {task_id!r}", "task_id")
    items = [{"seq": e.seq, **msgspec.to_builtins(e.event)} for e in loaded.events]
    return TaskEvents(task_id=task_id, items=items, bad=loaded.bad, last_seq=loaded.last_seq)


@get(f"{PREFIX}/agents", tags=["agents"], responses=_errors(400, 504),
     summary="Agents, ordered by agent_id")
async def list_agents(view: View, states: AgentStates = None, specialty: Specialties = None,
                      limit: Limit = 50, offset: Offset = 0) -> AgentPage:
    return view.agent_page(
        states=_choices(states, AGENT_STATUSES, "state"),
        specialties=_choices(specialty, SPECIALTIES, "specialty"), limit=limit, offset=offset,
    )


@get(f"{PREFIX}/agents/{{agent_id:str}}", tags=["agents"], responses=_errors(404, 504),
     summary="One agent")
async def get_agent(view: View, agent_id: FromPath[str]) -> AgentOut:
    return view.agent_out(agent_id)


@get(f"{PREFIX}/agents/{{agent_id:str}}/tasks", tags=["agents"], responses=_errors(400, 404, 504),
     summary="Every task ever assigned to the agent, ordered by created_at then task_id")
async def agent_tasks(view: View, agent_id: FromPath[str], states: TaskStates = None,
                      limit: Limit = 50, offset: Offset = 0) -> TaskPage:
    if agent_id not in view.model.agents:
        raise ApiError(404, f"no agent {agent_id!r}", "agent_id")
    tasks = view.model.tasks
    ids = sorted((t.task_id for t in view.model.tasks_of_agent(agent_id)),
                 key=lambda t: (tasks[t].created_at, t))
    return view.task_page(ids, states=_choices(states, TASK_STATUSES, "state"), specialties=None,
                          agent=None, limit=limit, offset=offset)


@get(f"{PREFIX}/cluster", tags=["cluster"], responses=_errors(504), summary="Cluster counters and load")
async def cluster(view: View) -> ClusterView:
    return view.model.cluster()


@get(f"{PREFIX}/bad-events", tags=["cluster"],
     summary="Messages the projection could not apply (undecodable or illegal), for operators")
async def bad_events(reader: Reader) -> BadEvents:
    model = reader.model
    return BadEvents(count=model.bad_count, items=sorted(model.bad, key=lambda b: b.seq))


@get("/health", tags=["health"], responses={503: ResponseSpec(Health, description="NATS unreachable")},
     summary="Liveness and projection lag; 503 when NATS is unreachable")
async def health(reader: Reader) -> Response[Health]:
    live, model = reader.live, reader.model
    connected = live.store.nc.is_connected
    stream_last = max(live.stream_last_seq, model.last_seq)
    readable = False
    if connected:
        try:
            stream_last = await asyncio.wait_for(live.store.last_seq(), HEALTH_NATS_TIMEOUT)
            readable = True
        except (StoreUnavailable, TimeoutError) as e:
            log.warning("api.health_stream_unreadable", error=str(e))
    following = live.following or not live.started
    ok = connected and readable and following
    body = Health(status="ok" if ok else "degraded", nats_connected=connected,
                  last_seq=model.last_seq, stream_last_seq=stream_last,
                  lag=max(0, stream_last - model.last_seq), bad_events=model.bad_count,
                  projection_following=following)
    return Response(body, status_code=200 if ok else 503)


# -- errors: one body shape for every failure ----------------------------------------------
def _error(status: int, detail: str, parameter: str | None = None) -> Response[ErrorBody]:
    slug = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return Response(ErrorBody(error=slug, detail=detail, parameter=parameter), status_code=status)


def _on_api_error(_: Request, exc: ApiError) -> Response[ErrorBody]:
    return _error(exc.status, exc.detail, exc.parameter)


def _on_validation(_: Request, exc: ValidationException) -> Response[ErrorBody]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    key = first.get("key")
    if key:
        return _error(400, f"invalid {key}: {first.get('message', exc.detail)}", key)
    return _error(400, exc.detail)


def _on_http(_: Request, exc: HTTPException) -> Response[ErrorBody]:
    return _error(exc.status_code, exc.detail)


def _on_unavailable(_: Request, exc: StoreUnavailable) -> Response[ErrorBody]:
    return _error(503, str(exc))


def _on_internal(request: Request, exc: Exception) -> Response[ErrorBody]:
    log.error("api.internal_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return _error(500, "internal error; see the server log")


# -- the app -----------------------------------------------------------------------------
HANDLERS = [list_tasks, get_task, task_events, list_agents, get_agent, agent_tasks, cluster,
            bad_events, health]


def create_app(live: LiveReadModel, *, min_seq_timeout: float = MIN_SEQ_TIMEOUT) -> Litestar:
    """The status API over ``live``. The caller owns ``live`` (starts and stops it)."""
    reader = StatusReader(live, min_seq_timeout=min_seq_timeout)

    def provide_reader() -> StatusReader:
        return reader

    # metrics: facts of the log come from the live model (a restart rebuilds them), the
    # API's own request counts from this process; one registry per app
    registry = CollectorRegistry()
    api_metrics = ApiMetrics(registry)
    counters = LogCounters()
    if live.model.last_seq:  # created after the replay: fold what the model already has
        log.warning("api.metrics_started_late", applied=live.model.last_seq)
    live.observers.append(lambda seq, item: counters.apply(seq, item, live.model.tasks))
    ClusterMetrics(live.model, registry, counters=counters,
                   stream_last_seq=lambda: max(live.stream_last_seq, live.model.last_seq))

    async def refresh_lag() -> None:
        with contextlib.suppress(StoreUnavailable, TimeoutError, asyncio.TimeoutError):
            live.stream_last_seq = await asyncio.wait_for(live.store.last_seq(), HEALTH_NATS_TIMEOUT)

    return Litestar(
        route_handlers=[*HANDLERS, metrics_route(registry, before=refresh_lag)],
        middleware=[api_metrics.middleware],
        logging_config=None,  # our logging (with its masking processor) stays in charge
        dependencies={
            "reader": Provide(provide_reader, sync_to_thread=False),
            "view": Provide(_provide_view),
        },
        exception_handlers={
            ApiError: _on_api_error,
            ValidationException: _on_validation,
            HTTPException: _on_http,
            StoreUnavailable: _on_unavailable,
            Exception: _on_internal,
        },
        openapi_config=OpenAPIConfig(
            title="claude-code-cluster status API",
            version=API_VERSION,
            description=(
                "Read-only views of the cluster, projected from the JetStream event log: "
                "tasks, agents, cluster load, the events of a task, and the messages the "
                "projection could not apply. Errors are {error, detail, parameter?}. Pass "
                "min_seq=<stream seq> to read your own writes."
            ),
            path=OPENAPI_PATH,
        ),
    )
