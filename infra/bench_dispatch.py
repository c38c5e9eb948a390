"""``ccc bench dispatch``: how fast the coordinator turns issues into assignments, and
how many tasks per second go through the whole state machine, beside raw JetStream
baselines measured in the same run on the same throwaway server.

* raw round trip:   ``await js.publish`` one at a time (p50/p99)
* raw hop:          core publish to a stream subject -> delivery to an ordered push
                    consumer (the floor of one actor-to-actor hop)
* raw publish rate: nats-py ``publish_async``, pipelined
* dispatch latency: ``IssueOpened`` published -> ``TaskAssigned`` seen by an ordered
                    consumer, one issue at a time, with N registered idle agents
* throughput:       M issues published pipelined -> the last ``TaskCompleted``, with
                    "null agents" that do no work and a "reviewer" that merges at once

What is real and what is not: the coordinator is the project's own
:class:`~actors.coordinator.Coordinator`, run in its own process (as deployed: it
shares the machine, not an event loop, with the agents), logging at the CLI's default
level (warning). Agents are null agents: registered through real agent events, each
writing exactly what a real agent writes to its own aggregate (start, implementation
produced, PR opened, release; sequential, with the concurrency check), but without
cloning or running anything and without the per-assignment ``load_task`` a real agent
does. By default each report waits until the log shows the coordinator's reaction to
the previous one (see :class:`NullAgent`). They heartbeat once; the coordinator is
given a heartbeat timeout of an hour so none is declared lost. A "reviewer" publishes
the merge as soon as a task is in review, and publishes it again if the coordinator
dropped it (see ``MERGE_RESEND``).

Every figure is wall time on one machine where nats-server, the coordinator and the
driver compete for the cores (and, on a shared machine, other work too: each run
reports the CPU its processes and the whole machine used, and the CPU pressure, the
share of time some runnable task waited for a core). Read the ratios.

Where the time goes is measured, not guessed: after each run the log is replayed with
the server's store timestamps, and every hop of every task (issue stored -> created ->
... -> completed) is reported as a median/p99. ``profile_dir`` also runs the
coordinator process under cProfile (that inflates the figures: diagnosis only).
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from nats.js import api

from events import agent_state as ag
from events.agent import AgentEventBase, Heartbeat
from events.codec import decode_event, encode
from events.errors import StoreUnavailable
from events.issue import IssueOpened, IssuePullRequestMerged
from events.store import EventStore
from events.subjects import Namespace, task_id_for

from .nats_conn import connect
from .nats_server import EmbeddedServer
from .provision import provision

P50_TARGET_MS, P99_TARGET_MS, LATENCY_TARGET_AGENTS, TASKS_PER_S_TARGET = 3.0, 10.0, 100, 1000.0
REPO = "bench/app"
SPECIALTIES = ("backend", "frontend", "general")
HEARTBEAT_TIMEOUT = 3600.0  # null agents heartbeat once; none may be declared lost
WAIT_ASSIGNED = 15.0  # seconds one dispatch may take before the bench gives up
# The reviewer merges as soon as it sees task.pr_opened in the log. The coordinator
# handles the merge fact against its read model, which may not have applied that
# pr_opened yet; it then refuses ("cannot task.completed while testing") and acks, and
# the merge is lost (a coordinator race, reported by the bench as merges_resent).
# The reviewer then acts like a forge redelivering the webhook.
MERGE_RESEND, MERGE_ATTEMPTS = 0.5, 20
STEP_TIMEOUT = 60.0  # a paced null agent waits this long for the coordinator's reaction
STALL = 15.0  # the throughput run gives up when no task completed for this long


# -- results -------------------------------------------------------------------------
class Hop(msgspec.Struct, kw_only=True):
    """One step of a task's way through the system, over all tasks of a run."""

    name: str
    p50_ms: float
    p99_ms: float


class CpuUse(msgspec.Struct, kw_only=True):
    """CPU used in a measured window (seconds; -1 where the platform does not say)."""

    seconds: float  # wall time of the window
    coordinator: float
    driver: float  # this process: the driver, observers, null agents and reviewer
    nats_server: float
    machine: float  # every process on the machine, ours and others'
    pressure: float  # fraction of the window in which some runnable task waited for a CPU

    def cores(self, cpu_seconds: float) -> float:
        return cpu_seconds / self.seconds if self.seconds > 0 and cpu_seconds >= 0 else -1.0


class LatencyRun(msgspec.Struct, kw_only=True):
    agents: int
    tasks: int  # measured (after the warm-up)
    warmup: int
    assigned: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    p50_x_raw: float  # p50 / raw round trip p50
    p99_x_raw: float  # p99 / raw round trip p99
    p50_ok: bool
    p99_ok: bool
    hops: list[Hop]
    coordinator: dict
    cpu: CpuUse  # over the measured tasks


