"""An agent: registers, heartbeats, consumes only its own assignments, runs the
pipeline (the round the task asks for: its implementation, or a CI fix or a rebase on
its pull request's branch, see :mod:`actors.pipeline`) and reports every phase on its
own aggregate.

The agent is the only writer of ``<ns>.agent.<id>.*`` besides the coordinator's
supervision event (``agent.offline`` on a missed heartbeat). All its appends carry
the aggregate's last sequence, so once the coordinator has declared it offline any
late report it tries is refused by the concurrency check; the agent then notices,
drops the work it was doing (those tasks were taken back) and registers afresh.

What it holds on the bus is kept small, so that thousands of agents fit one stream and
one machine: one durable consumer (its own assignments; the only one its credentials may
create), a plain subscription for cancellation requests (no consumer: a request it hears
is checked against the log before it stops anything, and the running tasks are checked
again with every heartbeat, so one missed while disconnected still arrives), one for the
coordinator's ``agent.offline`` about it (so an idle agent need not read its aggregate
with every heartbeat to learn it was declared lost: it looks when told, after a
reconnect, and every :attr:`Agent.SUPERVISION_EVERY` heartbeats), and heartbeats that
carry their own TTL, so nats-server, not the coordinator, keeps track of who is alive
(:mod:`actors.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from datetime import datetime, timezone

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events import agent_state as ag
from events.agent import Heartbeat, report_name
from events.aio import cancel_and_wait, within
from events.codec import decode_event, encode
from events.errors import BadEventError, ConcurrencyConflict, StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace
from events.task import TaskAssigned, TaskCancellationRequested
from events.work_reports import WorkFailed, WorkReportBody

from actors.health import TTL_HEADER, format_ttl, heartbeat_ttl
from actors.pipeline import BudgetDeferred, PhaseFailed, PipelineSettings, Superseded, run_pipeline
from actors.ports import NO_TELEMETRY, Artifacts, Coder, ForgeClient, Telemetry, Workbench
from actors.runtime import ConsumerLoop

log = structlog.get_logger("ccc.agent")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    specialties: tuple[str, ...] = ("general",)
    capacity: int = 1
    clearance: str = "internal"
    host: str = msgspec.field(default_factory=socket.gethostname)
    heartbeat_interval: float = 2.0
    # how long each heartbeat stays in the stream unless the next one replaces it (None:
    # two intervals, actors.health.heartbeat_ttl); at most the coordinator's timeout
    heartbeat_ttl: float | None = None
    ack_wait: float = 30.0
    retention: float = 24 * 3600.0  # finished workspaces are removed after this
    shutdown_grace: float = 10.0
    pipeline: PipelineSettings


class Agent:
    """One agent. Its collaborators outside the process come in through the Protocols
    of :mod:`actors.ports`: the workbench (workspaces, git, the repository's tests), the
    coder, the forge, the artifacts store and telemetry."""

    def __init__(self, nc: Client, ns: Namespace, config: AgentConfig, *, workbench: Workbench,
                 coder: Coder, forge: ForgeClient, artifacts: Artifacts,
                 telemetry: Telemetry = NO_TELEMETRY) -> None:
        self.nc = nc
        self.ns = ns
        self.config = config
        self.id = config.agent_id
        self.workbench = workbench
        self.coder = coder
        self.forge = forge
        self.artifacts = artifacts
        self.telemetry = telemetry
        self.store = EventStore(nc, ns)
        self.state: ag.AgentState | None = None
        self.last_seq = 0
        self._lock = asyncio.Lock()
        self._rereg_lock = asyncio.Lock()
        self.running: dict[str, asyncio.Task] = {}
        self._stop_reason: dict[str, str] = {}
        self._loop: ConsumerLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._cancel_sub = None
        self._offline_sub = None
        self._offline_hint = False  # the coordinator wrote agent.offline about us: look
        self._beats = 0
        self._reconnects = nc.stats.get("reconnects", 0)
        self._assigned_at: dict[str, int] = {}  # running task -> stream sequence of its assignment
        self._hb_headers: dict[str, str] | None = None
        self._hb_seq = 0
        self.completed = 0

    # -- own aggregate -----------------------------------------------------------------
    async def _append(self, command: ag.Command) -> None:
        async with self._lock:
            events = ag.decide(self.state, command)
            try:
                seqs = await self.store.append(events, expected_last_seq=self.last_seq)
            except ConcurrencyConflict:
                self.state, self.last_seq = await self.store.load_agent(self.id)
                if self.state is None or self.state.status == "offline":
                    raise Superseded(f"{self.id} was declared offline") from None
                events = ag.decide(self.state, command)  # someone else wrote; re-decide once
                seqs = await self.store.append(events, expected_last_seq=self.last_seq)
            for e in events:
                self.state = ag.evolve(self.state, e)
            self.last_seq = seqs[-1]

    async def register(self) -> None:
        self.state, self.last_seq = await self.store.load_agent(self.id)
        c = self.config
        await self._append(ag.RegisterAgent(
            at=utcnow(), actor=self.id, agent_id=self.id, specialties=c.specialties,
            capacity=c.capacity, clearance=c.clearance, host=c.host, coder=self.coder.name,
            sandbox=self.workbench.sandbox_name))
        log.info("agent.registered", agent_id=self.id, specialties=list(c.specialties), capacity=c.capacity)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.workbench.prepare()
        await self.register()
        await self._first_heartbeat()
        await self._watch_cancellations()
        await self._watch_supervision()
        self._loop = ConsumerLoop(
            self.nc, stream=self.ns.events_stream, durable=f"agent-{self.id}",
            filter_subjects=[self.ns.assignments_filter(self.id)], handler=self._on_assignment,
            # an election can stall reads for ~5-8 s: enough redeliveries (with backoff) to
            # outlast it, or an assignment would be parked and its task stranded
            concurrency=self.config.capacity, ack_wait=self.config.ack_wait, max_deliver=20,
            dead_letters=False,  # the coordinator's job: an agent's credentials forbid it
            inactive_threshold=7 * 24 * 3600.0,  # an agent id never seen again does not pile up
            telemetry=self.telemetry,
            # an idle agent's pull request and its expiry notice are most of what it costs
            # its process and the server: one per PULL_EXPIRES, not one per 2 s
            pull_expires=self.PULL_EXPIRES,
        )
        await self._loop.start()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"hb-{self.id}"),
            asyncio.create_task(self._cleanup_loop(), name=f"cleanup-{self.id}"),
        ]

    async def drain(self) -> None:
        """Say we take no new work (``agent.maintenance_started``, reason ``shutdown``)
        before anything is handed back: the scheduler then never assigns a handed-back
        task, or a new one, to an agent that is on its way out. Idempotent; a failure
        only costs the guard (the stop still hands back and goes offline)."""
        if self.state is None or self.state.status not in ag.ONLINE:
            return
        try:
            await self._append(ag.EnterMaintenance(at=utcnow(), actor=self.id, reason="shutdown"))
        except Exception as e:  # noqa: BLE001 - declared offline, illegal now, server gone
            log.warning("agent.drain_failed", agent_id=self.id, error=f"{type(e).__name__}: {e}")
        else:
            log.info("agent.draining", agent_id=self.id, running=len(self.running))

    async def stop(self) -> None:
        """Graceful: stop taking work (:meth:`drain`), give running tasks
        ``shutdown_grace`` to finish, hand back the rest, then say we are offline."""
        await self.drain()
        for task_id in self.running:
            self._stop_reason.setdefault(task_id, "handed_back")
        if self._loop is not None:
            await self._loop.stop(grace=self.config.shutdown_grace)
        await cancel_and_wait(self._tasks)
        # each step is bounded: a stop must end even if the server stops answering
        for sub in (self._cancel_sub, self._offline_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await within(sub.unsubscribe(), 5.0)
        if self.state is not None and self.state.status != "offline":
            try:
                await within(self._append(ag.GoOffline(at=utcnow(), actor=self.id, reason="shutdown")), 10.0)
            except Exception as e:  # noqa: BLE001 - the health monitor will declare us offline
                log.warning("agent.offline_not_recorded", agent_id=self.id, error=f"{type(e).__name__}: {e}")
        log.info("agent.stopped", agent_id=self.id)

    def hand_back_all(self) -> None:
        """Skip the shutdown grace: cancel the running work now, which is then reported as
        handed back (the coordinator re-queues it), as when the grace runs out."""
        for work in list(self.running.values()):
            work.cancel()

    # -- heartbeats and housekeeping ------------------------------------------------------
    TTL_DISABLED = 10166  # JetStream's error code: the stream does not allow per-message TTLs

    def _heartbeat(self) -> bytes:
        self._hb_seq += 1
        return encode(Heartbeat(agent_id=self.id, at=utcnow(), active_tasks=tuple(self.running), seq=self._hb_seq))

    async def _first_heartbeat(self) -> None:
        """The first heartbeat is acknowledged, so a stream that refuses its TTL (one
        provisioned before per-message TTLs) is noticed: the agent then heartbeats without
        one, and the health monitor follows it by its heartbeat's sequence instead."""
        ttl = self.config.heartbeat_ttl or heartbeat_ttl(self.config.heartbeat_interval)
        self._hb_headers = {TTL_HEADER: format_ttl(ttl)}
        subject = self.ns.heartbeat_subject(self.id)
        try:
            await self.nc.jetstream(timeout=5.0).publish(subject, self._heartbeat(), headers=self._hb_headers)
        except nats.js.errors.BadRequestError as e:
            if e.err_code != self.TTL_DISABLED:
                raise
            log.warning("agent.heartbeat_ttl_refused", agent_id=self.id, stream=self.ns.heartbeats_stream,
                        hint="provision the streams again (`ccc server`/`ccc up` do at start)")
            self._hb_headers = None
            await self._heartbeat_once()
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
            # the loop goes on heartbeating; the monitor's grace covers a late first one
            log.warning("agent.heartbeat_failed", agent_id=self.id, error=f"{type(e).__name__}: {e}")

    async def _heartbeat_once(self) -> None:
        await self.nc.publish(self.ns.heartbeat_subject(self.id), self._heartbeat(), headers=self._hb_headers)

    async def _heartbeat_loop(self) -> None:
        """A heartbeat every interval, whatever else is slow: the reads that follow it
        (supervision, cancellations) run beside the loop, one round at a time, so a
        server slow to answer them (a stall, a saturated machine) never holds back the
        next heartbeat and gets the agent declared lost."""
        checks: asyncio.Task | None = None
        try:
            while True:
                await asyncio.sleep(self.config.heartbeat_interval)
                try:
                    await self._heartbeat_once()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the heartbeat must outlive any one failure
                    log.warning("agent.heartbeat_failed", agent_id=self.id, error=f"{type(e).__name__}: {e}")
                if checks is None or checks.done():
                    checks = asyncio.create_task(self._after_heartbeat(self._time_to_look()),
                                                 name=f"checks-{self.id}")
        finally:
            await cancel_and_wait([checks])

    async def _after_heartbeat(self, look: bool) -> None:
        try:
            await self._check_supervision(remote=look)
            await self._check_cancellations()
        except Exception as e:  # noqa: BLE001 - the next heartbeat checks again
            log.warning("agent.check_failed", agent_id=self.id, error=f"{type(e).__name__}: {e}")

    PULL_EXPIRES = 10.0
    """Seconds each pull request for assignments waits at the server (the consumer loop's
    default is 2 s): a new assignment is delivered the moment it exists either way."""

    SUPERVISION_EVERY = 15
    """Heartbeats between two looks at our aggregate when nothing said to look (the
    safety net under the ``agent.offline`` subscription: 30 s at the default interval)."""

    async def _watch_supervision(self) -> None:
        async def on_offline(msg: Msg) -> None:
            self._offline_hint = True  # looked at with the next heartbeat

        self._offline_sub = await self.nc.subscribe(f"{self.ns.prefix}.agent.{self.id}.offline", cb=on_offline)

    def _time_to_look(self) -> bool:
        """Whether this heartbeat reads our aggregate: told to (an ``agent.offline`` about
        us), after a reconnect (what we may have missed), or as the periodic safety net."""
        self._beats += 1
        reconnects = self.nc.stats.get("reconnects", 0)
        look = self._offline_hint or reconnects != self._reconnects or self._beats % self.SUPERVISION_EVERY == 0
        self._offline_hint, self._reconnects = False, reconnects
        return look

    async def _check_supervision(self, remote: bool = True) -> None:
        """An idle agent appends nothing, so a failed append cannot tell it that the
        coordinator declared it offline (e.g. after a stall): when ``remote``, look at
        our aggregate's last sequence (one direct get) and come back if so."""
        if self.state is not None and self.state.status == "offline":
            log.warning("agent.declared_offline", agent_id=self.id)
            await self._reregister()
            return
        if not remote or await self.store.last_seq(self.ns.agent_filter(self.id)) <= self.last_seq:
            return
        async with self._lock:
            self.state, self.last_seq = await self.store.load_agent(self.id)
        if self.state is None or self.state.status == "offline":
            log.warning("agent.declared_offline", agent_id=self.id)
            await self._reregister()

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(3600.0, self.config.retention / 10)))
            removed = await asyncio.to_thread(self.workbench.remove_expired, self.id, self.config.retention)
            if removed:
                log.info("agent.workspaces_removed", agent_id=self.id, count=len(removed))

    async def _watch_cancellations(self) -> None:
        """A plain subscription to the cancellation requests: the coordinator appends them
        to the log, and NATS hands a copy of every message on the subject to its
        subscribers too, so no consumer is needed (one per agent was half of what kept
        1,000 agents from starting). What it hears is a hint: the log is asked before
        anything stops (:meth:`_cancel_requested`)."""
        async def on_cancel(msg: Msg) -> None:
            task_id = msg.subject.rsplit(".", 2)[-2]
            if task_id in self.running:
                await self._cancel_if_requested(task_id)

        self._cancel_sub = await self.nc.subscribe(f"{self.ns.prefix}.task.*.cancel_requested", cb=on_cancel)

    async def _cancel_requested(self, task_id: str) -> bool:
        """Whether the log holds a cancellation request for ``task_id`` after the
        assignment we run (one direct get)."""
        subject = f"{self.ns.prefix}.task.{task_id}.cancel_requested"
        try:
            msg = await self.store.js.get_last_msg(self.ns.events_stream, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return False
        try:  # only a real cancellation request of a task we run stops the work
            event = decode_event(self.ns.rel(subject), msg.data or b"")
        except BadEventError:
            log.warning("agent.bad_cancel_message", agent_id=self.id, subject=subject, seq=msg.seq)
            return False
        return isinstance(event, TaskCancellationRequested) and (msg.seq or 0) > self._assigned_at.get(task_id, 0)

    async def _cancel_if_requested(self, task_id: str) -> None:
        try:
            requested = await self._cancel_requested(task_id)
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
            log.info("agent.cancel_check_failed", agent_id=self.id, task_id=task_id, error=f"{type(e).__name__}: {e}")
            return  # the next heartbeat checks again
        running = self.running.get(task_id)
        if requested and running is not None and self._stop_reason.get(task_id) != "cancelled":
            log.info("agent.cancel_requested", agent_id=self.id, task_id=task_id)
            self._stop_reason[task_id] = "cancelled"
            running.cancel()

    async def _check_cancellations(self) -> None:
        """With each heartbeat: a request missed by the subscription (sent while we were
        disconnected) still stops the work, one heartbeat later."""
        for task_id in list(self.running):
            await self._cancel_if_requested(task_id)

    # -- assignments -------------------------------------------------------------------
    async def _on_assignment(self, msg: Msg) -> None:
        event = decode_event(self.ns.rel(msg.subject), msg.data)
        if not isinstance(event, TaskAssigned) or event.agent_id != self.id:
            return
        if self.state is None or self.state.status == "offline":
            await self._reregister()  # declared offline (e.g. across a server restart): come back first
        task, last = await self.store.load_task(event.task_id)
        if last < msg.metadata.sequence.stream:
            # our read of the task is older than the assignment itself (e.g. a replica
            # that lags right after a leader election): retry, never drop it as stale
            raise StoreUnavailable(f"read of {event.task_id} is behind its assignment; retrying")
        if task is None or task.agent_id != self.id or task.attempt != event.attempt:
            log.info("agent.stale_assignment", agent_id=self.id, task_id=event.task_id)
            return
        if task.status != "assigned":
            if task.status in ("in_progress", "testing") and task.task_id not in self.running:
                # ours, but nothing here works on it (a pipeline lost to a failure we could
                # not even report): hand it back rather than strand it
                log.warning("agent.orphaned_task_handed_back", agent_id=self.id, task_id=task.task_id)
                held = self.state is not None and task.task_id in self.state.active_tasks
                await self._append(
                    ag.ReleaseAgentTask(at=utcnow(), actor=self.id, task_id=task.task_id,
                                        outcome="handed_back", attempt=task.attempt) if held else
                    ag.DeclineTask(at=utcnow(), actor=self.id, task_id=task.task_id,
                                   attempt=task.attempt, reason="not running here"))
            return
        tid = task.task_id
        if task.cancel_requested:
            await self._append(ag.DeclineTask(at=utcnow(), actor=self.id, task_id=tid,
                                              attempt=task.attempt, reason="cancel requested"))
            return
        if self.state is None or self.state.status not in ag.ONLINE or len(self.running) >= self.config.capacity:
            why = "no free slot" if self.state is not None and self.state.status in ag.ONLINE else \
                f"agent is {self.state.status if self.state else 'unregistered'}"
            await self._append(ag.DeclineTask(at=utcnow(), actor=self.id, task_id=tid,
                                              attempt=task.attempt, reason=why))
            return
        await self._append(ag.StartAgentTask(at=utcnow(), actor=self.id, task_id=tid, attempt=task.attempt))
        work = asyncio.create_task(self._work(task), name=f"work-{tid}")
        self._assigned_at[tid] = msg.metadata.sequence.stream
        self.running[tid] = work
        pinger = asyncio.create_task(self._keep_in_progress(msg))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # the consumer loop is shutting down: hand the task back
            self._stop_reason.setdefault(tid, "handed_back")
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise
        finally:
            pinger.cancel()
            self.running.pop(tid, None)
            self._assigned_at.pop(tid, None)

    async def _keep_in_progress(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.config.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _work(self, task) -> None:
        tid, attempt = task.task_id, task.attempt
        # the attempt's span is the current one until it ends: the reports appended in it
        # carry its trace context
        telemetry = self.telemetry.attempt_started(self.id, tid, attempt)

        async def report(body: WorkReportBody) -> None:
            # each report ends a pipeline phase: time it and give it a span of its own
            telemetry.phase_ended(report_name(body), failed=isinstance(body, WorkFailed))
            await self._append(ag.ReportWork(at=utcnow(), actor=self.id, task_id=tid, attempt=attempt,
                                             report=body))

        outcome = "done"
        try:
            await run_pipeline(agent_id=self.id, task=task, settings=self.config.pipeline,
                               workbench=self.workbench, coder=self.coder, forge=self.forge,
                               artifacts=self.artifacts, report=report)
            self.completed += 1
        except PhaseFailed as e:
            outcome = "failed"
            log.info("agent.task_failed", agent_id=self.id, task_id=tid, work=task.work, phase=e.phase,
                     reason=e.reason)
            await report(WorkFailed(phase=e.phase, reason=e.reason, retryable=e.retryable, log_ref=e.log_ref))
        except asyncio.CancelledError:
            outcome = self._stop_reason.pop(tid, "handed_back")
            log.info("agent.task_stopped", agent_id=self.id, task_id=tid, outcome=outcome)
        except BudgetDeferred as e:  # back to the queue, where it waits budget:<scope>
            outcome = "handed_back"
            log.info("agent.task_deferred", agent_id=self.id, task_id=tid, reason=e.reason)
        except Superseded:
            log.warning("agent.superseded", agent_id=self.id, task_id=tid)
            await self._reregister()
            return
        finally:
            telemetry.ended(outcome)
            with contextlib.suppress(Exception):
                self.workbench.finish_workspace(self.id, tid, outcome)
        try:
            await self._append(ag.ReleaseAgentTask(at=utcnow(), actor=self.id, task_id=tid,
                                                   outcome=outcome, attempt=attempt))
        except Superseded:
            await self._reregister()
        except StoreUnavailable as e:
            log.warning("agent.release_failed", agent_id=self.id, task_id=tid, error=str(e))

    async def _reregister(self) -> None:
        """Declared offline while alive (e.g. a long stall): our tasks were taken back;
        stop what we hold and come back as a new incarnation. Serialised: the heartbeat
        and an assignment may both notice at once."""
        async with self._rereg_lock:
            async with self._lock:
                self.state, self.last_seq = await self.store.load_agent(self.id)
            if self.state is not None and self.state.status != "offline":
                return  # someone (the other caller) already brought us back
            for tid, work in list(self.running.items()):
                self._stop_reason[tid] = "lost"
                work.cancel()
            await self.register()
