"""``ccc bench api``: the status API under an open-loop load, beside a hello-world route
of the same framework served by the same server, measured in the same run.

The setup: a throwaway nats-server; a board appended straight to its log (``--tasks``
tasks in a spread of states, ``--agents`` registered agents, through the real event
store); the status API as ``ccc up`` and ``ccc api`` serve it (:class:`ApiServer`:
uvicorn, the access gate with the rate limit lifted, the request metrics, the
dashboard beside it, the projection following the log) in a process of its own, with
one extra route, ``GET /bench/hello``, that answers ``{"hello": "world"}``: the
framework's floor on that very server.

The load: an open loop at ``--rate`` requests per second. Request *i* is due at
``start + i / rate`` and is sent then whatever happened to the requests before it
(over a pool of keep-alive connections; a new one is opened only if all are busy), and
its latency is counted **from when it was due**, not from when it went out: a server
that stalls makes every request due meanwhile late, as it would for real clients
(coordinated omission). The generator's own lag (sent minus due) is reported beside.

Each round measures every endpoint for ``--seconds`` in turn (the order rotated per
round, so a machine that gets busier part way through slows every endpoint alike):

* ``hello``   ``/bench/hello`` (the baseline)
* ``task``    ``/api/v1/tasks/<random task>``
* ``tasks``   ``/api/v1/tasks?limit=50&offset=<random page>`` (the board, page by page)
* ``agent``   ``/api/v1/agents/<random agent>``
* ``agents``  ``/api/v1/agents?limit=50&offset=<random page>``
* ``health``  ``/health``

Per endpoint: p50 latency (all rounds pooled), p99 as the median of the rounds' p99s
(and pooled beside it), their ratio to hello's (p99: the median over rounds of the ratio
within each round), CPU of the API process per request
(``/proc``, over the endpoint's phases), and of nats-server (what the endpoint asks the
server for). Why the median of rounds: on a shared machine a stall of the whole host
(another process's burst) lasts tens to hundreds of milliseconds; at 500 requests/s it
makes every request due meanwhile late — a few per cent of one phase — and decides the
pooled p99 of whichever endpoint it happened to hit. Each round's p99 is the endpoint's
own tail; the median over rounds keeps that and drops the host's rare stalls (the
pooled p99 and the maximum still show them). Targets: task, tasks, agent and
agents p99 <= 1.5x hello's p99; ``/health`` no more CPU per request than a task read
(within 10 %: CPU time is counted in 10 ms ticks).

A raw asyncio HTTP/1.1 client drives the load (a few tens of microseconds per request,
so the driver is not what is measured); the driver shares the machine with the server,
as any client on the same host would.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from events import agent_state, task_state
from events.agent_state import RegisterAgent
from events.store import EventStore
from events.subjects import Namespace
from events.task import Analysis, IssueRef
from events.task_state import (
    AssignTask,
    CancelTask,
    CompleteTask,
    CreateTask,
    FailTask,
    OpenPullRequest,
    RecordAnalysis,
    StartAnalysis,
    StartTask,
    StartTests,
)

from infra.adapters.nats.provisioning import provision
from infra.shell.bench.bus import BenchBus
from infra.shell.bench.child import Child
from infra.shell.bench.probes import cpu_seconds, loadavg, pct

NS = Namespace("apibench")
HELLO_PATH = "/bench/hello"
ENDPOINTS = ("hello", "task", "tasks", "agent", "agents", "health")
P99_TARGET = 1.5  # x hello's p99, for the reads below
P99_TARGETED = ("task", "tasks", "agent", "agents")
# /health: no more CPU per request than a task read, within what the measurement resolves
# (CPU time comes in 10 ms ticks: a few per cent of a phase's total)
HEALTH_CPU_TARGET = 1.1
PAGE = 50
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
SPECIALTIES = ("backend", "frontend", "general", "testing", "database")
# where the board's tasks end, one in twenty each (half of them completed): every state
# the views word differently, queued ones (whose wait reason looks at the whole board)
# among them
ENDS = ("pending", "analysing", "queued", "queued", "assigned", "in_progress", "testing", "pr",
        "cancelled", "failed") + ("completed",) * 10


# -- the board -------------------------------------------------------------------------------
def agent_histories(n: int) -> list[list]:
    """``n`` registered agents, specialties spread, a third of them also general."""
    out = []
    for i in range(n):
        aid = f"agent-{i}"
        own = SPECIALTIES[i % len(SPECIALTIES)]
        specialties = (own, "general") if i % 3 == 0 and own != "general" else (own,)
        out.append(agent_state.decide(None, RegisterAgent(at=T0, actor=aid, agent_id=aid, specialties=specialties,
                                                          capacity=2)))
    return out


def task_histories(n: int, n_agents: int) -> list[list]:
    """``n`` tasks through the real state machine, ending as :data:`ENDS` spreads them;
    created a second apart (so every page of the board mixes the states)."""
    steps = ("assigned", "in_progress", "testing", "pr", "completed")
    out = []
    for i in range(n):
        tid, at, agent = f"bench_api-{i}", T0 + timedelta(seconds=i), f"agent-{i % max(1, n_agents)}"
        end, specialty = ENDS[i % len(ENDS)], SPECIALTIES[i % len(SPECIALTIES)]
        path = f"src/module{i % 200}.py"
        commands: list = [CreateTask(at=at, actor="coordinator", task_id=tid, issue=IssueRef(
            source="local", repo=f"bench/repo{i % 20}", number=i + 1, title=f"Fix the endpoint number {i}",
            labels=(specialty,), author=f"user{i % 50}"))]
        if end != "pending":
            commands.append(StartAnalysis(at=at, actor="coordinator"))
        if end not in ("pending", "analysing"):
            commands.append(RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(
                specialty=specialty, requirements=("python",), reasons=(f"label {specialty}",), paths=(path,))))
        if end in steps or end == "failed":
            commands.append(AssignTask(at=at, actor="coordinator", agent_id=agent,
                                       why="the least busy capable agent"))
        if end in steps[1:] or end == "failed":
            commands.append(StartTask(at=at, actor=agent, agent_id=agent))
        if end in steps[2:]:
            commands.append(StartTests(at=at, actor=agent, agent_id=agent, files_changed=(path,),
                                       diff_stat="1 file changed, 3 insertions(+)"))
        if end in steps[3:]:
            commands.append(OpenPullRequest(at=at, actor=agent, agent_id=agent, branch=f"ccc/task-{tid}",
                                            pr_number=i + 1, tests_passed=12, head_sha=f"{i:040x}",
                                            base_branch="main"))
        if end == "completed":
            commands.append(CompleteTask(at=at, actor="coordinator"))
        elif end == "failed":
            commands.append(FailTask(at=at, actor=agent, agent_id=agent, reason="tests failed", phase="testing",
                                     retryable=False))
        elif end == "cancelled":
            commands.append(CancelTask(at=at, actor="user", reason="duplicate", force=True))
        state, events = None, []
        for c in commands:
            new = task_state.decide(state, c)
            state = task_state.fold(new, state)
            events += new
        out.append(events)
    return out


async def populate(store: EventStore, tasks: int, agents: int, chunk: int = 5000) -> int:
    """Append the board, pipelined (each aggregate's events in order on one connection);
    returns the events appended."""
    events = [e for h in agent_histories(agents) + task_histories(tasks, agents) for e in h]
    for k in range(0, len(events), chunk):
        for r in await store.append_many((e, None) for e in events[k:k + chunk]):
            if isinstance(r, Exception):
                raise RuntimeError(f"populating the board failed: {r}")
    return len(events)


# -- the load ----------------------------------------------------------------------------------
class HttpConnection:
    """One keep-alive HTTP/1.1 connection: GET, read the status and the body (by
    Content-Length, or chunked). Minimal on purpose: the driver must cost little."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        return cls(*await asyncio.open_connection(host, port))

    async def get(self, request: bytes) -> tuple[int, int]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            await self.reader.readexactly(length)
            return status, length
        size = 0
        while True:
            n = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await self.reader.readexactly(n + 2)
            size += n
            if n == 0:
                return status, size

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Keep-alive connections to the server; a request takes a free one (a new one if
    none is free) and gives it back."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.free: list[HttpConnection] = []
        self.opened = 0

    async def fill(self, n: int) -> None:
        for _ in range(n):
            self.free.append(await self._new())

    async def get(self, request: bytes) -> tuple[int, int]:
        """A free connection, else a new one. A kept-alive connection the server closed
        meanwhile (uvicorn drops idle ones after 5 s) is retried once on a new one, as
        HTTP clients do; the time that costs counts."""
        reused = bool(self.free)
        conn = self.free.pop() if reused else await self._new()
        try:
            result = await conn.get(request)
        except (OSError, asyncio.IncompleteReadError):
            conn.close()
            if not reused:
                raise
            conn = await self._new()
            try:
                result = await conn.get(request)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        self.free.append(conn)
        return result

    async def _new(self) -> HttpConnection:
        self.opened += 1
        return await HttpConnection.open(self.host, self.port)

    def close(self) -> None:
        for conn in self.free:
            conn.close()
        self.free.clear()


class Phase(msgspec.Struct, kw_only=True):
    """One endpoint for one stretch of the open loop."""

    endpoint: str
    requests: int
    errors: dict[str, int]  # status (other than 200, or "connection failed") -> count
    latency_ns: list[int]  # from when each request was due
    lag_ns: list[int]  # sent minus due: the generator's own lateness
    bytes: int
    seconds: float  # wall time, first due -> last answer
    api_cpu: float  # CPU seconds of the API process in the phase
    nats_cpu: float
    preempted: int = 0  # times the API process was taken off a core it still wanted (another process ran)


async def open_loop(pool: Pool, request: Callable[[int], bytes], rate: float, seconds: float) -> Phase:
    """``rate * seconds`` requests, request i due at ``start + i / rate``; each sent when
    due (late only if the generator itself is late) and timed from when it was due."""
    n = max(1, int(rate * seconds))
    clock = time.perf_counter_ns
    latency, lag = [0] * n, [0] * n
    sizes, errors = [0] * n, Counter()
    step = 1e9 / rate
    start = clock() + 2_000_000

    async def one(i: int, due: int, data: bytes) -> None:
        lag[i] = clock() - due
        try:
            status, size = await pool.get(data)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status, size = 0, 0
        latency[i] = clock() - due
        sizes[i] = size
        if status != 200:
            errors[str(status or "connection failed")] += 1

    running: list[asyncio.Task] = []
    i = 0
    while i < n:
        now = clock()
        while i < n and start + int(i * step) <= now:  # everything due is sent now
            running.append(asyncio.create_task(one(i, start + int(i * step), request(i))))
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, (start + int(i * step) - clock()) / 1e9))
    await asyncio.gather(*running)
    return Phase(endpoint="", requests=n, errors=dict(errors), latency_ns=latency, lag_ns=lag, bytes=sum(sizes),
                 seconds=(clock() - start) / 1e9, api_cpu=0.0, nats_cpu=0.0)