class ThroughputRun(msgspec.Struct, kw_only=True):
    agents: int
    capacity: int
    tasks: int
    completed: int
    seconds: float  # first issue published -> last TaskCompleted observed
    publish_seconds: float  # first issue published -> last issue acknowledged
    tasks_per_s: float
    events: int  # everything appended meanwhile: issue facts, task and agent events
    events_per_task: float
    events_per_s: float
    events_x_raw: float  # events/s as a fraction of the raw pipelined publish rate
    merges_resent: int  # merges the coordinator refused on a stale model and got again
    reports_paced: bool  # null agents waited for the coordinator's reaction between reports
    ok: bool
    hops: list[Hop]
    coordinator: dict
    cpu: CpuUse  # first publish -> last completion


class DispatchBench(msgspec.Struct, kw_only=True):
    sync_interval: str
    coordinator_process: bool
    cpus: int
    loadavg: list[float]  # 1-minute load average before and after: other work on the machine
    raw_rtt_p50_ms: float
    raw_rtt_p99_ms: float
    raw_hop_p50_ms: float
    raw_hop_p99_ms: float
    raw_publish_per_s: float
    latency: list[LatencyRun]
    throughput: ThroughputRun | None
    targets: dict
    targets_met: bool
    profiles: list[str] = []


# -- small helpers ---------------------------------------------------------------------
def utcnow() -> datetime:
    return datetime.now(UTC)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def ack_meta(reply: str) -> tuple[int, int]:
    """(stream sequence, server store timestamp in ns) from a JetStream ack subject:
    ``$JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ts>.<pending>`` (or with domain
    and account hash, two tokens more in front)."""
    t = reply.split(".")
    return (int(t[5]), int(t[7])) if len(t) == 9 else (int(t[7]), int(t[9]))


def opened(i: int, tag: str) -> IssueOpened:
    return IssueOpened(
        event_id=f"bench-{tag}:{REPO}#{i}", repo=REPO, number=i, occurred_at=utcnow(),
        title=f"Fix the API endpoint returning 500 for user {i}",
        body="The handler crashes when the user has no profile.", labels=("backend",),
        author="bench",
    )


def _hops(stamps: dict[str, dict[str, int]], hops: Sequence[tuple[str, str, str]]) -> list[Hop]:
    """Per-hop p50/p99 over tasks, from per-task stage timestamps (ns)."""
    out = []
    for a, b, label in hops:
        d = [s[b] - s[a] for s in stamps.values() if a in s and b in s]
        if d:
            out.append(Hop(name=label, p50_ms=ms(pct(d, 50)), p99_ms=ms(pct(d, 99))))
    return out


async def _ordered(js, stream: str, filters: list[str], cb):
    return await js.subscribe(
        "", stream=stream, cb=cb, ordered_consumer=True,
        config=api.ConsumerConfig(filter_subjects=filters, deliver_policy=api.DeliverPolicy.ALL),
        pending_msgs_limit=512 * 1024, pending_bytes_limit=256 * 1024 * 1024,
    )


async def _log_with_times(js, stream: str, filters: list[str]) -> list[tuple[str, int, bytes]]:
    """The whole stream, after a run: (subject, store timestamp ns, data)."""
    last = (await js.stream_info(stream)).state.last_seq
    out: list[tuple[str, int, bytes]] = []
    if not last:
        return out
    done = asyncio.Event()

    async def cb(msg) -> None:
        seq, ts = ack_meta(msg.reply)
        out.append((msg.subject, ts, msg.data))
        if seq >= last:
            done.set()

    sub = await _ordered(js, stream, filters, cb)
    try:
        await asyncio.wait_for(done.wait(), 120)
    finally:
        await sub.unsubscribe()
    return out


async def _stage_stamps(js, ns: Namespace) -> dict[str, dict[str, int]]:
    """task id -> {stage: store timestamp}: issue facts (``issue.<action>``), task events
    (``task.<event>``) and agent reports about the task (``agent.<event>``). The first
    occurrence of a stage counts."""
    stamps: dict[str, dict[str, int]] = {}
    cut = len(ns.prefix) + 1
    for subject, ts, _ in await _log_with_times(js, ns.issues_stream, [f"{ns.prefix}.issue.>"]):
        t = subject.split(".")  # <ns>.issue.<source>.<repo>.<number>.<action>
        stamps.setdefault(f"{t[3]}-{t[4]}", {}).setdefault(f"issue.{t[5]}", ts)
    events = await _log_with_times(js, ns.events_stream, [ns.task_filter(), ns.agent_filter()])
    for subject, ts, data in events:
        t = subject.split(".")
        if t[1] == "task":
            stamps.setdefault(t[2], {}).setdefault(f"task.{t[3]}", ts)
        else:
            event = decode_event(subject[cut:], data)
            tid = getattr(event, "task_id", None)
            if tid is not None:
                assert isinstance(event, AgentEventBase)
                stamps.setdefault(tid, {}).setdefault(event.__struct_config__.tag, ts)
    return stamps


