"""``ccc bench fleet``: a thousand agents — and past it — on one machine.

Two runs, each read against a baseline measured in the same run:

* **fleet** (:func:`run_fleet`): N real agents start on a throwaway nats-server — the
  agents ``ccc up`` builds (:func:`infra.shell.app.cluster.build_agent`: git workspaces
  in the bubblewrap sandbox, the scripted coder, the local forge, an artifact bucket of
  their own), hosted in this process as ``ccc up`` hosts them, sharing a few connections
  (each is still its own consumer, subscriptions, heartbeat and aggregate; with security
  on each would be its own user, see ``tests/integration/test_security.py``) — beside the
  real coordinator in its own process, with ``ccc up``'s heartbeat timeout. Then a batch
  of issues is published at once, so that many tasks run concurrently; a reviewer merges
  each pull request as it opens (one merge at a time, as ``ccc pr merge`` does), every
  task must complete, and the log is judged by the chaos suite's invariants
  (:func:`infra.shell.chaos.checks.check_log`: nothing lost, duplicated or illegal).
  Reported: how long the agents took to start, the consumers they hold on
  ``<NS>_EVENTS`` (one each), the memory an agent costs (this process's resident set
  and nats-server's, before and after the agents start), how long the batch took, and
  how many agents the coordinator declared lost (none may be: the grace period starts at
  each agent's registration).

* **heartbeats** (:func:`run_heartbeats`): H agents heartbeat every 2 s, each on its own
  schedule, exactly what real agents send (subject, payload, ``Nats-TTL``), and are
  registered in the log, so the coordinator watches them all. Over a window, the CPU time
  of the coordinator process (the real one, otherwise idle) is set beside that of a bare
  nats-py receiver of the same heartbeats (a plain subscription that only counts them)
  running at the same time: what hearing every heartbeat at all costs. Then K agents stop
  at once, and each one's silence when the coordinator declared it offline is set beside
  the timeout.

CPU is each process's own ``getrusage`` (user + system, every thread), read at the
window's start and end; other work on the machine shows as the machine's load, reported
beside. Read the ratio, not the absolute figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client

from actors.health import TTL_HEADER, format_ttl, heartbeat_ttl
from events import agent_state as ag
from events.agent import AgentWentOffline, Heartbeat
from events.codec import decode_event, encode
from events.issue import IssueOpened, IssuePullRequestMerged
from events.store import EventStore
from events.subjects import Namespace, task_id_for
from events.task import TaskPullRequestOpened
from events.trust import OPERATOR
from infra.adapters.nats.connection import connect
from infra.adapters.nats.provisioning import provision, provision_agent
from infra.shell.bench.bus import BenchBus
from infra.shell.bench.child import Child
from infra.shell.bench.probes import cpu_seconds, loadavg, utcnow

REPO = "acme/fleet"
MODULE = "infra.shell.bench.fleet"  # its helper processes: python -m MODULE <role> ...
TIMEOUT = 10.0  # the coordinator's heartbeat timeout: `ccc up`'s default
INTERVAL = 2.0  # how often an agent heartbeats: `ccc up`'s default
START_CONCURRENCY = 64  # agents starting at once
PROVISION_CONCURRENCY = 16  # artifact buckets created at once (an admin step)
LOSS_MARGIN = 2.0  # a mass loss must be declared within the timeout plus this
BATCH_TIMEOUT = 900.0  # seconds the batch of tasks may take
STALL = 120.0  # ... and with no pull request opened for this long, it is stuck
IDLE_WINDOW = 10.0  # seconds the started fleet is watched idle (what idle agents cost)
SPECIALTIES = ("backend", "general")
OTHER_CONSUMERS = 5  # on the events stream besides the agents': the coordinator's (its reports, its live model)

CALC = "def add(a, b):\n    return a - b\n"
TEST = ("import unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
FIXED = "def add(a, b):\n    return a + b\n"


def fix(number: int) -> dict:
    """Issue ``number``'s recorded session: calc.py written whole (the same bytes on every
    branch, so the pull requests merge in any order, also on a main that already has the
    fix) and a note of its own (every branch has a change)."""
    return {"attempts": [{"summary": f"fix add ({number})", "steps": [
        {"write": {"path": "calc.py", "content": FIXED}},
        {"write": {"path": f"changes/{number}.md", "content": f"add fixed for issue {number}\n"}}]}]}


# -- results -------------------------------------------------------------------------
class FleetRun(msgspec.Struct, kw_only=True):
    agents: int
    connections: int
    tasks: int
    provision_s: float  # every agent's artifact bucket created (an admin step, before the start)
    start_s: float  # every agent started: registered, heartbeating, consuming
    start_per_s: float
    events_consumers: int  # consumers on <NS>_EVENTS with every agent started (and the coordinator's)
    consumers_per_agent: float
    # resident memory before anything of the agents exists and with all started: this
    # process (it hosts the agents, their connections and objects, as `ccc up` does) and
    # nats-server (each agent's durable, subscriptions, aggregate and artifact bucket)
    rss_before_mb: float
    rss_after_mb: float
    rss_per_agent_kb: float
    server_rss_before_mb: float
    server_rss_after_mb: float
    server_rss_per_agent_kb: float
    # CPU with every agent started and idle (heartbeating, waiting for work), in % of a
    # core: this process (the agents), nats-server, the coordinator
    idle_agents_core_pct: float
    idle_server_core_pct: float
    idle_coordinator_core_pct: float
    # the worst lateness of this process's event loop (where every agent's heartbeat is
    # timed): while the agents started, idle, and during the batch
    loop_lag_start_s: float
    loop_lag_idle_s: float
    loop_lag_batch_s: float
    batch_s: float  # the batch published -> the last task completed
    pr_up: int
    completed: int  # tasks completed (their pull request merged by the bench's reviewer)
    merge_errors: list[str]
    final_states: dict[str, int]
    lost: int
    duplicated: int
    illegal: int
    violations: list[str]
    declared_lost: int  # agents the coordinator declared lost (heartbeat_timeout) during the run
    ok: bool


class HeartbeatRun(msgspec.Struct, kw_only=True):
    agents: int
    interval_s: float
    ttl: str  # the Nats-TTL each heartbeat carried ("" without: a stream from before them)
    window_s: float
    heartbeats: int  # received by the bare receiver in the window
    coordinator_cpu_s: float
    receiver_cpu_s: float
    coordinator_core_pct: float
    receiver_core_pct: float
    ratio: float  # coordinator / bare receiver
    coordinator: dict  # its health monitor's counters (polls, direct gets)
    timeout_s: float
    lose: int
    declared: int  # of the stopped agents, declared offline by the coordinator
    silence_min_s: float  # each stopped agent's silence (since its last heartbeat) when declared
    silence_p50_s: float
    silence_max_s: float
    loss_ok: bool  # all declared, none before the timeout, all within timeout + LOSS_MARGIN
    ok: bool  # loss_ok and the coordinator under 2 % of a core


class FleetBench(msgspec.Struct, kw_only=True):
    fleet: FleetRun | None = None
    heartbeats: HeartbeatRun | None = None
    sync_interval: str = "always"
    cpus: int = 0
    loadavg_before: float = 0.0
    loadavg_after: float = 0.0


# -- small probes ----------------------------------------------------------------------
def rss_kb(pid: int | None = None) -> int:
    """Resident set size (kB) of a process (default: this one), from ``/proc``."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def own_cpu() -> float:
    """This process's CPU time so far (user + system, every thread), µs resolution."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LagProbe:
    """How late this process's event loop runs a timer (the agents' heartbeats ride on it):
    the worst lateness since the last :meth:`take`."""

    TICK = 0.05

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.TICK)
            self.worst = max(self.worst, loop.time() - t - self.TICK)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return round(worst, 3)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


def fleet_ids(n: int, tag: str = "fleet") -> list[str]:
    return [f"{tag}-{i:05d}" for i in range(1, n + 1)]


def issue(number: int) -> IssueOpened:
    return IssueOpened(
        event_id=f"fleet:{REPO}#{number}", repo=REPO, number=number, occurred_at=utcnow(),
        # (no file named: issues naming the same file wait for each other's pull request)
        title=f"The add function subtracts ({number})", body="add(2, 3) should be 5", labels=("backend",),
        author="bench", author_association=OPERATOR)


def repo_files(tasks: int) -> dict[str, str]:
    """The batch's repository: a bug, its test, and a recorded session per issue."""
    files = {"calc.py": CALC, "tests/test_calc.py": TEST,
             ".ccc/test-command": "python -m unittest discover -s tests -v\n"}
    files.update({f".ccc/scripts/{n}.json": json.dumps(fix(n)) for n in range(1, tasks + 1)})
    return files