def requests_for(endpoint: str, tasks: int, agents: int, host: str, rng: random.Random) -> Callable[[int], bytes]:
    """Request bytes for ``endpoint``, a random task, agent or page each time."""
    head = f" HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n".encode()
    task_pages, agent_pages = max(1, -(-tasks // PAGE)), max(1, -(-agents // PAGE))
    paths: dict[str, Callable[[], str]] = {
        "hello": lambda: HELLO_PATH,
        "task": lambda: f"/api/v1/tasks/bench_api-{rng.randrange(tasks)}",
        "tasks": lambda: f"/api/v1/tasks?limit={PAGE}&offset={rng.randrange(task_pages) * PAGE}",
        "agent": lambda: f"/api/v1/agents/agent-{rng.randrange(agents)}",
        "agents": lambda: f"/api/v1/agents?limit={PAGE}&offset={rng.randrange(agent_pages) * PAGE}",
        "health": lambda: "/health",
    }
    path = paths[endpoint]
    return lambda _: b"GET " + path().encode() + head


# -- the API process -----------------------------------------------------------------------------
class ApiProcess(Child):
    """``python -m infra.shell.bench.api serve URL NS``: the status API with the hello
    route, in a process of its own; prints ``ready <port>`` once it serves (the
    projection caught up), stops on a line (or EOF) on stdin."""

    def __init__(self, url: str, ns: Namespace, log_path: Path, profile_path: Path | None = None) -> None:
        profile = ["--profile", str(profile_path)] if profile_path is not None else []
        super().__init__("infra.shell.bench.api", ["serve", url, ns.prefix, *profile], log_path, what="API")
        self.port = 0

    async def start(self) -> int:  # type: ignore[override]
        words = await super().start()
        try:
            self.port = int(words[0])
        except (IndexError, ValueError):
            await self.kill()
            raise RuntimeError(f"the API process said it is ready but not on which port: {words!r}") from None
        return self.port


async def _serve(url: str, prefix: str, profile_path: str | None = None) -> None:
    """The API process: the status API as ``ccc api`` serves it, plus the hello route
    (under cProfile, CPU time, with ``profile_path``: diagnosis only, it inflates every
    figure)."""
    import cProfile
    import gc
    import logging

    import structlog
    from litestar import get

    from infra.adapters.http.auth import ApiAccess
    from infra.adapters.http.ratelimit import OFF
    from infra.adapters.http.status_server import ApiServer
    from infra.adapters.nats.connection import connect

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    @get(HELLO_PATH, sync_to_thread=False, include_in_schema=False)
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    pauses: list[tuple[int, float]] = []  # (generation, seconds) of every garbage collection
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    nc = await connect(url, name="ccc-bench-api")
    server = ApiServer(EventStore(nc, Namespace(prefix)), "127.0.0.1", 0, materialize=False,
                       access=ApiAccess(rate_limit=OFF), route_handlers=[hello])
    port = await server.start()
    pauses.clear()  # (the replay's are not the load's)
    profile = cProfile.Profile(time.process_time) if profile_path else None
    if profile is not None:
        profile.enable()
    print(f"ready {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if profile is not None:
        profile.disable()
        profile.dump_stats(profile_path)
    gc.callbacks.remove(on_gc)
    stats = {"applied_seq": server.live.model.last_seq, "bad_events": server.live.model.bad_count,
             "tasks": len(server.live.model.tasks), "agents": len(server.live.model.agents),
             "gc": {str(g): {"count": sum(1 for k, _ in pauses if k == g),
                             "max_ms": round(max((d for k, d in pauses if k == g), default=0.0) * 1000, 2)}
                    for g in (0, 1, 2)}}
    await server.stop()
    await nc.close()
    print(json.dumps(stats), flush=True)


# -- the run -------------------------------------------------------------------------------------
class EndpointResult(msgspec.Struct, kw_only=True):
    endpoint: str
    example: str  # one path it asked for
    requests: int
    errors: dict[str, int]  # status (other than 200, or "connection failed") -> count
    p50_ms: float  # all rounds pooled
    p99_ms: float  # the median of the rounds' p99s
    p99_pooled_ms: float  # all rounds pooled (a stall of the host in any round shows here)
    max_ms: float
    p50_x_hello: float
    p99_x_hello: float  # the median over rounds of (this p99 / hello's p99 in the same round)
    rounds_p99_ms: list[float]  # each round's p99, in order
    api_cpu_ms: float  # CPU of the API process per request
    nats_cpu_ms: float  # CPU of nats-server per request
    preempted_per_s: float  # the API process's involuntary context switches per second: the machine's
                            # other load taking its core (what makes a round's p99 jump on a shared host)
    bytes_per_response: int
    target: str  # "" when none applies
    ok: bool | None  # None when no target applies


class ApiBench(msgspec.Struct, kw_only=True):
    rate: float
    seconds: float  # per endpoint per round
    rounds: int
    tasks: int
    agents: int
    events: int
    endpoints: list[EndpointResult]
    lag_p50_ms: float  # the generator's lateness (sent minus due), all requests
    lag_p99_ms: float
    connections: int  # keep-alive connections the generator opened
    driver_cpu_ms: float  # the generator's CPU per request
    api_gc: dict  # the API process's garbage collections while serving: per generation, count and longest
    cpus: int
    loadavg: list[float]
    targets_met: bool


def preemptions(pid: int | None) -> int:
    """Involuntary context switches of ``pid`` so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"nonvoluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError, TypeError):
        pass
    return 0


def round_p99(phases: list[Phase]) -> float:
    """The median over rounds of each round's p99, ms."""
    return statistics.median(pct(p.latency_ns, 99) for p in phases) / 1e6


def _result(name: str, example: str, phases: list[Phase], hello: list[Phase] | None) -> EndpointResult:
    lat = [x for p in phases for x in p.latency_ns]
    n = sum(p.requests for p in phases)
    p50, p99 = pct(lat, 50) / 1e6, round_p99(phases)
    h50 = pct([x for p in hello for x in p.latency_ns], 50) / 1e6 if hello else p50
    rounds = [pct(p.latency_ns, 99) / 1e6 for p in phases]
    # paired by round: the rounds are seconds apart, so the machine's load drifts less
    # within a pair than across the run
    ratios = [r / h for r, h in zip(rounds, (pct(p.latency_ns, 99) / 1e6 for p in hello))] if hello else [1.0]
    return EndpointResult(
        endpoint=name, example=example, requests=n,
        errors=dict(sum((Counter(p.errors) for p in phases), Counter())),
        p50_ms=round(p50, 3), p99_ms=round(p99, 3), p99_pooled_ms=round(pct(lat, 99) / 1e6, 3),
        max_ms=round(max(lat) / 1e6, 3),
        p50_x_hello=round(p50 / h50, 2) if h50 else 0.0, p99_x_hello=round(statistics.median(ratios), 2),
        rounds_p99_ms=[round(r, 2) for r in rounds],
        api_cpu_ms=round(sum(p.api_cpu for p in phases) * 1000 / n, 3),
        nats_cpu_ms=round(sum(p.nats_cpu for p in phases) * 1000 / n, 4),
        preempted_per_s=round(sum(p.preempted for p in phases) / max(1e-9, sum(p.seconds for p in phases)), 1),
        bytes_per_response=sum(p.bytes for p in phases) // n, target="", ok=None)


def judge(results: list[EndpointResult]) -> bool:
    """Set each endpoint's target and verdict; True if every target is met."""
    by = {r.endpoint: r for r in results}
    for r in results:
        if r.endpoint in P99_TARGETED:
            r.target, r.ok = f"p99 <= {P99_TARGET:g}x hello", r.p99_x_hello <= P99_TARGET and not r.errors
        elif r.endpoint == "health" and "task" in by:
            r.target = f"cpu/request <= task's (x{HEALTH_CPU_TARGET:g}: tick resolution)"
            r.ok = r.api_cpu_ms <= by["task"].api_cpu_ms * HEALTH_CPU_TARGET and not r.errors
    return all(r.ok is not False for r in results)


async def run_api_bench(
    *, tasks: int = 10_000, agents: int = 100, rate: float = 500.0, seconds: float = 2.0, rounds: int = 10,
    endpoints: Sequence[str] = ENDPOINTS, warmup: float = 1.0, connections: int = 16, seed: int = 1,
    progress: Callable[[int, int], None] | None = None, profile_path: str | Path | None = None,
) -> ApiBench:
    """A throwaway server, the board, the API process; then ``rounds`` rounds of every
    endpoint (after a warm-up pass over each), in a rotating order. ``profile_path``:
    run the API process under cProfile and write its stats there (inflates the figures)."""
    unknown = [e for e in endpoints if e not in ENDPOINTS]
    if unknown:
        raise ValueError(f"unknown endpoint {', '.join(unknown)}; choose from {', '.join(ENDPOINTS)}")
    if tasks < 1 or agents < 1 or rate <= 0 or seconds <= 0 or rounds < 1:
        raise ValueError("tasks, agents, rate, seconds and rounds must be positive")
    endpoints = ["hello", *[e for e in endpoints if e != "hello"]]  # the baseline is always measured
    rng = random.Random(seed)
    phases: dict[str, list[Phase]] = {e: [] for e in endpoints}
    total, done = rounds * len(endpoints), 0
    load_before = loadavg()
    driver = 0.0
    with tempfile.TemporaryDirectory(prefix="ccc-bench-api-") as tmp:
        bus = BenchBus(Path(tmp) / "off", "off", "1s")  # the API only reads: fsync is not what is measured
        nc = pool = api = None
        try:
            url = bus.start()
            nc = await bus.connect("admin", name="ccc-bench-api-driver")
            await provision(nc, NS)
            events = await populate(EventStore(nc, NS, timeout=30), tasks, agents)
            api = ApiProcess(url, NS, Path(tmp) / "api.log",
                             Path(profile_path).resolve() if profile_path is not None else None)
            port = await api.start()
            host = f"127.0.0.1:{port}"
            pool = Pool("127.0.0.1", port)
            await pool.fill(connections)
            makers = {e: requests_for(e, tasks, agents, host, rng) for e in endpoints}
            for e in endpoints:  # warm-up: imports, first-use caches, the connections
                await open_loop(pool, makers[e], rate, warmup)
            driver_before = cpu_seconds(os.getpid()) or 0.0
            for r in range(rounds):
                order = endpoints[r % len(endpoints):] + endpoints[:r % len(endpoints)]
                for e in order:
                    api_before, nats_before = cpu_seconds(api.pid or 0), cpu_seconds(bus.server_pid or 0)
                    switches = preemptions(api.pid)
                    phase = await open_loop(pool, makers[e], rate, seconds)
                    phase.endpoint = e
                    phase.api_cpu = (cpu_seconds(api.pid or 0) or 0.0) - (api_before or 0.0)
                    phase.preempted = preemptions(api.pid) - switches
                    phase.nats_cpu = (cpu_seconds(bus.server_pid or 0) or 0.0) - (nats_before or 0.0)
                    phases[e].append(phase)
                    done += 1
                    if progress is not None:
                        progress(done, total)
            driver = (cpu_seconds(os.getpid()) or 0.0) - driver_before
            stats = await api.stop()
            if stats.get("tasks") != tasks or stats.get("bad_events"):
                raise RuntimeError(f"the API's projection held {stats} (expected {tasks} tasks, no bad events)")
            connections = pool.opened
            api_gc = stats.get("gc", {})
        finally:
            if pool is not None:
                pool.close()
            if api is not None:
                await api.kill()
            if nc is not None:
                await nc.close()
            bus.stop()
    examples = {e: makers[e](0).split(b" ")[1].decode() for e in endpoints}
    results = [_result(e, examples[e], phases[e], phases["hello"] if e != "hello" else None) for e in endpoints]
    met = judge(results)
    lags = [x for ps in phases.values() for p in ps for x in p.lag_ns]
    n = sum(p.requests for ps in phases.values() for p in ps)
    return ApiBench(rate=rate, seconds=seconds, rounds=rounds, tasks=tasks, agents=agents, events=events,
                    endpoints=results, lag_p50_ms=round(pct(lags, 50) / 1e6, 3),
                    lag_p99_ms=round(pct(lags, 99) / 1e6, 3), connections=connections,
                    driver_cpu_ms=round(driver * 1000 / n, 3), api_gc=api_gc, cpus=os.cpu_count() or 0,
                    loadavg=[load_before, loadavg()], targets_met=met)


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.shell.bench.api",
                                     description="The status API process of `ccc bench api`.")
    parser.add_argument("role", choices=["serve"])
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--profile", default=None, help="write cProfile stats (CPU time) here")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.url, args.namespace, args.profile))


if __name__ == "__main__":  # the API process of the bench
    _main(sys.argv[1:])