async def _where_stuck(js, ns: Namespace, task_ids: set[str]) -> dict[str, int]:
    """How many of ``task_ids`` stopped after which step (their latest stage)."""
    out: dict[str, int] = {}
    for tid, s in (await _stage_stamps(js, ns)).items():
        if tid in task_ids:
            last = max(s, key=s.__getitem__)
            out[last] = out.get(last, 0) + 1
    return out


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_seconds() -> float | None:
    """CPU time all processes of the machine used so far (busy, not idle or iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_stall_seconds() -> float | None:
    """PSI: total time some runnable task waited for a CPU (``/proc/pressure/cpu``)."""
    try:
        with open("/proc/pressure/cpu", "rb") as f:
            some = f.readline().split()
        return int(some[-1].split(b"=")[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """What each of our processes, and the whole machine, spent in a window (10 ms
    ticks): a shared machine's other load shows up as machine - ours, and as pressure."""

    def __init__(self, coordinator: int | None, nats_server: int | None) -> None:
        self.pids = {"coordinator": coordinator, "driver": os.getpid(), "nats_server": nats_server}
        self.before: dict[str, float | None] = {}

    def _read(self) -> dict[str, float | None]:
        out = {k: cpu_seconds(p) if p else None for k, p in self.pids.items()}
        out["machine"] = machine_cpu_seconds()
        out["stall"] = cpu_stall_seconds()
        out["wall"] = time.perf_counter()
        return out

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> CpuUse:
        now = self._read()

        def d(k: str) -> float:
            a, b = self.before.get(k), now.get(k)
            return round(b - a, 3) if a is not None and b is not None else -1.0

        wall = d("wall")
        stall = d("stall")
        return CpuUse(seconds=wall, coordinator=d("coordinator"), driver=d("driver"),
                      nats_server=d("nats_server"), machine=d("machine"),
                      pressure=round(stall / wall, 3) if stall >= 0 and wall > 0 else -1.0)


async def _stream_last(js, stream: str) -> int:
    return (await js.stream_info(stream)).state.last_seq


