"""The dispatch bench's cast: null agents that do no work, and the real coordinator in
its own process."""

from __future__ import annotations

import asyncio
import cProfile
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

from nats.aio.client import Client

from events import agent_state as ag
from events.agent import Heartbeat
from events.codec import encode
from events.errors import StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace
from events.work_reports import ImplementationProduced, PullRequestOpened

from infra.adapters.nats.connection import connect
from infra.adapters.nats.secure import KitFiles
from infra.adapters.nats.settings import load_log_settings
from infra.shell.bench.bus import BenchBus
from infra.shell.bench.child import Child
from infra.shell.bench.probes import utcnow
from infra.shell.bench.report import HEARTBEAT_TIMEOUT, SPECIALTIES, STEP_TIMEOUT


# -- agents ----------------------------------------------------------------------------
REGISTER_CONCURRENCY = 32  # agents connecting at once while registering (TLS handshakes)


class RegisteredAgent(NamedTuple):
    nc: Client  # its own connection, as its own user (closed unless kept)
    store: EventStore
    state: ag.AgentState  # its aggregate after registration
    last_seq: int


async def register_agents(bus: BenchBus, ns: Namespace, ids: list[str], capacity: int, *,
                          keep: bool) -> dict[str, RegisteredAgent]:
    """Each agent connects as itself, appends its real ``agent.registered`` event and
    heartbeats once, like ``ccc agent`` starting (with security on, only its own user
    may write its aggregate and heartbeat). ``keep``: keep the connections open (the
    throughput run's null agents work on them); otherwise they are closed, the idle
    agents of a latency run stay registered and, for an hour, alive."""
    at = utcnow()
    slots = asyncio.Semaphore(REGISTER_CONCURRENCY)
    out: dict[str, RegisteredAgent] = {}

    async def one(aid: str) -> None:
        async with slots:
            nc = await bus.connect("agent", ns, aid, name=f"ccc-bench-{aid}")
            try:
                store = EventStore(nc, ns, timeout=30)
                events = ag.decide(None, ag.RegisterAgent(at=at, actor=aid, agent_id=aid, specialties=SPECIALTIES,
                                                          capacity=capacity, host="bench", coder="null"))
                [seq] = await store.append(events, expected_last_seq=0)
                await nc.publish(ns.heartbeat_subject(aid), encode(Heartbeat(agent_id=aid, at=at, seq=1)))
                await nc.flush()
            except BaseException:
                await nc.close()
                raise
            if not keep:
                await nc.close()
            out[aid] = RegisteredAgent(nc, store, ag.evolve(None, events[0]), seq)

    results = await asyncio.gather(*(one(aid) for aid in ids), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for agent in out.values():
            await agent.nc.close()
        raise StoreUnavailable(f"registering {len(failed)}/{len(ids)} null agents failed; first: {failed[0]}")
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
        # (sent, acknowledged) wall-clock ns of each append: to read beside the store's
        # timestamps (see probes.appends_in_queue)
        self.appends: list[tuple[int, int]] = []

    async def _append(self, command: ag.Command) -> None:
        async with self.lock:
            events = ag.decide(self.state, command)
            sent = time.time_ns()
            seqs = await self.store.append(events, expected_last_seq=self.last_seq)
            self.appends.append((sent, time.time_ns()))
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
            at=utcnow(), actor=me, task_id=task_id, attempt=attempt,
            report=ImplementationProduced(coder="null", files_changed=("app/handlers.py",),
                                          diff_stat="1 file changed")))
        await self._after("testing", task_id)
        await self._append(ag.ReportWork(
            at=utcnow(), actor=me, task_id=task_id, attempt=attempt,
            report=PullRequestOpened(branch=f"ccc/task-{task_id}", tests_passed=1)))
        await self._append(ag.ReleaseAgentTask(at=utcnow(), actor=me, task_id=task_id, outcome="done",
                                               attempt=attempt))


# -- the coordinator, in its own process -------------------------------------------------
WARNING_LINES = 20


class CoordinatorProcess(Child):
    """``python -m infra.shell.bench.cast coordinator URL NS [--profile FILE] [--kit DIR]``:
    prints ``ready`` once started, stops on a line (or EOF) on stdin, prints its counters
    as JSON. ``kit_dir``: connect as that user (the ``coordinator`` of the namespace,
    with security on), as ``ccc up``'s coordinator does."""

    def __init__(self, url: str, ns: Namespace, log_path: Path, profile_path: Path | None,
                 kit_dir: Path | None = None) -> None:
        args = ["coordinator", url, ns.prefix]
        if profile_path is not None:
            args += ["--profile", str(profile_path)]
        if kit_dir is not None:
            args += ["--kit", str(kit_dir)]
        super().__init__("infra.shell.bench.cast", args, log_path, what="coordinator", start_timeout=60.0)

    async def stop(self) -> dict:
        """Its counters, with the warnings and errors its log holds."""
        stats = await super().stop()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        lines = [ln for ln in text.splitlines() if "[warning" in ln or "[error" in ln]
        stats["warnings"] = len(lines)
        stats["warning_lines"] = lines[:WARNING_LINES]  # what they were (the first few)
        return stats


async def _serve_coordinator(url: str, prefix: str, profile_path: str | None, kit_dir: str | None) -> None:
    import logging

    import structlog

    from actors.coordinator import CoordinatorConfig
    from infra.shell.app.cluster import build_coordinator  # the coordinator `ccc up` runs

    level = load_log_settings().level.upper()  # CCC_LOG_LEVEL, or the CLI's default: warning
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                    structlog.dev.ConsoleRenderer(colors=False)],
    )
    nc = await connect(url, name="ccc-bench-coordinator", kit=KitFiles.load(kit_dir) if kit_dir else None)
    coordinator = build_coordinator(nc, Namespace(prefix),
                                    CoordinatorConfig(heartbeat_timeout=HEARTBEAT_TIMEOUT))
    await coordinator.start()
    profile = cProfile.Profile(time.process_time) if profile_path else None  # CPU, not wall
    if profile is not None:
        profile.enable()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if profile is not None:
        profile.disable()
        profile.dump_stats(profile_path)
    intake, reports = coordinator.consumers
    stats = {
        "assignments": coordinator.assignments,
        "intake_handled": intake.handled, "intake_failed": intake.failed,
        "reports_handled": reports.handled, "reports_failed": reports.failed,
        "bad_events": coordinator.model.bad_count,
    }
    await coordinator.stop()
    await nc.close()
    print(json.dumps(stats), flush=True)


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.shell.bench.cast",
                                     description="The coordinator process of `ccc bench dispatch`.")
    parser.add_argument("role", choices=["coordinator"])
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--profile", default=None, help="write cProfile stats (CPU time) here")
    parser.add_argument("--kit", default=None, help="connect as the user of this credentials kit")
    args = parser.parse_args(argv)
    asyncio.run(_serve_coordinator(args.url, args.namespace, args.profile, args.kit))


if __name__ == "__main__":  # the coordinator process of the bench
    _main(sys.argv[1:])
