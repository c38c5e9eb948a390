"""The dashboard's pages: server-rendered HTML over the status API's live projection.

    dashboard = Dashboard(live)          # before ``live`` replays: its fold rides along
    app = create_app(live, route_handlers=[*dashboard.route_handlers(), ...])

Routes (GET, read scope, behind the API's gate like every route):

* ``/`` the overview, ``/board`` the task board (``state``, ``specialty``, ``agent``,
  ``repo``, ``q``, ``limit``, ``offset``), ``/tasks/{id}`` a task (``seq``: the replay
  panel at that position), ``/agents/{id}`` an agent;
* ``/tasks/{id}/artifacts/{ref}``: one of the task's artifacts (a diff, a test log, a
  transcript: only those its events name), read from the object store, masked again and
  shown as text, at most :data:`MAX_ARTIFACT_SHOWN` bytes of it;
* ``?fragment=<name>`` on a page answers with the inner HTML of its ``[data-live=<name>]``
  element only (``overview``, ``board``, ``task``, ``agent``), or, on a task page,
  ``replay`` (with ``seq``): the inner HTML of ``#replay``. The live script swaps those
  in; ``X-Ccc-Last-Seq`` says which log position a fragment reflects;
* ``/static/<name>``: the stylesheet and the scripts, shipped inside the package.

Every page sends a strict Content-Security-Policy (``default-src 'self'``: no inline
script or style, no other origin), so a title that slipped past the escaping still could
not run; the templates are autoescaped and no inline handler or style is used.

What a page shows is computed by the pure view models of :mod:`projections.dashboard`;
this module only reads what those need from NATS (a task's messages with their headers,
an agent's last heartbeat, the dead letters' count, the coordinator's consumers), with
short timeouts and small caches, and renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
import nats.errors
import nats.js.errors
import structlog
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import Request, Response, Router, get
from litestar.enums import MediaType
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.static_files import create_static_files_router
from markupsafe import Markup

from events.agent import Heartbeat
from events.codec import decode_or_bad
from events.errors import ConfigError, StoreUnavailable
from events.refs import split_ref, upgrade_ref
from events.secrets import process_masker
from events.subjects import check_id
from events.task import SPECIALTIES
from events.task_state import TASK_STATUSES
from projections.dashboard import (
    BOARD_LIMIT,
    BOARD_MAX_LIMIT,
    BoardIndex,
    BoardQuery,
    DashboardFold,
    LogEntry,
    agent_page,
    board_page,
    overview,
    replay,
    safe_url,
    task_page,
)
from projections.fairness import FairnessPolicy
from projections.live import LiveReadModel
from projections.waits import Holds, Waits, age
from projections.waits import clock as clock_text

from infra.adapters.http.auth import PUBLIC
from infra.adapters.http.dashboard import csrf
from infra.adapters.http.dashboard.actions import task_actions

log = structlog.get_logger("ccc.dashboard")

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP, PAGE_HEADERS = csrf.CSP, csrf.PAGE_HEADERS
NATS_TIMEOUT = 2.0  # each look-up a page makes; a page never hangs on a slow server
SIDE_CACHE_SECONDS = 2.0  # dead letters, consumers, the log's end: asked at most this often
MAX_HISTORY = 5000  # messages of one task read for its page
ENTRY_CACHE = 20_000  # messages kept decoded (the log is immutable: a sequence never changes)
FETCH_CONCURRENCY = 32
MAX_ARTIFACT_BYTES = 16 * 1024 * 1024  # larger objects are not fetched at all
MAX_ARTIFACT_SHOWN = 512 * 1024  # of a fetched one, this much is shown
FRAGMENTS = {"overview": ("overview",), "board": ("board",), "task": ("task", "replay"), "agent": ("agent",)}
TRACEPARENT = "traceparent"
FAVICON = (STATIC / "favicon.svg").read_bytes()


class PageError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["age"] = lambda seconds: age(seconds) if seconds is not None else ""
    env.filters["money"] = lambda dollars: f"${dollars:,.4f}" if dollars else "$0"
    env.filters["iso"] = lambda at: at.astimezone(UTC).isoformat(timespec="seconds") if at else ""
    env.filters["label"] = lambda status: str(status).replace("_", " ")
    env.filters["safe_url"] = safe_url
    env.filters["clock"] = lambda at, now: clock_text(at, now) if at else ""
    return env


class Dashboard:
    """The pages over ``live``. Create it before ``live`` replays (its fold of what the
    current states cannot tell rides along as an observer from sequence 1)."""

    def __init__(self, live: LiveReadModel, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 consumers: Iterable[tuple[str, str]] | None = None, local_forge: bool = False,
                 fairness: FairnessPolicy | None = None, holds: Callable[[], Holds] | None = None) -> None:
        self.live = live
        self.fairness = fairness  # the coordinator's admission policy: its limits explain waits
        self.holds = holds  # the spend ledger and the plugins' holds: they explain waits too
        self.local_forge = local_forge  # the actions serve the local forge here: merge and close
        self.store = live.store
        self.ns = live.store.ns
        self.clock = clock
        self.fold = DashboardFold(self.ns.prefix)
        # created after the replay (a caller's live model already running): the fold misses
        # what came before; a task's history is then looked up in the log (slower, complete)
        self.late = live.model.last_seq > 0
        if self.late:
            log.warning("dashboard.started_late", applied=live.model.last_seq)
        live.observers.append(self.fold.apply)
        self.index = BoardIndex()
        self.env = _environment()
        # the coordinator's durable consumers: (stream, name); their pending count is lag
        self.consumers = tuple(consumers) if consumers is not None else (
            (self.ns.issues_stream, "coordinator-intake"), (self.ns.events_stream, "coordinator-reports"))
        self._waits: tuple[tuple, Waits] | None = None
        self._side: tuple[float, int | None, dict[str, int | None]] | None = None
        self._entries: OrderedDict[int, LogEntry] = OrderedDict()

    @property
    def model(self) -> Any:
        return self.live.model

    # -- the routes ---------------------------------------------------------------------
    def route_handlers(self) -> list[Any]:
        """The pages (one router, with HTML error pages) and the static files."""
        dash = self

        @get("/", name="dashboard-overview", include_in_schema=False)
        async def overview_page(request: Request) -> Response:
            return await dash.overview(request)

        @get("/board", name="dashboard-board", include_in_schema=False)
        async def board(request: Request) -> Response:
            return dash.board(request)

        @get("/tasks/{task_id:str}", name="dashboard-task", include_in_schema=False)
        async def task(request: Request, task_id: FromPath[str]) -> Response:
            return await dash.task(request, task_id)

        @get("/tasks/{task_id:str}/artifacts/{ref:path}", name="dashboard-artifact", include_in_schema=False)
        async def artifact(request: Request, task_id: FromPath[str], ref: FromPath[str]) -> Response:
            return await dash.artifact(request, task_id, ref.lstrip("/"))

        @get("/agents/{agent_id:str}", name="dashboard-agent", include_in_schema=False)
        async def agent(request: Request, agent_id: FromPath[str]) -> Response:
            return await dash.agent(request, agent_id)

        @get("/favicon.ico", name="dashboard-favicon", include_in_schema=False, opt={"scope": PUBLIC},
             sync_to_thread=False)
        def favicon() -> Response:  # where a page names none (a browser asks for this one)
            return Response(FAVICON, media_type="image/svg+xml",
                            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})

        # plain functions, not bound methods: Litestar deep-copies a router's handlers map
        def on_page_error(request: Request, exc: PageError) -> Response:
            return dash.error_page(request, exc.status, exc.detail)

        def on_http(request: Request, exc: HTTPException) -> Response:
            response = dash.error_page(request, exc.status_code, exc.detail)
            if exc.headers:  # the guard's challenge (401, 403), an Allow (405): part of the answer
                response.headers.update(exc.headers)
            return response

        def on_unavailable(request: Request, exc: StoreUnavailable) -> Response:
            return dash.error_page(request, 503, str(exc))

        pages = Router(path="/", route_handlers=[overview_page, board, task, artifact, agent, favicon],
                       exception_handlers={PageError: on_page_error, HTTPException: on_http,
                                           StoreUnavailable: on_unavailable})
        static = create_static_files_router(path="/static", directories=[STATIC], name="dashboard-static",
                                            include_in_schema=False, opt={"scope": PUBLIC})
        return [pages, static]

    # -- pages ----------------------------------------------------------------------------
    async def overview(self, request: Request) -> Response:
        fragment = self._fragment(request, "overview")
        stream_last, dead, consumers = await self._side_facts()
        view = overview(self.model, self.fold, self.clock(), stream_last_seq=stream_last,
                        dead_letters=dead, consumers=consumers)
        return self._render(request, "overview", "Overview", {"o": view}, fragment=fragment)

    def board(self, request: Request) -> Response:
        fragment = self._fragment(request, "board")
        query = board_query(request.query_params)
        model = self.model
        view = board_page(model.tasks, self.index, query, self.clock(), last_seq=model.last_seq,
                          waits=self._board_waits())
        base = board_params(query)
        pages = {
            "next": _url("/board", {**base, "offset": view.next_offset}) if view.next_offset is not None else "",
            "prev": _url("/board", {**base, "offset": view.prev_offset}) if view.prev_offset is not None else "",
        }
        return self._render(request, "board", "Board", {
            "b": view, "query": query, "pages": pages, "statuses": TASK_STATUSES, "specialties": SPECIALTIES,
            "default_limit": BOARD_LIMIT,
            "filtered": any(base.get(k) for k in ("state", "specialty", "agent", "repo", "q")),
        }, fragment=fragment)

    async def task(self, request: Request, task_id: str) -> Response:
        fragment = self._fragment(request, "task")
        task_id = _checked_id(task_id, "task")
        # the position the page can claim: taken *before* the history is read (what is applied
        # while it is read may be missing from it, and must come again by the live stream)
        seen = self.model.last_seq
        entries = await self.history(task_id)
        if not entries and task_id not in self.model.tasks:
            raise PageError(404, f"no task {task_id!r}")
        view = task_page(task_id, entries, self.clock(), waits=self._board_waits(), tasks=self.model.tasks,
                         fairness=self.fairness)
        seq = _int(request.query_params.get("seq"), "seq", default=view.last_seq, minimum=0)
        shown = replay(entries, seq)
        actions = task_actions(view.state, local_forge=self.local_forge) if view.state is not None else ()
        return self._render(request, "task", task_id, {
            "t": view, "r": shown, "actions": actions, "task_id": task_id,
        }, fragment=fragment, last_seq=seen)

    async def agent(self, request: Request, agent_id: str) -> Response:
        fragment = self._fragment(request, "agent")
        agent_id = _checked_id(agent_id, "agent")
        heartbeat = await self.heartbeat(agent_id) if agent_id in self.model.agents else None
        view = agent_page(self.model, self.fold, agent_id, self.clock(), heartbeat)
        if view is None:
            raise PageError(404, f"no agent {agent_id!r}")
        return self._render(request, "agent", agent_id, {"a": view}, fragment=fragment)

    async def artifact(self, request: Request, task_id: str, ref: str) -> Response:
        task_id = _checked_id(task_id, "task")
        entries = await self.history(task_id)
        view = task_page(task_id, entries, self.clock())
        known = {a.ref: a for a in view.artifacts}
        ref = upgrade_ref(ref)  # a link of an older version (``<bucket>/<name>``) still works
        if ref not in known:
            raise PageError(404, f"task {task_id!r} has no artifact {ref!r}")
        text, size, cut = await self.read_artifact(ref)
        lines = text.splitlines()
        return self._render(request, "artifact", f"{known[ref].kind} of {task_id}", {
            "task_id": task_id, "a": known[ref], "lines": lines, "size": size, "cut": cut,
            "diff": known[ref].kind == "diff", "max_shown": MAX_ARTIFACT_SHOWN,
        }, fragment=None)

    # -- what the pages read from NATS ------------------------------------------------------
    async def history(self, task_id: str) -> list[LogEntry]:
        """The task's messages (its events, the agents' events about it, bad messages on its
        subjects), with their traceparent, fetched by sequence (direct gets, a few dozen
        in flight) and kept decoded: a sequence's message never changes."""
        seqs = self.fold.seqs_of(task_id)
        if self.late and task_id in self.model.tasks:  # what the fold may have missed
            loaded = await self.store.load(self.ns.task_filter(task_id))
            seqs = sorted({*seqs, *(e.seq for e in loaded.events), *(b.seq for b in loaded.bad)})
        if not seqs:
            return []
        if len(seqs) > MAX_HISTORY:
            log.warning("dashboard.history_truncated", task=task_id, messages=len(seqs), shown=MAX_HISTORY)
            seqs = seqs[-MAX_HISTORY:]
        missing = [s for s in seqs if s not in self._entries]
        if missing and not self.store.nc.is_connected:
            raise StoreUnavailable("NATS unavailable: not connected (the page needs the task's messages)")
        if missing:
            gate = asyncio.Semaphore(FETCH_CONCURRENCY)

            async def fetch(seq: int) -> LogEntry | None:
                async with gate:
                    return await self._entry(seq)

            for entry in await asyncio.gather(*(fetch(s) for s in missing)):
                if entry is not None:
                    self._entries[entry.seq] = entry
            while len(self._entries) > ENTRY_CACHE:
                self._entries.popitem(last=False)
        found = []
        for s in seqs:
            entry = self._entries.get(s)
            if entry is not None:
                self._entries.move_to_end(s)
                found.append(entry)
        return found

    async def _entry(self, seq: int) -> LogEntry | None:
        try:
            msg = await asyncio.wait_for(
                self.store.js.get_msg(self.ns.events_stream, seq=seq, direct=True), NATS_TIMEOUT)
        except nats.js.errors.NotFoundError:
            return None
        except (TimeoutError, nats.errors.Error, OSError) as e:
            raise StoreUnavailable(f"NATS unavailable: reading seq {seq}: {type(e).__name__}: {e}") from None
        headers = msg.headers or {}
        subject = msg.subject or headers.get("Nats-Subject", "")
        item = decode_or_bad(seq, subject, self.ns.rel(subject), msg.data or b"")
        return LogEntry(seq=seq, item=item, traceparent=str(headers.get(TRACEPARENT, ""))[:200],
                        stored_at=_timestamp(headers.get("Nats-Time-Stamp")))

    async def heartbeat(self, agent_id: str) -> Heartbeat | None:
        """The agent's last heartbeat (its stream keeps one per agent), or None."""
        try:
            msg = await asyncio.wait_for(self.store.js.get_msg(
                self.ns.heartbeats_stream, subject=self.ns.heartbeat_subject(agent_id), direct=True), NATS_TIMEOUT)
            return msgspec.json.decode(msg.data or b"", type=Heartbeat)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError, msgspec.DecodeError):
            return None

    async def _side_facts(self) -> tuple[int | None, int | None, dict[str, int | None]]:
        """(the log's end, dead letters, pending per consumer), each None if unknown;
        asked at most every :data:`SIDE_CACHE_SECONDS` (the overview is re-fetched on
        every event)."""
        now = time.monotonic()
        if self._side is not None and now - self._side[0] < SIDE_CACHE_SECONDS:
            _, dead, consumers = self._side
            return self._stream_last(), dead, consumers
        js = self.store.js
        if not self.store.nc.is_connected:  # asking would only wait for the timeouts
            return self._stream_last(), None, {name: None for _, name in self.consumers}
        with contextlib.suppress(StoreUnavailable, asyncio.TimeoutError):
            self.live.stream_last_seq = await asyncio.wait_for(self.store.last_seq(), NATS_TIMEOUT)
        dead: int | None = None
        try:
            info = await asyncio.wait_for(js.stream_info(self.ns.dlq_stream), NATS_TIMEOUT)
            dead = info.state.messages
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError):
            pass
        consumers: dict[str, int | None] = {}
        for stream, name in self.consumers:
            try:
                ci = await asyncio.wait_for(js.consumer_info(stream, name), NATS_TIMEOUT)
                consumers[name] = ci.num_pending or 0
            except nats.js.errors.NotFoundError:
                continue  # not running here (another coordinator's name, or none yet)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError):
                consumers[name] = None
        self._side = (now, dead, consumers)
        return self._stream_last(), dead, consumers

    def _stream_last(self) -> int | None:
        last = self.live.stream_last_seq
        return max(last, self.model.last_seq) if last else None

    async def read_artifact(self, ref: str) -> tuple[str, int, bool]:
        """(the text shown, the object's size, whether it was cut): masked again here, as
        everything shown is, whatever the writer did."""
        try:
            bucket, name = split_ref(ref)
        except ConfigError:
            raise PageError(404, f"no artifact {ref!r}") from None
        try:
            obs = await asyncio.wait_for(self.store.js.object_store(bucket), NATS_TIMEOUT)
            info = await asyncio.wait_for(obs.get_info(name), NATS_TIMEOUT)
            size = int(info.size or 0)
            if size > MAX_ARTIFACT_BYTES:
                return "", size, True
            result = await asyncio.wait_for(obs.get(name), 5 * NATS_TIMEOUT)
        except (nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError,
                nats.js.errors.ObjectDeletedError, nats.js.errors.BucketNotFoundError):
            raise PageError(404, f"artifact {ref!r} is not in the object store") from None
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as e:
            raise StoreUnavailable(f"object store {bucket}: {type(e).__name__}: {e}") from None
        data = result.data or b""
        cut = len(data) > MAX_ARTIFACT_SHOWN
        text = data[:MAX_ARTIFACT_SHOWN].decode("utf-8", "replace")
        return process_masker().text(text), size or len(data), cut

    def _board_waits(self) -> Waits:
        """The board's leases and merge queues, built once per log position (and holds: a
        cap raised or a plugin's hold ending changes the waits without an event)."""
        holds = self.holds() if self.holds is not None else Holds()
        key = (self.model.last_seq, holds.key())
        if self._waits is None or self._waits[0] != key:
            self._waits = (key, Waits.of(self.model.tasks, self.model.agents, self.fairness, holds))
        return self._waits[1]

    # -- rendering ---------------------------------------------------------------------------
    def _fragment(self, request: Request, page: str) -> str | None:
        name = request.query_params.get("fragment")
        if name is None:
            return None
        if name not in FRAGMENTS[page]:
            raise PageError(400, f"no fragment {name[:40]!r} on this page; one of: {', '.join(FRAGMENTS[page])}")
        return name

    def _render(self, request: Request, page: str, title: str, context: Mapping[str, Any], *,
                fragment: str | None, last_seq: int | None = None) -> Response:
        """``page``'s template (``<page>.html``), or only its fragment's (``_<name>.html``:
        the inner HTML of the live element), with the context every page has. ``last_seq``:
        the log position the page reflects (default: the model's now; a page that awaited
        a read passes the position from before it)."""
        last_seq = self.model.last_seq if last_seq is None else last_seq
        flash = None if fragment else csrf.read_flash(request)
        ctx = {
            "page": page, "title": title, "last_seq": last_seq, "request": request, "now": self.clock(),
            "csrf_field": lambda: csrf.csrf_field(request), "principal": request.scope.get("auth"),
            "flash": flash, **context,
        }
        name = f"_{fragment}.html" if fragment else f"{page}.html"
        html = self.env.get_template(name).render(ctx)
        response = Response(html, media_type=MediaType.HTML,
                            headers={**PAGE_HEADERS, "X-Ccc-Last-Seq": str(last_seq)})
        if flash is not None:  # shown once
            csrf.clear_flash(response, request)
        return response

    def error_page(self, request: Request, status: int, detail: str) -> Response:
        html = self.env.get_template("error.html").render({
            "page": "error", "title": f"{status}", "status": status, "detail": detail, "now": self.clock(),
            "last_seq": self.model.last_seq, "request": request, "csrf_field": lambda: Markup(""),
            "principal": request.scope.get("auth"), "flash": None,
        })
        return Response(html, status_code=status, media_type=MediaType.HTML,
                         headers={**PAGE_HEADERS, **({"Retry-After": "2"} if status == 503 else {})})