# -- baselines -------------------------------------------------------------------------
async def _raw_baselines(nc, js, rtt_samples: int, publish_msgs: int) -> dict:
    await js.add_stream(api.StreamConfig(
        name="RAWBENCH", subjects=["rawbench.>"], storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, num_replicas=1))
    payload = encode(opened(1, "raw"))
    # round trip: one publish at a time, waiting for the ack
    for i in range(min(50, rtt_samples)):
        await js.publish(f"rawbench.warm.{i % 50}", payload)
    rtt = []
    for i in range(rtt_samples):
        t = time.perf_counter_ns()
        await js.publish(f"rawbench.rtt.{i % 100}", payload)
        rtt.append(time.perf_counter_ns() - t)
    # one hop: publish -> stored -> delivered to an ordered push consumer
    waiting: list[asyncio.Future] = []

    async def cb(msg) -> None:
        if waiting:
            waiting.pop().set_result(time.perf_counter_ns())

    sub = await js.subscribe("rawbench.hop.>", stream="RAWBENCH", cb=cb, ordered_consumer=True,
                             deliver_policy=api.DeliverPolicy.NEW)
    loop = asyncio.get_running_loop()
    hop = []
    for i in range(rtt_samples // 2 + 10):
        fut = loop.create_future()
        waiting.append(fut)
        t = time.perf_counter_ns()
        await nc.publish(f"rawbench.hop.{i % 100}", payload)
        done = await asyncio.wait_for(fut, 10)
        if i >= 10:
            hop.append(done - t)
    await sub.unsubscribe()
    # pipelined publishes
    t = time.perf_counter()
    futures = [await js.publish_async(f"rawbench.pub.{i % 100}", payload) for i in range(publish_msgs)]
    await asyncio.gather(*futures)
    rate = publish_msgs / (time.perf_counter() - t)
    await js.delete_stream("RAWBENCH")
    return {"rtt_p50": pct(rtt, 50), "rtt_p99": pct(rtt, 99), "hop_p50": pct(hop, 50),
            "hop_p99": pct(hop, 99), "publish_per_s": rate}


# -- agents ----------------------------------------------------------------------------
async def _register_agents(nc, store: EventStore, ns: Namespace, ids: list[str], capacity: int):
    """Real ``agent.registered`` events (pipelined: independent aggregates), then one
    heartbeat each. Returns ``{agent_id: (state, last_seq)}``."""
    at = utcnow()
    items = []
    for aid in ids:
        events = ag.decide(None, ag.RegisterAgent(at=at, actor=aid, agent_id=aid, specialties=SPECIALTIES,
                                                  capacity=capacity, host="bench", coder="null"))
        items.append((events[0], 0))
    results = await store.append_many(items)
    out = {}
    for (event, _), r in zip(items, results):
        if not isinstance(r, int):
            raise StoreUnavailable(f"registering {event.agent_id}: {r}")
        out[event.agent_id] = (ag.evolve(None, event), r)
    for aid in ids:
        await nc.publish(ns.heartbeat_subject(aid), encode(Heartbeat(agent_id=aid, at=at, seq=1)))
    await nc.flush()
    return out


class Signals:
    """Futures keyed by (what, task id), made by whichever side comes first."""

    def __init__(self) -> None:
        self._futures: dict[tuple[str, str], asyncio.Future] = {}

    def get(self, what: str, task_id: str) -> asyncio.Future:
        fut = self._futures.get((what, task_id))
        if fut is None:
            fut = self._futures[(what, task_id)] = asyncio.get_running_loop().create_future()
        return fut

    def set(self, what: str, task_id: str) -> None:
        fut = self.get(what, task_id)
        if not fut.done():
            fut.set_result(None)


class NullAgent:
    """Writes what a real agent writes to its own aggregate, and does nothing else.

    ``paced_by``: before each report, wait until the log shows the coordinator applied
    the previous one (``task.started`` before the implementation report, ``task.testing``
    before pr_opened), like an agent whose every phase lasts at least one coordinator
    hop. Without it the reports go out back to back, which exposes a coordinator race
    (a report handled before its read model has the coordinator's own previous write is
    refused and acked, and the task is stuck): see ``immediate_reports``."""

    def __init__(self, store: EventStore, agent_id: str, state, last_seq: int,
                 paced_by: Signals | None = None) -> None:
        self.store, self.id = store, agent_id
        self.state, self.last_seq = state, last_seq
        self.paced_by = paced_by
        self.lock = asyncio.Lock()
        self.done = 0

    async def _append(self, command: ag.Command) -> None:
        async with self.lock:
            events = ag.decide(self.state, command)
            seqs = await self.store.append(events, expected_last_seq=self.last_seq)
            for e in events:
                self.state = ag.evolve(self.state, e)
            self.last_seq = seqs[-1]

    async def _after(self, what: str, task_id: str) -> None:
        if self.paced_by is not None:
            try:
                await asyncio.wait_for(self.paced_by.get(what, task_id), STEP_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(f"{self.id}: the coordinator never wrote task.{what} for {task_id}") from None

    async def work(self, task_id: str, attempt: int) -> None:
        me = self.id
        await self._append(ag.StartAgentTask(at=utcnow(), actor=me, task_id=task_id, attempt=attempt))
        await self._after("started", task_id)
        await self._append(ag.ReportWork(
            at=utcnow(), actor=me, task_id=task_id, attempt=attempt, kind="agent.implementation_produced",
            fields={"coder": "null", "files_changed": ["app/handlers.py"], "diff_stat": "1 file changed"}))
        await self._after("testing", task_id)
        await self._append(ag.ReportWork(
            at=utcnow(), actor=me, task_id=task_id, attempt=attempt, kind="agent.pr_opened",
            fields={"branch": f"ccc/task-{task_id}", "tests_passed": 1}))
        await self._append(ag.ReleaseAgentTask(at=utcnow(), actor=me, task_id=task_id, outcome="done",
                                               attempt=attempt))
        self.done += 1


# -- the coordinator, in its own process -------------------------------------------------
class CoordinatorProcess:
    """``python -m infra.bench_dispatch coordinator URL NS [PROFILE]``: prints ``ready``
    once started, stops on a line (or EOF) on stdin, prints its counters as JSON."""

    def __init__(self, url: str, ns: Namespace, log_path: Path, profile_path: Path | None) -> None:
        self.url, self.ns, self.log_path, self.profile_path = url, ns, log_path, profile_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        args = [sys.executable, "-m", "infra.bench_dispatch", "coordinator", self.url, self.ns.prefix]
        if self.profile_path is not None:
            args.append(str(self.profile_path))
        err = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # run from the directory holding this package, so the child imports this very code
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=Path(__file__).resolve().parents[1])
        finally:
            os.close(err)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.kill()
            raise RuntimeError(f"the coordinator process did not start: {self.log_tail()}")

    def log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def stop(self) -> dict:
        proc = self.proc
        if proc is None:
            return {}
        try:
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            proc.stdin.close()
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            await asyncio.wait_for(proc.wait(), 30)
        except (TimeoutError, OSError):
            await self.kill()
            raise RuntimeError(f"the coordinator process did not stop: {self.log_tail()}") from None
        self.proc = None
        try:
            stats = json.loads(line)
        except ValueError:
            raise RuntimeError(f"the coordinator process failed: {self.log_tail()}") from None
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        stats["warnings"] = sum(1 for ln in text.splitlines() if "[warning" in ln or "[error" in ln)
        return stats

    async def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _serve_coordinator(url: str, prefix: str, profile_path: str | None) -> None:
    import logging

    import structlog

    from actors.coordinator import Coordinator, CoordinatorConfig

    level = os.environ.get("CCC_LOG_LEVEL", "warning").upper()  # the CLI's default: warning
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.dev.ConsoleRenderer(colors=False)],
    )
    nc = await connect(url, name="ccc-bench-coordinator")
    coordinator = Coordinator(nc, Namespace(prefix), CoordinatorConfig(heartbeat_timeout=HEARTBEAT_TIMEOUT))
    await coordinator.start()
    profile = cProfile.Profile(time.process_time) if profile_path else None  # CPU, not wall
    if profile is not None:
        profile.enable()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if profile is not None:
        profile.disable()
        profile.dump_stats(profile_path)
    intake, reports = coordinator._loops
    stats = {
        "assignments": coordinator.assignments,
        "intake_handled": intake.handled, "intake_failed": intake.failed,
        "reports_handled": reports.handled, "reports_failed": reports.failed,
        "bad_events": coordinator.model.bad_count,
    }
    await coordinator.stop()
    await nc.close()
    print(json.dumps(stats), flush=True)


