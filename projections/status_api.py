"""The read-side status API: a Litestar app over a :class:`LiveReadModel`.

Pure read side: answers come from the in-memory projection (which follows the log),
except ``/tasks/{id}/events``, read from the log itself. Nothing here writes an event.

JSON shapes (all stable; new fields may be added, none removed or retyped):

* task: the :class:`TaskState` fields + ``applied_seq`` (stream sequence of the last
  event folded into it), exactly what the ``<ns>_tasks`` KV bucket holds, + ``waiting``:
  what the task waits for now (checks running, queued for merge, needs a human, a file
  lease, ...; "" when it is not waiting), computed at the request from the whole board
  (:mod:`projections.waits`), so it is not in the KV bucket;
  agent: the :class:`AgentState` fields + ``applied_seq``.
* lists: ``{items, total, limit, offset, next_offset, last_seq}``; ``last_seq`` is the
  log position the page reflects, ``next_offset`` is null on the last page.
* errors, for every status >= 400: ``{error, detail, parameter?}``: ``error`` is the
  HTTP reason as a slug (``not_found``, ``bad_request``, ``gateway_timeout``...);
  ``parameter`` names the query/path parameter at fault (400, 404, 504), if any.

Read-your-writes: a writer that got stream sequence N back from ``append`` passes
``min_seq=N``; the request waits (bounded) until the projection has applied N and
answers 504 if it does not in time.

The OpenAPI document is at ``/schema/openapi.json``; beside it, ``/asyncapi.json`` is the
AsyncAPI 3.0 document of the cluster's subjects and events (:mod:`events.contract`, the
committed current version).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Litestar, MediaType, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import FromPath, QueryParameter
from prometheus_client import CollectorRegistry

from events.agent_state import AGENT_STATUSES
from events.contract import committed_asyncapi
from events.errors import ConfigError, StoreUnavailable
from events.subjects import check_id
from events.task import SPECIALTIES
from events.task_state import TASK_STATUSES

from projections.waits import Holds
from projections.fairness import FairnessPolicy
from projections.live import LiveReadModel
from projections.metrics import ClusterMetrics, LogCounters
from projections.read_model import ClusterView
from projections.status_views import (
    MIN_SEQ_TIMEOUT,
    AgentOut,
    AgentPage,
    ApiError,
    BadEvents,
    ErrorBody,
    Health,
    StatusReader,
    TaskEvents,
    TaskOut,
    TaskPage,
)

log = structlog.get_logger("ccc.api")

API_VERSION = "1.0.0"
PREFIX = "/api/v1"
OPENAPI_PATH = "/schema"  # the document is at /schema/openapi.json
HEALTH_NATS_TIMEOUT = 2.0


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


def _choices(values: list[str] | None, allowed: tuple[str, ...], param: str) -> frozenset[str] | None:
    """``?state=a&state=b`` and ``?state=a,b`` both mean a or b; none means any."""
    chosen = {v.strip() for raw in values or () for v in raw.split(",") if v.strip()}
    unknown = sorted(chosen.difference(allowed))
    if unknown:
        raise ApiError(400, f"unknown {param} {', '.join(map(repr, unknown))}; "
                            f"expected one of: {', '.join(allowed)}", param)
    return frozenset(chosen) or None


async def _provide_view(reader: Reader, min_seq: MinSeq = None) -> StatusReader:
    if min_seq:
        await reader.wait_for(min_seq)
    return reader


# -- handlers ----------------------------------------------------------------------------
@get(f"{PREFIX}/tasks", tags=["tasks"], responses=_errors(400, 504),
     summary="Tasks, ordered by created_at then task_id")
async def list_tasks(view: View, states: TaskStates = None, specialty: Specialties = None,
                     agent: AgentFilter = None, limit: Limit = 50, offset: Offset = 0) -> Response[TaskPage]:
    # a TaskPage, encoded from each task's JSON as cached (StatusReader.task_page_json)
    return Response(view.task_page_json(
        view.task_ids_in_order(), states=_choices(states, TASK_STATUSES, "state"),
        specialties=_choices(specialty, SPECIALTIES, "specialty"), agent=agent,
        limit=limit, offset=offset,
    ), media_type=MediaType.JSON)


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
    if connected:  # the log's end, asked of NATS at most every HEALTH_TTL (StatusReader.stream_end)
        readable, end = await reader.stream_end(HEALTH_NATS_TIMEOUT)
        stream_last = max(end, model.last_seq)  # (asked up to HEALTH_TTL ago: the model may be past it)
    following = live.following or not live.started
    ok = connected and readable and following
    body = Health(status="ok" if ok else "degraded", nats_connected=connected,
                  last_seq=model.last_seq, stream_last_seq=stream_last,
                  lag=max(0, stream_last - model.last_seq), bad_events=model.bad_count,
                  projection_following=following)
    return Response(body, status_code=200 if ok else 503)


@get("/asyncapi.json", sync_to_thread=False, include_in_schema=False)  # a document beside OpenAPI's, not an endpoint
def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the subjects: every event type, its channel, its writers and readers."""
    return committed_asyncapi()


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
    response = _error(exc.status_code, exc.detail)
    if exc.headers:  # WWW-Authenticate on a 401/403 from a guard, Allow on a 405: part of the answer
        response.headers.update(exc.headers)
    return response