# -- processes of their own: the coordinator and the bare receiver --------------------------
async def _serve(stats: Callable[[], dict], stop: Callable[[], object]) -> None:
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line in ("stop", ""):
            await stop()
            print(json.dumps({"cpu": own_cpu(), **stats()}), flush=True)
            return
        print(json.dumps({"cpu": own_cpu(), **stats()}), flush=True)


async def _coordinator_main(url: str, prefix: str, timeout: float) -> None:
    import logging

    import structlog

    from actors.coordinator import CoordinatorConfig
    from infra.shell.app.cluster import build_coordinator  # the coordinator `ccc up` runs

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    nc = await connect(url, name="ccc-bench-fleet-coordinator")
    coordinator = build_coordinator(nc, Namespace(prefix), CoordinatorConfig(heartbeat_timeout=timeout))
    await coordinator.start()
    health = coordinator.health

    async def stop() -> None:
        await coordinator.stop()
        await nc.close()

    await _serve(lambda: {"assignments": coordinator.assignments, "polls": getattr(health, "polls", None),
                          "fetches": getattr(health, "fetches", None)}, stop)


async def _receiver_main(url: str, subject: str) -> None:
    import nats

    nc = await nats.connect(url, name="ccc-bench-fleet-receiver")
    received = 0

    async def cb(msg) -> None:
        nonlocal received
        received += 1

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    await _serve(lambda: {"received": received}, nc.close)