# -- the runs --------------------------------------------------------------------------
# (from stage, to stage, label): stages are issue facts (issue.<action>), task events
# (task.<event>), agent reports (agent.<event>) and the driver's own "published" and
# "observed" times. Hops are pairs, not a chain: agents do not wait for the coordinator.
LATENCY_HOPS = (
    ("published", "issue.opened", "publish -> issue stored"),
    ("issue.opened", "task.created", "intake: issue -> task.created"),
    ("task.created", "task.analysis_started", "created -> analysis_started"),
    ("task.analysis_started", "task.analyzed", "analysis_started -> analyzed (queued)"),
    ("task.analyzed", "task.assigned", "scheduling: queued -> assigned"),
    ("task.assigned", "observed", "assigned -> observed"),
)
THROUGHPUT_HOPS = (
    ("published", "issue.opened", "publish -> issue stored"),
    ("issue.opened", "task.created", "intake: issue -> task.created"),
    ("task.created", "task.analyzed", "analysis: created -> queued"),
    ("task.analyzed", "task.assigned", "scheduling: queued -> assigned"),
    ("task.assigned", "agent.task_started", "null agent: assigned -> agent started"),
    ("agent.task_started", "task.started", "reports: agent started -> task.started"),
    ("agent.implementation_produced", "task.testing", "reports: implementation -> task.testing"),
    ("agent.pr_opened", "task.pr_opened", "reports: agent pr_opened -> task.pr_opened"),
    ("task.pr_opened", "issue.pr_merged", "reviewer: task.pr_opened -> merge stored"),
    ("issue.pr_merged", "task.completed", "intake: merge -> task.completed"),
    ("published", "task.completed", "end to end: publish -> task.completed"),
)


async def _latency_run(url: str, nc, js, n_agents: int, tasks: int, warmup: int, raw: dict,
                       workdir: Path, profile_dir: Path | None, server_pid: int | None) -> LatencyRun:
    ns = Namespace(f"lat{n_agents}")
    await provision(nc, ns)
    store = EventStore(nc, ns, timeout=30)
    total = warmup + tasks
    await _register_agents(nc, store, ns, [f"null-{i}" for i in range(n_agents)], capacity=total)
    profile = profile_dir / f"coordinator-latency-{n_agents}.prof" if profile_dir else None
    coordinator = CoordinatorProcess(url, ns, workdir / f"coordinator-{ns.prefix}.log", profile)
    await coordinator.start()
    waiting: dict[str, asyncio.Future] = {}

    async def on_assigned(msg) -> None:
        fut = waiting.pop(msg.subject.split(".")[2], None)
        if fut is not None and not fut.done():
            fut.set_result((time.perf_counter_ns(), time.time_ns()))

    sub = await js.subscribe(f"{ns.prefix}.task.*.assigned.*", stream=ns.events_stream, cb=on_assigned,
                             ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW)
    loop = asyncio.get_running_loop()
    lat: list[int] = []
    stamps: dict[str, dict[str, int]] = {}
    cpu = CpuMeter(coordinator.pid, server_pid)
    try:
        for i in range(1, total + 1):
            if i == warmup + 1:
                cpu.start()
            issue = opened(i, ns.prefix)
            tid = task_id_for(issue.repo, issue.number)
            fut = waiting[tid] = loop.create_future()
            subject, data = ns.subject(issue.rel_subject), encode(issue)
            w0, t0 = time.time_ns(), time.perf_counter_ns()
            await js.publish(subject, data, headers={"Nats-Msg-Id": issue.event_id})
            try:
                t1, w1 = await asyncio.wait_for(fut, WAIT_ASSIGNED)
            except TimeoutError:
                raise RuntimeError(f"{tid} was not assigned within {WAIT_ASSIGNED}s "
                                   f"({n_agents} agents); coordinator: {coordinator.log_tail()}") from None
            if i > warmup:
                lat.append(t1 - t0)
                stamps[tid] = {"published": w0, "observed": w1}
        used = cpu.stop()
        stats = await coordinator.stop()
    finally:
        await sub.unsubscribe()
        await coordinator.kill()
    for tid, s in (await _stage_stamps(js, ns)).items():
        if tid in stamps:
            stamps[tid].update(s)
    p50, p99 = ms(pct(lat, 50)), ms(pct(lat, 99))
    return LatencyRun(
        agents=n_agents, tasks=tasks, warmup=warmup, assigned=len(lat), p50_ms=p50, p99_ms=p99,
        mean_ms=ms(statistics.fmean(lat)), max_ms=ms(max(lat)),
        p50_x_raw=round(p50 / ms(raw["rtt_p50"]), 2), p99_x_raw=round(p99 / ms(raw["rtt_p99"]), 2),
        p50_ok=p50 <= P50_TARGET_MS, p99_ok=p99 <= P99_TARGET_MS,
        hops=_hops(stamps, LATENCY_HOPS), coordinator=stats,
        cpu=used,
    )