def _on_unavailable(_: Request, exc: StoreUnavailable) -> Response[ErrorBody]:
    return _error(503, str(exc))


def _on_internal(request: Request, exc: Exception) -> Response[ErrorBody]:
    log.error("api.internal_error", path=request.url.path, error=repr(exc), exc_info=exc)
    return _error(500, "internal error; see the server log")


# -- the app -----------------------------------------------------------------------------
HANDLERS = [list_tasks, get_task, task_events, list_agents, get_agent, agent_tasks, cluster,
            bad_events, health, asyncapi]


def register_log_metrics(live: LiveReadModel, registry: CollectorRegistry) -> Callable[[], Awaitable[None]]:
    """Register the facts of the log in ``registry``: :class:`ClusterMetrics` over
    ``live``'s model, with :class:`LogCounters` fed by ``live`` (a restart rebuilds
    them). Call it before ``live`` replays, so the counters ride along from seq 1.
    Returns what to await before each scrape: it refreshes the stream's last
    sequence, for the lag gauge."""
    counters = LogCounters()
    if live.model.last_seq:  # created after the replay: fold what the model already has
        log.warning("api.metrics_started_late", applied=live.model.last_seq)
    live.observers.append(lambda seq, item: counters.apply(seq, item, live.model.tasks))
    ClusterMetrics(live.model, registry, counters=counters,
                   stream_last_seq=lambda: max(live.stream_last_seq, live.model.last_seq))

    async def refresh_lag() -> None:
        with contextlib.suppress(StoreUnavailable, TimeoutError, asyncio.TimeoutError):
            live.stream_last_seq = await asyncio.wait_for(live.store.last_seq(), HEALTH_NATS_TIMEOUT)

    return refresh_lag


def create_app(live: LiveReadModel, *, min_seq_timeout: float = MIN_SEQ_TIMEOUT,
               route_handlers: Sequence[Any] = (), middleware: Sequence[Any] = (),
               guards: Sequence[Any] = (), clock: Callable[[], datetime] | None = None,
               fairness: FairnessPolicy | None = None, holds: Callable[[], Holds] | None = None) -> Litestar:
    """The status API over ``live``. The caller owns ``live`` (starts and stops it), and
    adds what is served beside the API: ``route_handlers`` (``/metrics``), ASGI
    ``middleware`` (the request metrics) and app-wide ``guards`` (the server's access
    check; a route states the scope it needs as ``opt={"scope": "write"}``, plain data,
    so the handlers here need not know how access is checked). ``clock``: "now" for the
    tasks' ``waiting`` (the wall clock by default)."""
    reader = (StatusReader(live, min_seq_timeout=min_seq_timeout, fairness=fairness, holds=holds)
              if clock is None else
              StatusReader(live, min_seq_timeout=min_seq_timeout, clock=clock, fairness=fairness, holds=holds))

    def provide_reader() -> StatusReader:
        return reader

    return Litestar(
        route_handlers=[*HANDLERS, *route_handlers],
        middleware=list(middleware),
        guards=list(guards),
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
                "min_seq=<stream seq> to read your own writes. The events themselves (subjects, "
                "payload schemas, writers and readers) are described by the AsyncAPI document at "
                "/asyncapi.json."
            ),
            path=OPENAPI_PATH,
        ),
    )


__all__ = ["API_VERSION", "HANDLERS", "HEALTH_NATS_TIMEOUT", "MIN_SEQ_TIMEOUT", "OPENAPI_PATH", "PREFIX",
           "AgentOut", "AgentPage", "ApiError", "BadEvents", "ErrorBody", "Health", "StatusReader",
           "TaskEvents", "TaskOut", "TaskPage", "create_app", "register_log_metrics"]
