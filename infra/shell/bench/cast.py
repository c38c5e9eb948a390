"""The dispatch bench's cast: raw baselines, null agents that do no work, and the real
coordinator in its own process."""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import sys
import time
import uuid
from pathlib import Path

from nats.js import api

from events import agent_state as ag
from events.agent import Heartbeat
from events.codec import encode
from events.errors import StoreUnavailable
from events.store import BATCH_COMMIT, BATCH_ID, BATCH_SEQ, EventStore
from events.subjects import Namespace

from infra.shell.bench.probes import (
    opened,
    pct,
    utcnow,
)
from infra.shell.bench.report import (
    HEARTBEAT_TIMEOUT,
    SPECIALTIES,
    STEP_TIMEOUT,
)
from infra.adapters.nats.connection import connect


# -- baselines -------------------------------------------------------------------------
async def _raw_baselines(nc, js, rtt_samples: int, publish_msgs: int) -> dict:
    await js.add_stream(api.StreamConfig(
        name="RAWBENCH", subjects=["rawbench.>"], storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, num_replicas=1, allow_atomic=True))
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
    # four events as one atomic batch (a multi-event decision) and as four awaited
    # publishes (the intake's write): raw, to show the floor of each
    batch4, seq4 = [], []
    for i in range(rtt_samples // 2):
        t = time.perf_counter_ns()
        await _atomic_batch(nc, [f"rawbench.batch.{i % 100}.{k}" for k in range(4)], payload)
        batch4.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        for k in range(4):
            await js.publish(f"rawbench.seq.{i % 100}.{k}", payload)
        seq4.append(time.perf_counter_ns() - t)
    # pipelined publishes
    t = time.perf_counter()
    futures = [await js.publish_async(f"rawbench.pub.{i % 100}", payload) for i in range(publish_msgs)]
    await asyncio.gather(*futures)
    rate = publish_msgs / (time.perf_counter() - t)
    await js.delete_stream("RAWBENCH")
    return {"rtt_p50": pct(rtt, 50), "rtt_p99": pct(rtt, 99), "hop_p50": pct(hop, 50),
            "hop_p99": pct(hop, 99), "publish_per_s": rate, "batch4_p50": pct(batch4, 50),
            "seq4_p50": pct(seq4, 50)}


async def _atomic_batch(nc, subjects: list[str], payload: bytes) -> None:
    """One JetStream atomic batch, as the event store writes a multi-event decision."""
    batch = uuid.uuid4().hex[:16]
    for i, subject in enumerate(subjects, 1):
        headers = {BATCH_ID: batch, BATCH_SEQ: str(i)}
        if i < len(subjects):
            await nc.publish(subject, payload, headers=headers)
        else:
            headers[BATCH_COMMIT] = "1"
            reply = await nc.request(subject, payload, headers=headers, timeout=10)
            if b'"error"' in reply.data:
                raise RuntimeError(f"atomic batch refused: {reply.data[:200]!r}")


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
    """``python -m infra.shell.bench.cast coordinator URL NS [PROFILE]``: prints ``ready``
    once started, stops on a line (or EOF) on stdin, prints its counters as JSON."""

    def __init__(self, url: str, ns: Namespace, log_path: Path, profile_path: Path | None) -> None:
        self.url, self.ns, self.log_path, self.profile_path = url, ns, log_path, profile_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        args = [sys.executable, "-m", "infra.shell.bench.cast", "coordinator", self.url, self.ns.prefix]
        if self.profile_path is not None:
            args.append(str(self.profile_path))
        err = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # run from the directory holding this package, so the child imports this very code
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=Path(__file__).resolve().parents[3])
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


if __name__ == "__main__":  # the coordinator process of the bench
    if len(sys.argv) >= 4 and sys.argv[1] == "coordinator":
        asyncio.run(_serve_coordinator(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None))
    else:
        sys.exit("usage: python -m infra.shell.bench.cast coordinator URL NAMESPACE [PROFILE]")