async def _throughput_run(url: str, nc, js, n_agents: int, tasks: int, raw: dict, workdir: Path,
                          profile_dir: Path | None, server_pid: int | None,
                          immediate_reports: bool) -> ThroughputRun:
    ns = Namespace("thr")
    await provision(nc, ns)
    # the null agents get their own connection, like separate processes would
    anc = await connect(url, name="ccc-bench-null-agents")
    subs: list = []
    work: set[asyncio.Task] = set()
    coordinator: CoordinatorProcess | None = None
    try:
        ajs = anc.jetstream(timeout=30)
        astore = EventStore(anc, ns, timeout=30)
        registered = await _register_agents(anc, astore, ns, [f"null-{i}" for i in range(n_agents)],
                                            capacity=tasks)
        pacing = None if immediate_reports else Signals()
        agents = {aid: NullAgent(astore, aid, state, seq, pacing) for aid, (state, seq) in registered.items()}
        profile = profile_dir / f"coordinator-throughput-{n_agents}.prof" if profile_dir else None
        coordinator = CoordinatorProcess(url, ns, workdir / f"coordinator-{ns.prefix}.log", profile)
        await coordinator.start()
        events_before = await _stream_last(js, ns.events_stream) + await _stream_last(js, ns.issues_stream)

        failures: list[BaseException] = []
        progress = asyncio.Event()  # a task completed, or something failed
        completed: set[str] = set()
        last_completed = [0]
        reviewed = Signals()
        resent = [0]

        def track(task: asyncio.Task) -> None:
            work.add(task)

            def done(t: asyncio.Task) -> None:
                work.discard(t)
                if not t.cancelled() and t.exception() is not None:
                    failures.append(t.exception())
                    progress.set()
            task.add_done_callback(done)

        cut = len(ns.prefix) + 1

        async def on_assigned(msg) -> None:  # the null agent pool
            event = decode_event(msg.subject[cut:], msg.data)
            track(asyncio.create_task(agents[event.agent_id].work(event.task_id, event.attempt)))

        async def on_task_step(msg) -> None:  # what paced null agents wait for
            t = msg.subject.split(".")
            pacing.set(t[3], t[2])

        async def merge(tid: str) -> None:
            """Publish the merge; if the task has not completed after MERGE_RESEND seconds,
            publish it again as a new forge delivery (see MERGE_RESEND)."""
            number = int(tid.rsplit("-", 1)[1])
            done = reviewed.get("completed", tid)
            for k in range(MERGE_ATTEMPTS):
                event = IssuePullRequestMerged(event_id=f"merge:{tid}:{k}", repo=REPO, number=number,
                                               occurred_at=utcnow(), branch=f"ccc/task-{tid}", actor="bench")
                await js.publish(ns.subject(event.rel_subject), encode(event), headers={"Nats-Msg-Id": event.event_id})
                try:
                    await asyncio.wait_for(asyncio.shield(done), MERGE_RESEND)
                    return
                except TimeoutError:
                    resent[0] += 1

        async def on_reviewer_step(msg) -> None:  # the reviewer: merge as soon as the task is in review
            t = msg.subject.split(".")
            if t[3] == "pr_opened":
                track(asyncio.create_task(merge(t[2])))
                return
            completed.add(t[2])
            reviewed.set("completed", t[2])
            last_completed[0] = time.perf_counter_ns()
            progress.set()

        p = ns.prefix
        subs += [
            await ajs.subscribe(f"{p}.task.*.assigned.*", stream=ns.events_stream, cb=on_assigned,
                                ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW),
            await _ordered(js, ns.events_stream, [f"{p}.task.*.pr_opened", f"{p}.task.*.completed"],
                           on_reviewer_step),
        ]
        if pacing is not None:
            subs.append(await _ordered(ajs, ns.events_stream, [f"{p}.task.*.started", f"{p}.task.*.testing"],
                                       on_task_step))
        issues = [opened(i, ns.prefix) for i in range(1, tasks + 1)]
        payloads = [(ns.subject(e.rel_subject), encode(e), {"Nats-Msg-Id": e.event_id}) for e in issues]
        published: dict[str, int] = {}
        cpu = CpuMeter(coordinator.pid, server_pid)
        cpu.start()
        w0, t0 = time.time_ns(), time.perf_counter_ns()
        futures = [await js.publish_async(s, d, headers=h) for s, d, h in payloads]
        await asyncio.gather(*futures)
        t_published = time.perf_counter_ns()
        published = {task_id_for(e.repo, e.number): w0 for e in issues}
        while len(completed) < tasks and not failures:
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), STALL)
            except TimeoutError:
                break  # stalled
        used = cpu.stop()
        if len(completed) < tasks:
            stuck = await _where_stuck(js, ns, set(published) - completed)
            cause = f"; first failure: {failures[0]}" if failures else f"; no progress for {STALL:g}s"
            raise RuntimeError(f"only {len(completed)}/{tasks} tasks completed{cause}; the others' "
                               f"last step: {stuck}; coordinator log: {coordinator.log_tail()}")
        seconds = (last_completed[0] - t0) / 1e9
        stats = await coordinator.stop()
    finally:
        for s in subs:
            await s.unsubscribe()
        if coordinator is not None:
            await coordinator.kill()
        for t in list(work):
            t.cancel()
        await anc.close()
    events = await _stream_last(js, ns.events_stream) + await _stream_last(js, ns.issues_stream) - events_before
    stamps = await _stage_stamps(js, ns)
    for tid, s in stamps.items():
        if tid in published:
            s["published"] = published[tid]
    rate = tasks / seconds
    return ThroughputRun(
        agents=n_agents, capacity=tasks, tasks=tasks, completed=len(completed), seconds=round(seconds, 3),
        publish_seconds=round((t_published - t0) / 1e9, 3), tasks_per_s=round(rate, 1), events=events,
        events_per_task=round(events / tasks, 2), events_per_s=round(events / seconds),
        events_x_raw=round(events / seconds / raw["publish_per_s"], 3), merges_resent=resent[0],
        reports_paced=not immediate_reports, ok=rate >= TASKS_PER_S_TARGET,
        hops=_hops(stamps, THROUGHPUT_HOPS), coordinator=stats, cpu=used,
    )