# -- parameters -------------------------------------------------------------------------------
def board_query(params: Mapping[str, Any]) -> BoardQuery:
    """The board's filters from a query string (``state`` repeated or comma-separated);
    an unknown state or specialty, or a malformed number, is a 400."""
    getall = getattr(params, "getall", None)
    raw_states = getall("state", []) if getall else [params.get("state", "")]
    states = {s.strip() for raw in raw_states for s in str(raw).split(",") if s.strip()}
    unknown = sorted(states.difference(TASK_STATUSES))
    if unknown:
        raise PageError(400, f"unknown state {', '.join(map(repr, unknown))[:200]}")
    specialty = (params.get("specialty") or "").strip() or None
    if specialty is not None and specialty not in SPECIALTIES:
        raise PageError(400, f"unknown specialty {specialty[:40]!r}")
    return BoardQuery(
        states=frozenset(states) or None, specialty=specialty,
        agent=(params.get("agent") or "").strip()[:128] or None,
        repo=(params.get("repo") or "").strip()[:200] or None,
        q=(params.get("q") or "").strip()[:200],
        limit=_int(params.get("limit"), "limit", default=BOARD_LIMIT, minimum=1, maximum=BOARD_MAX_LIMIT),
        offset=_int(params.get("offset"), "offset", default=0, minimum=0),
    )


def board_params(query: BoardQuery) -> dict[str, Any]:
    """The query string of ``query`` (for links that keep the filters)."""
    return {"state": ",".join(s for s in TASK_STATUSES if query.states and s in query.states),
            "specialty": query.specialty or "", "agent": query.agent or "", "repo": query.repo or "",
            "q": query.q, "limit": query.limit if query.limit != BOARD_LIMIT else ""}


def _url(path: str, params: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


def _int(raw: Any, name: str, *, default: int, minimum: int, maximum: int | None = None) -> int:
    if raw in (None, ""):
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise PageError(400, f"{name} must be a whole number") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise PageError(400, f"{name} must be {bound}")
    return value


def _checked_id(value: str, what: str) -> str:
    try:
        return check_id(value, f"{what} id")
    except ConfigError:
        raise PageError(404, f"no {what} {value[:128]!r}") from None


def _timestamp(raw: Any) -> datetime | None:
    """``Nats-Time-Stamp`` (RFC 3339 with nanoseconds) as a datetime, or None."""
    if not raw:
        return None
    text = str(raw).strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python parses at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


__all__ = ["CSP", "MAX_ARTIFACT_SHOWN", "PAGE_HEADERS", "Dashboard", "PageError", "board_params",
           "board_query"]