# -- heartbeats ---------------------------------------------------------------------------
class Heartbeats:
    """Agents that only heartbeat: each on its own schedule (a random phase), on a few
    shared connections, with the header real agents send."""

    def __init__(self, ncs: list[Client], ns: Namespace, ids: list[str], interval: float,
                 headers: dict[str, str] | None) -> None:
        self.ncs, self.ns, self.ids, self.interval, self.headers = ncs, ns, ids, interval, headers
        self.last_sent: dict[str, float] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def start(self) -> None:
        for i, aid in enumerate(self.ids):
            nc = self.ncs[i % len(self.ncs)]
            self.tasks[aid] = asyncio.create_task(self._beat(nc, aid, random.uniform(0, self.interval)))

    async def _beat(self, nc: Client, aid: str, phase: float) -> None:
        await asyncio.sleep(phase)
        subject, seq = self.ns.heartbeat_subject(aid), 0
        while True:
            seq += 1
            hb = Heartbeat(agent_id=aid, at=utcnow(), seq=seq)
            await nc.publish(subject, encode(hb), headers=self.headers)
            self.last_sent[aid] = time.monotonic()
            await asyncio.sleep(self.interval)

    async def stop(self, ids: list[str] | None = None) -> None:
        chosen = [self.tasks.pop(a) for a in (ids if ids is not None else list(self.tasks))]
        for t in chosen:
            t.cancel()
        await asyncio.gather(*chosen, return_exceptions=True)


async def register(store: EventStore, ids: list[str]) -> None:
    """Each agent's real ``agent.registered`` event (what an agent appends at its start)."""
    slots = asyncio.Semaphore(64)

    async def one(aid: str) -> None:
        async with slots:
            events = ag.decide(None, ag.RegisterAgent(at=utcnow(), actor=aid, agent_id=aid, specialties=SPECIALTIES,
                                                      host="bench", coder="null"))
            await store.append(events, expected_last_seq=0)

    await asyncio.gather(*(one(a) for a in ids))