async def run_dispatch_bench(
    agent_counts: Sequence[int] = (10, 100, 1000),
    tasks: int = 200,
    throughput_tasks: int = 1000,
    sync_interval: str = "always",
    progress: Callable[[int, int], None] | None = None,
    *,
    throughput_agents: int = 10,
    warmup: int | None = None,
    rtt_samples: int = 1000,
    publish_msgs: int = 10000,
    profile_dir: str | Path | None = None,
    immediate_reports: bool = False,
) -> DispatchBench:
    """One throwaway embedded server; baselines, then a latency run per agent count
    (each with a fresh namespace and coordinator), then the throughput run (skipped
    when ``throughput_tasks`` is 0)."""
    warmup = min(10, max(1, tasks // 10)) if warmup is None else warmup
    steps = 1 + len(agent_counts) + (1 if throughput_tasks else 0)
    step = 0

    def advance() -> None:
        nonlocal step
        step += 1
        if progress:
            progress(step, steps)

    load_before = _loadavg()
    pdir = Path(profile_dir).resolve() if profile_dir else None
    if pdir is not None:
        pdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ccc-bench-dispatch-") as tmp:
        workdir = Path(tmp)
        server = EmbeddedServer(workdir / "nats", sync_interval=sync_interval)
        url = server.start()
        server_pid = server.proc.pid if server.proc is not None else None
        try:
            nc = await connect(url, name="ccc-bench")
            js = nc.jetstream(timeout=30)
            try:
                raw = await _raw_baselines(nc, js, rtt_samples, publish_msgs)
                advance()
                latency = []
                for n in agent_counts:
                    latency.append(await _latency_run(url, nc, js, n, tasks, warmup, raw, workdir, pdir,
                                                      server_pid))
                    advance()
                throughput = None
                if throughput_tasks:
                    throughput = await _throughput_run(url, nc, js, throughput_agents, throughput_tasks, raw,
                                                       workdir, pdir, server_pid, immediate_reports)
                    advance()
            finally:
                await nc.close()
        finally:
            server.stop()
    profiles = sorted(str(p) for p in pdir.glob("coordinator-*.prof")) if pdir else []
    met = all(r.p50_ok and r.p99_ok for r in latency) and (throughput is None or throughput.ok)
    return DispatchBench(
        sync_interval=sync_interval, coordinator_process=True, cpus=os.cpu_count() or 0,
        loadavg=[load_before, _loadavg()],
        raw_rtt_p50_ms=ms(raw["rtt_p50"]), raw_rtt_p99_ms=ms(raw["rtt_p99"]),
        raw_hop_p50_ms=ms(raw["hop_p50"]), raw_hop_p99_ms=ms(raw["hop_p99"]),
        raw_publish_per_s=round(raw["publish_per_s"]), latency=latency, throughput=throughput,
        targets={"p50_ms": P50_TARGET_MS, "p99_ms": P99_TARGET_MS, "latency_agents": LATENCY_TARGET_AGENTS,
                 "tasks_per_s": TASKS_PER_S_TARGET},
        targets_met=met, profiles=profiles,
    )


def rows(result: DispatchBench) -> list[tuple[str, str, str, str, str, str]]:
    """The table: metric, value, baseline, ratio, target, ok."""
    out = []
    rtt50, rtt99 = result.raw_rtt_p50_ms, result.raw_rtt_p99_ms
    for r in result.latency:
        out.append((f"dispatch p50, {r.agents} agents", f"{r.p50_ms:.2f} ms", f"{rtt50:.2f} ms raw rtt p50",
                    f"{r.p50_x_raw:.1f}x", f"<= {P50_TARGET_MS:g} ms", "ok" if r.p50_ok else "MISSED"))
        out.append((f"dispatch p99, {r.agents} agents", f"{r.p99_ms:.2f} ms", f"{rtt99:.2f} ms raw rtt p99",
                    f"{r.p99_x_raw:.1f}x", f"<= {P99_TARGET_MS:g} ms", "ok" if r.p99_ok else "MISSED"))
    t = result.throughput
    if t is not None:
        out.append((f"throughput, {t.agents} null agents", f"{t.tasks_per_s:,.0f} tasks/s", "-", "-",
                    f">= {TASKS_PER_S_TARGET:,.0f}/s", "ok" if t.ok else "MISSED"))
        out.append(("throughput, events", f"{t.events_per_s:,.0f} ev/s",
                    f"{result.raw_publish_per_s:,.0f}/s raw pipelined", f"{t.events_x_raw:.3f}", "-", "-"))
    return out


def footer(result: DispatchBench) -> list[str]:
    lines = [
        (f"sync_interval {result.sync_interval}; coordinator in its own process; {result.cpus} cpus "
         f"(load {result.loadavg[0]:.1f} -> {result.loadavg[1]:.1f}); "
         f"raw round trip p50 {result.raw_rtt_p50_ms:.3f} / p99 {result.raw_rtt_p99_ms:.3f} ms, "
         f"raw hop (publish->delivery) p50 {result.raw_hop_p50_ms:.3f} / p99 {result.raw_hop_p99_ms:.3f} ms"),
    ]
    for r in result.latency:
        hops = ", ".join(f"{h.name} {h.p50_ms:.2f}" for h in r.hops)
        lines.append(f"hops p50 ms, {r.agents} agents ({r.tasks} tasks): {hops}")
        c, n = r.cpu, max(1, r.tasks)
        lines.append(f"  cpu ms per dispatch: coordinator {c.coordinator * 1000 / n:.2f}, "
                     f"nats-server {c.nats_server * 1000 / n:.2f}, driver {c.driver * 1000 / n:.2f}; "
                     f"machine busy {c.cores(c.machine):.2f} cores, cpu pressure {c.pressure:.0%}")
    t = result.throughput
    if t is not None:
        lines.append(f"throughput: {t.tasks} tasks, {t.events} events ({t.events_per_task}/task) in "
                     f"{t.seconds:.2f} s (issues published in {t.publish_seconds:.2f} s)")
        hops = ", ".join(f"{h.name} {h.p50_ms:.1f}" for h in t.hops)
        lines.append(f"throughput hops p50 ms: {hops}")
        c = t.cpu
        lines.append(f"  cores busy: coordinator {c.cores(c.coordinator):.2f}, nats-server "
                     f"{c.cores(c.nats_server):.2f}, driver+null agents {c.cores(c.driver):.2f}, whole machine "
                     f"{c.cores(c.machine):.2f}; cpu pressure {c.pressure:.0%}")
        lines.append(f"  merges resent {t.merges_resent}; "
                     f"null agents' reports {'paced by the coordinator' if t.reports_paced else 'back to back'}")
    if result.profiles:
        lines.append("coordinator profiles (figures inflated by profiling): " + " ".join(result.profiles))
    return lines


if __name__ == "__main__":  # the coordinator process of the bench
    if len(sys.argv) >= 4 and sys.argv[1] == "coordinator":
        asyncio.run(_serve_coordinator(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None))
    else:
        sys.exit("usage: python -m infra.bench_dispatch coordinator URL NAMESPACE [PROFILE]")