async def run_heartbeats(*, agents: int = 1000, window: float = 60.0, lose: int = 200, timeout: float = TIMEOUT,
                         interval: float = INTERVAL, sync_interval: str = "always", workdir: Path | None = None,
                         progress: Callable[[str], None] = lambda s: None) -> HeartbeatRun:
    if not 0 <= lose <= agents:
        raise ValueError(f"--lose must be between 0 and the agents ({agents}), not {lose}")
    if interval >= timeout:
        raise ValueError(f"the interval ({interval}s) must be shorter than the timeout ({timeout}s)")
    root = Path(tempfile.mkdtemp(prefix="ccc-fleet-hb-", dir=workdir))
    bus = BenchBus(root, "off", sync_interval)
    ns = Namespace("fleet")
    children: list[Child] = []
    beats: Heartbeats | None = None
    try:
        url = bus.start()
        admin = await connect(url, name="ccc-bench-fleet")
        ncs: list[Client] = []
        try:
            await provision(admin, ns)
            ids = fleet_ids(agents, "hb")
            progress(f"registering {agents} agents")
            await register(EventStore(admin, ns, timeout=30), ids)
            js = admin.jetstream()
            ttl_allowed = bool((await js.stream_info(ns.heartbeats_stream)).config.allow_msg_ttl)
            ttl = format_ttl(heartbeat_ttl(interval)) if ttl_allowed else ""
            coordinator = Child(MODULE, ["coordinator", url, ns.prefix, str(timeout)], root / "coordinator.log")
            receiver = Child(MODULE, ["receiver", url, f"{ns.prefix}.hb.*"], root / "receiver.log")
            children += [coordinator, receiver]
            await coordinator.start()
            await receiver.start()
            offline: dict[str, float] = {}

            async def on_offline(msg) -> None:
                aid = msg.subject.split(".")[-2]
                offline.setdefault(aid, time.monotonic())

            await admin.subscribe(f"{ns.prefix}.agent.*.offline", cb=on_offline)
            ncs = [await connect(url, name=f"ccc-bench-fleet-hb-{i}") for i in range(max(1, agents // 250))]
            beats = Heartbeats(ncs, ns, ids, interval, {TTL_HEADER: ttl} if ttl else None)
            beats.start()
            # warm-up: every agent heartbeating, the monitor has learnt each one's TTL
            await asyncio.sleep(max(5.0, 2 * interval + 2))
            progress(f"measuring {window:g} s of heartbeats")
            c0, r0 = await coordinator.ask("stats"), await receiver.ask("stats")
            t0 = time.perf_counter()
            await asyncio.sleep(window)
            c1, r1 = await coordinator.ask("stats"), await receiver.ask("stats")
            elapsed = time.perf_counter() - t0
            early = sorted(offline)  # declared during the window: wrongly (all were heartbeating)
            progress(f"stopping {lose} agents at once")
            doomed = ids[:lose]
            await beats.stop(doomed)
            stopped_at = time.monotonic()
            deadline = stopped_at + timeout + LOSS_MARGIN + 10.0
            while time.monotonic() < deadline and not all(a in offline for a in doomed):
                await asyncio.sleep(0.1)
            silences = [offline[a] - beats.last_sent[a] for a in doomed if a in offline]
            wrongly = [a for a in offline if a not in doomed]
            await beats.stop()
            stats = await coordinator.stop()
            await receiver.stop()
        finally:
            if beats is not None:
                await beats.stop()
            for nc in ncs:
                with contextlib.suppress(Exception):
                    await nc.close()
            await admin.close()
    finally:
        for child in children:
            await child.kill()
        bus.stop()
        shutil.rmtree(root, ignore_errors=True)
    c_cpu, r_cpu = c1["cpu"] - c0["cpu"], r1["cpu"] - r0["cpu"]
    declared = len(silences)
    loss_ok = (declared == lose and not wrongly and not early
               and all(timeout <= s <= timeout + LOSS_MARGIN for s in silences))
    core_pct = round(100 * c_cpu / elapsed, 2)
    return HeartbeatRun(
        agents=agents, interval_s=interval, ttl=ttl, window_s=round(elapsed, 1),
        heartbeats=r1["received"] - r0["received"], coordinator_cpu_s=round(c_cpu, 3),
        receiver_cpu_s=round(r_cpu, 3), coordinator_core_pct=core_pct,
        receiver_core_pct=round(100 * r_cpu / elapsed, 2), ratio=round(c_cpu / r_cpu, 3) if r_cpu > 0 else -1.0,
        coordinator={k: stats.get(k) for k in ("polls", "fetches")}, timeout_s=timeout, lose=lose,
        declared=declared, silence_min_s=round(min(silences), 2) if silences else -1.0,
        silence_p50_s=round(statistics.median(silences), 2) if silences else -1.0,
        silence_max_s=round(max(silences), 2) if silences else -1.0, loss_ok=loss_ok,
        ok=loss_ok and core_pct < 2.0)


# -- the fleet ------------------------------------------------------------------------------
async def run_fleet(*, agents: int = 1000, tasks: int = 100, connections: int = 20, timeout: float = TIMEOUT,
                    sync_interval: str = "always", workdir: Path | None = None,
                    progress: Callable[[str], None] = lambda s: None) -> FleetRun:
    """``connections``: the agents share that many connections (0: one each, as ``ccc up``
    gives them)."""
    from infra.adapters.coders.scripted import ScriptedCoder
    from infra.adapters.forge.local import LocalForge, LocalForgeClient
    from infra.shell.app.cluster import build_agent  # the agent `ccc up` runs
    from infra.shell.chaos.checks import check_log, read_log

    if agents < 1 or tasks < 0 or connections < 0:
        raise ValueError("--agents must be >= 1, --tasks and --connections >= 0")
    root = Path(tempfile.mkdtemp(prefix="ccc-fleet-", dir=workdir))
    bus = BenchBus(root, "off", sync_interval)
    ns = Namespace("fleet")
    coordinator: Child | None = None
    fleet: list = []
    ncs: list[Client] = []
    lag = LagProbe()
    try:
        url = bus.start()
        server_pid = bus.server_pid
        admin = await connect(url, name="ccc-bench-fleet")
        try:
            await provision(admin, ns)
            forge = LocalForge(root / "forge")
            forge.create_repo(REPO, repo_files(tasks))
            coordinator = Child(MODULE, ["coordinator", url, ns.prefix, str(timeout)], root / "coordinator.log")
            await coordinator.start()
            ids = fleet_ids(agents)
            gc.collect()
            rss0, srss0 = rss_kb(), rss_kb(server_pid)  # before anything of the agents exists
            progress(f"creating {agents} artifact buckets")
            t = time.perf_counter()
            slots = asyncio.Semaphore(PROVISION_CONCURRENCY)

            async def bucket(aid: str) -> None:
                async with slots:
                    await provision_agent(admin, ns, aid)

            await asyncio.gather(*(bucket(a) for a in ids))
            provision_s = time.perf_counter() - t
            n_conns = connections or agents
            for i in range(min(n_conns, agents)):
                ncs.append(await connect(url, name=f"ccc-bench-fleet-{i}"))
            progress(f"starting {agents} agents on {len(ncs)} connections")
            coder, client = ScriptedCoder(None), LocalForgeClient(forge.root)
            fleet = [build_agent(ncs[i % len(ncs)], ns, agent_id=aid, specialties=SPECIALTIES, coder=coder,
                                 forge=client, workspace_root=root / "ws", heartbeat_interval=INTERVAL,
                                 shutdown_grace=1.0, test_timeout=120.0) for i, aid in enumerate(ids)]
            t = time.perf_counter()
            lag.start()
            start_slots = asyncio.Semaphore(START_CONCURRENCY)

            async def start(agent) -> None:
                async with start_slots:
                    await agent.start()

            await asyncio.gather(*(start(a) for a in fleet))
            start_s = time.perf_counter() - t
            lag_start = lag.take()
            gc.collect()
            rss1, srss1 = rss_kb(), rss_kb(server_pid)
            progress(f"watching {agents} idle agents for {IDLE_WINDOW:g} s")
            c0, a0, s0, t0 = await coordinator.ask("stats"), own_cpu(), cpu_seconds(server_pid), time.perf_counter()
            await asyncio.sleep(IDLE_WINDOW)
            c1, a1, s1 = await coordinator.ask("stats"), own_cpu(), cpu_seconds(server_pid)
            idle = time.perf_counter() - t0
            lag_idle = lag.take()
            idle_pct = {"agents": 100 * (a1 - a0) / idle, "coordinator": 100 * (c1["cpu"] - c0["cpu"]) / idle,
                        "server": 100 * (s1 - s0) / idle if s0 is not None and s1 is not None else -1.0}
            js = admin.jetstream(timeout=10)
            consumers = (await js.stream_info(ns.events_stream)).state.consumer_count
            pr_up: set[str] = set()
            completed: set[str] = set()
            merge_errors: list[str] = []
            merging: set[asyncio.Task] = set()
            one_merge = asyncio.Lock()  # one at a time, as a reviewer works (a merge moves main)

            async def merge(event: TaskPullRequestOpened) -> None:
                """The reviewer: merge the pull request on the forge (as ``ccc pr merge``
                does) and publish the forge's fact, so the task completes."""
                number = int(event.task_id.rsplit("-", 1)[1])
                try:
                    async with one_merge:
                        await asyncio.to_thread(forge.merge, REPO, event.branch, message=f"Merge {event.branch}")
                    fact = IssuePullRequestMerged(
                        event_id=f"fleet:{REPO}#{number}:merged", repo=REPO, number=number, occurred_at=utcnow(),
                        pr_number=event.pr_number, branch=event.branch)
                    await js.publish(ns.subject(fact.rel_subject), encode(fact), headers={"Nats-Msg-Id": fact.event_id})
                except Exception as e:  # noqa: BLE001 - reported: the task then never completes
                    merge_errors.append(f"{event.task_id}: {type(e).__name__}: {e}")

            async def on_pr(msg) -> None:
                event = decode_event(ns.rel(msg.subject), msg.data)
                assert isinstance(event, TaskPullRequestOpened)
                if event.task_id not in pr_up:
                    pr_up.add(event.task_id)
                    work = asyncio.create_task(merge(event))
                    merging.add(work)
                    work.add_done_callback(merging.discard)

            async def on_completed(msg) -> None:
                completed.add(msg.subject.split(".")[-2])

            await admin.subscribe(f"{ns.prefix}.task.*.pr_opened", cb=on_pr)
            await admin.subscribe(f"{ns.prefix}.task.*.completed", cb=on_completed)
            await admin.flush()
            progress(f"running a batch of {tasks} tasks")
            t = time.perf_counter()
            await asyncio.gather(*(js.publish(ns.subject(e.rel_subject), encode(e), headers={"Nats-Msg-Id": e.event_id})
                                   for e in (issue(n) for n in range(1, tasks + 1))))
            deadline = time.monotonic() + BATCH_TIMEOUT
            last_change, done, told = time.monotonic(), 0, time.monotonic()
            while len(completed) < tasks and time.monotonic() < deadline and time.monotonic() - last_change < STALL:
                await asyncio.sleep(0.2)
                if len(pr_up) + len(completed) != done:
                    last_change, done = time.monotonic(), len(pr_up) + len(completed)
                if time.monotonic() - told > 15:
                    told = time.monotonic()
                    progress(f"{len(pr_up)}/{tasks} pull requests up, {len(completed)} merged and completed")
            batch_s = time.perf_counter() - t
            lag_batch = lag.take()
            records = await read_log(admin, ns, timeout=120)
            verdict = check_log(records, {task_id_for(REPO, n): (REPO, n) for n in range(1, tasks + 1)},
                                expected_final=("completed",), prefix=ns.prefix)
            declared_lost = sum(1 for r in records if isinstance(r.item, AgentWentOffline)
                                and r.item.reason == "heartbeat_timeout")
            progress("stopping")
            stop_slots = asyncio.Semaphore(START_CONCURRENCY)

            async def stop(agent) -> None:
                async with stop_slots:
                    with contextlib.suppress(Exception):
                        await agent.stop()

            await asyncio.gather(*(stop(a) for a in fleet))
            fleet = []
            await coordinator.stop()
        finally:
            await lag.stop()
            for agent in fleet:
                with contextlib.suppress(Exception):
                    agent.hand_back_all()
            for nc in ncs:
                with contextlib.suppress(Exception):
                    await nc.close()
            await admin.close()
    finally:
        if coordinator is not None:
            await coordinator.kill()
        bus.stop()
        shutil.rmtree(root, ignore_errors=True)
    ok = (verdict.lost == verdict.duplicated == verdict.illegal == 0 and len(completed) == tasks and not merge_errors
          and declared_lost == 0 and consumers - agents <= OTHER_CONSUMERS)
    return FleetRun(
        agents=agents, connections=len(ncs), tasks=tasks, provision_s=round(provision_s, 2),
        start_s=round(start_s, 2), start_per_s=round(agents / start_s, 1) if start_s > 0 else -1.0,
        events_consumers=consumers, consumers_per_agent=round(consumers / agents, 3),
        rss_before_mb=mb(rss0), rss_after_mb=mb(rss1), rss_per_agent_kb=round((rss1 - rss0) / agents, 1),
        server_rss_before_mb=mb(srss0), server_rss_after_mb=mb(srss1),
        server_rss_per_agent_kb=round((srss1 - srss0) / agents, 1),
        idle_agents_core_pct=round(idle_pct["agents"], 1), idle_server_core_pct=round(idle_pct["server"], 1),
        idle_coordinator_core_pct=round(idle_pct["coordinator"], 1), loop_lag_start_s=lag_start,
        loop_lag_idle_s=lag_idle, loop_lag_batch_s=lag_batch, batch_s=round(batch_s, 2),
        pr_up=len(pr_up), completed=len(completed), merge_errors=merge_errors[:20], final_states=verdict.final_states, lost=verdict.lost, duplicated=verdict.duplicated,
        illegal=verdict.illegal, violations=verdict.violations[:20], declared_lost=declared_lost, ok=ok)


async def run_fleet_bench(*, agents: int, tasks: int, connections: int, heartbeat_agents: int, window: float,
                          lose: int, sync_interval: str = "always",
                          progress: Callable[[str], None] = lambda s: None) -> FleetBench:
    """Both runs (a run with 0 agents is skipped), one after the other."""
    result = FleetBench(sync_interval=sync_interval, cpus=os.cpu_count() or 0, loadavg_before=loadavg())
    if heartbeat_agents:
        result.heartbeats = await run_heartbeats(agents=heartbeat_agents, window=window, lose=lose,
                                                 sync_interval=sync_interval, progress=progress)
    if agents:
        result.fleet = await run_fleet(agents=agents, tasks=tasks, connections=connections,
                                       sync_interval=sync_interval, progress=progress)
    result.loadavg_after = loadavg()
    return result


# -- how the results are shown --------------------------------------------------------------
CORE_TARGET_PCT = 2.0  # the coordinator's heartbeat cost with 1,000 agents, in % of a core


def heartbeat_rows(h: HeartbeatRun) -> list[tuple[str, str, str, str]]:
    """(metric, value, target, result) of the heartbeat run."""
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    sent = f"{h.heartbeats:,} ({h.agents:,} agents, every {h.interval_s:g} s, Nats-TTL {h.ttl or 'none'})"
    silence = f"{h.silence_min_s:.2f} / {h.silence_p50_s:.2f} / {h.silence_max_s:.2f} s (min / p50 / max)"
    return [
        ("heartbeats in the window", sent, "", ""),
        ("bare nats-py receiver CPU", f"{h.receiver_core_pct:.2f} % of a core ({h.receiver_cpu_s:.2f} s)", "", ""),
        ("coordinator CPU", f"{h.coordinator_core_pct:.2f} % of a core ({h.coordinator_cpu_s:.2f} s)",
         f"< {CORE_TARGET_PCT:g} %", verdict(h.coordinator_core_pct < CORE_TARGET_PCT)),
        ("coordinator / bare receiver", f"{h.ratio:.2f}", "", ""),
        (f"{h.lose} agents stopped at once: declared", f"{h.declared}/{h.lose}", "all", verdict(h.declared == h.lose)),
        ("their silence when declared", silence, f"{h.timeout_s:g}–{h.timeout_s + LOSS_MARGIN:g} s",
         verdict(h.loss_ok)),
    ]


def fleet_rows(f: FleetRun) -> list[tuple[str, str, str, str]]:
    """(metric, value, target, result) of the fleet run."""
    nothing_lost = f.lost == f.duplicated == f.illegal == 0 and f.completed == f.tasks and not f.merge_errors
    started = f"{f.agents:,} in {f.start_s:.1f} s ({f.start_per_s:.0f}/s) on {f.connections} connections"
    rss = f"{f.rss_per_agent_kb:.0f} KB ({f.rss_before_mb:g} -> {f.rss_after_mb:g} MB)"
    server_rss = f"{f.server_rss_per_agent_kb:.0f} KB ({f.server_rss_before_mb:g} -> {f.server_rss_after_mb:g} MB)"
    idle = (f"agents {f.idle_agents_core_pct:g} %, nats-server {f.idle_server_core_pct:g} %, "
            f"coordinator {f.idle_coordinator_core_pct:g} % of a core")
    lag = f"start {f.loop_lag_start_s:.2f} s, idle {f.loop_lag_idle_s:.2f} s, batch {f.loop_lag_batch_s:.2f} s"
    states = ", ".join(f"{k} {v}" for k, v in f.final_states.items())
    return [
        ("agents started", started, "", ""),
        ("artifact buckets created first", f"{f.provision_s:.1f} s", "", ""),
        ("consumers on the events stream", f"{f.events_consumers:,} ({f.consumers_per_agent:.3f} per agent)",
         "1 per agent", "ok" if f.events_consumers - f.agents <= OTHER_CONSUMERS else "MISSED"),
        ("memory per agent, agents' process", rss, "", ""),
        ("memory per agent, nats-server", server_rss, "", ""),
        ("CPU, all idle", idle, "", ""),
        ("worst event-loop lag", lag, "", ""),
        (f"batch of {f.tasks} tasks at once", f"{f.pr_up}/{f.tasks} pull requests up, {f.completed} merged and completed in {f.batch_s:.1f} s; {states}",
         "all", "ok" if nothing_lost else "MISSED"),
        ("lost / duplicated / illegal", f"{f.lost} / {f.duplicated} / {f.illegal}", "0",
         "ok" if nothing_lost else "MISSED"),
        ("agents declared lost", str(f.declared_lost), "0", "ok" if f.declared_lost == 0 else "MISSED"),
    ]


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.shell.bench.fleet",
                                     description="The coordinator and the bare receiver of `ccc bench fleet`.")
    sub = parser.add_subparsers(dest="role", required=True)
    c = sub.add_parser("coordinator")
    c.add_argument("url")
    c.add_argument("namespace")
    c.add_argument("timeout", type=float)
    r = sub.add_parser("receiver")
    r.add_argument("url")
    r.add_argument("subject")
    args = parser.parse_args(argv)
    if args.role == "coordinator":
        asyncio.run(_coordinator_main(args.url, args.namespace, args.timeout))
    else:
        asyncio.run(_receiver_main(args.url, args.subject))


if __name__ == "__main__":  # the bench's other processes
    _main(sys.argv[1:])
