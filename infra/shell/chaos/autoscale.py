"""The ``autoscale`` scenario of ``ccc chaos``: a burst of one specialty against a cluster
that has no agents until the autoscaler starts them.

One run: a server (secure unless ``--insecure``), one coordinator process started as
``ccc up --agents 0 --autoscale 0:N`` (N = 4 with ``--quick``, 6 otherwise; the agents it
starts run inside that process, :meth:`LocalCluster.spawn_agent`, with the sandbox's
recorded sessions, forge and capacity: :meth:`.sandbox.Sandbox.autoscaling_coordinator`),
then a burst of issues (40; 12 with ``--quick``; ``--tasks``), all ``backend``. Short
cool-downs (:data:`COOLDOWN_UP`, :data:`COOLDOWN_DOWN`: seconds, where production waits
5 and 30) keep a run to a minute or two; the figures say which were used.

The fault: once the fleet has grown to two agents and work is in progress, the whole
``ccc up`` is SIGKILLed (its process group: the coordinator, the autoscaler and every
agent it started die together, as on a host crash) and started again. The new
autoscaler starts from an empty fleet (the ids come back, lowest first: an agent
re-registering under an id whose previous incarnation never said goodbye records that
incarnation ``offline``/``crashed`` first, and its tasks are re-queued); the killed
agents' tasks are re-queued and done by the new fleet.

Judged, beyond :func:`.checks.check_log` (pull request up for every task, nothing lost or
duplicated), from the ``<NS>_CLUSTER`` decisions and the event log (:func:`check_autoscale`):

* the fleet, replayed from the decisions (:func:`fleet_sizes`; a kill empties it), grew at
  least twice, never beyond N, each decision's ``agents_before``/``agents_after`` agreeing
  with the replay, every decision with its reason and carried out (outcome ``done``);
* it ended back at the minimum, by a ``cluster.scaled_down``, after the last pull request
  was up;
* every scaled-down agent was drained before it stopped (``agent.maintenance_started``,
  then ``agent.offline`` with reason ``shutdown``, and no task started in between:
  :func:`drained_before_stopped`), and none had a task taken from it: no
  ``task.requeued`` (handed back or lost), once its scale-down had begun, of an
  assignment made to the incarnation that scale-down ended (:func:`scale_down_requeues`).

Figures (the run's first note): time from the burst to the first scale-up, the peak fleet,
the time from the burst to the last pull request up, from that to the fleet back at the
minimum, and from the burst to there. Recovery: ``ccc up`` SIGKILLed -> every task its
agents held re-queued (the restart and the 2 s heartbeat timeout included).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec
from nats.aio.client import Client

from events.aio import cancel_and_wait
from events.agent import AgentMaintenanceStarted, AgentRegistered, AgentTaskStarted, AgentWentOffline
from events.cluster import ClusterScaledDown, ClusterScaledUp, cluster_stream, decode_cluster_event
from events.errors import CccError
from events.subjects import Namespace
from events.task import TaskAssigned, TaskEventBase, TaskRequeued
from events.task_state import WITH_AGENT
from projections.autoscale import AutoscalePolicy
from projections.read_model import ReadModel

from infra.shell.app.autoscale import agent_ids
from infra.shell.chaos.checks import PR_UP, LogRecord, Mark, finished_by_other, forge_holds_the_pr, read_log
from infra.shell.chaos.model import RunResult
from infra.shell.chaos.processes import READY
from infra.shell.chaos.run import judge, note_run_end
from infra.shell.chaos.sandbox import Sandbox, Tracker
from infra.shell.chaos.world import World

COORDINATOR = "coordinator-1"
SPECIALTY = "backend"  # what every issue of the burst is (the sandbox labels them so)
MIN_AGENTS = 0
COOLDOWN_UP = 1.0  # seconds between scale-ups (production: 5)
COOLDOWN_DOWN = 3.0  # seconds after a decision before a scale-down (production: 30)
WAIT = 120.0  # for the moment the kill waits for
DRAIN_SLACK = 1.0  # s: an agent's own events vs. the autoscaler's clock (same host)

Decision = ClusterScaledUp | ClusterScaledDown


def max_agents(quick: bool) -> int:
    return 4 if quick else 6


# -- reading the decisions ----------------------------------------------------------------------
async def read_decisions(nc: Client, ns: Namespace, *, from_seq: int = 1) -> tuple[list[Decision], list[str]]:
    """The ``<NS>_CLUSTER`` stream from ``from_seq`` as it is now, in order: the decisions,
    and a line for each message that is not one (a violation: only the autoscaler writes
    there). Direct gets by sequence: a run makes tens of decisions, not thousands. A read
    that fails raises (nothing deletes from that stream: a failure is the server's)."""
    jsm = nc.jsm()
    stream = cluster_stream(ns)
    info = await jsm.stream_info(stream)
    out: list[Decision] = []
    bad: list[str] = []
    cut = len(ns.prefix) + 1
    for seq in range(max(from_seq, info.state.first_seq or 1), info.state.last_seq + 1):
        msg = await jsm.get_msg(stream, seq)
        try:
            out.append(decode_cluster_event((msg.subject or "")[cut:], msg.data or b""))
        except CccError as e:
            bad.append(f"autoscale: {stream} seq {seq} on {msg.subject} is not a decision: {e}")
    return out, bad


class FleetWatch:
    """The decisions as they are made, by short polls (a failed read is tried again)."""

    def __init__(self, nc: Client, ns: Namespace) -> None:
        self.nc, self.ns = nc, ns
        self.decisions: list[Decision] = []
        self._next = 1
        self._task: asyncio.Task | None = None

    async def poll(self) -> None:
        with contextlib.suppress(Exception):
            new, bad = await asyncio.wait_for(read_decisions(self.nc, self.ns, from_seq=self._next), 5.0)
            self.decisions += new
            self._next += len(new) + len(bad)

    async def _loop(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(0.2)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="chaos-fleet-watch")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


# -- the judgement, pure ---------------------------------------------------------------------------
class FleetPoint(NamedTuple):
    at: float  # when it was decided (recorded), seconds since the epoch
    size: int  # agents the autoscaler runs after it, as replayed
    decision: Decision


def fleet_sizes(decisions: Iterable[Decision], resets: Sequence[float] = ()) -> tuple[list[FleetPoint], list[str]]:
    """Replay the decisions (in log order) into the fleet's size after each. ``resets``:
    the moments the whole fleet died with its process (``ccc up`` killed): the next
    autoscaler starts from none. A scale-up that failed adds no agent; a scale-down
    always removes one (a failed stop too: the autoscaler no longer runs it). Returns
    the points and where a decision's own count (``agents_before``/``after``) disagrees
    with the replay."""
    pending = sorted(resets)
    size = 0
    points: list[FleetPoint] = []
    problems: list[str] = []
    for d in decisions:
        at = d.occurred_at.timestamp()
        while pending and pending[0] <= at:
            pending.pop(0)
            size = 0
        before = size
        if isinstance(d, ClusterScaledUp):
            size += 1 if d.outcome == "done" else 0
        else:
            size = max(0, size - 1)
        if d.agents_before != before or d.agents_after != size:
            problems.append(f"autoscale: {d.event_id} says {d.agents_before} -> {d.agents_after} agents, "
                            f"the decisions before it make it {before} -> {size}")
        points.append(FleetPoint(at, size, d))
    return points, problems


class _Span(NamedTuple):
    start: float  # its registration's timestamp
    seq: int  # and sequence (an ``agent.offline``/``crashed`` about the one before shares the moment)
    end: float  # the next registration's timestamp (inf: none)


def _registrations(records: Iterable[LogRecord]) -> dict[str, list[tuple[float, int]]]:
    regs: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for r in records:
        if isinstance(r.item, AgentRegistered):
            regs[r.item.agent_id].append((r.at, r.seq))
    return regs


def _incarnation(regs: dict[str, list[tuple[float, int]]], agent: str, t: float) -> _Span | None:
    """The incarnation of ``agent`` alive at ``t``: from its registration to its next one
    (a restart, or a later scale-up reusing the id)."""
    starts = regs.get(agent, [])
    i = bisect_right([at for at, _ in starts], t) - 1
    if i < 0:
        return None
    return _Span(starts[i][0], starts[i][1], starts[i + 1][0] if i + 1 < len(starts) else float("inf"))


class _Stop(NamedTuple):
    """One scale-down, seen from the log: the incarnation of the agent it stopped and
    that incarnation's own events up to the decision (task events excluded)."""

    decision: ClusterScaledDown
    span: _Span
    events: list[LogRecord]

    @property
    def drain_at(self) -> float:
        """When the scale-down began, as the log shows it: the agent's drain (or, if it
        was not drained, its going offline; or else the decision itself)."""
        for kind in (AgentMaintenanceStarted, AgentWentOffline):
            at = next((r.at for r in self.events if isinstance(r.item, kind)), None)
            if at is not None:
                return at
        return self.decision.occurred_at.timestamp()


def _stops(records: Sequence[LogRecord], decisions: Iterable[Decision]) -> tuple[list[_Stop], list[str]]:
    regs = _registrations(records)
    stops, unknown = [], []
    for d in decisions:
        if not isinstance(d, ClusterScaledDown):
            continue
        at = d.occurred_at.timestamp()
        span = _incarnation(regs, d.agent_id, at)
        if span is None:
            unknown.append(f"autoscale: {d.agent_id} scaled down but never registered")
            continue
        mine = [r for r in records if r.seq >= span.seq and r.at <= at + DRAIN_SLACK
                and getattr(r.item, "agent_id", None) == d.agent_id and not isinstance(r.item, TaskEventBase)]
        stops.append(_Stop(d, span, mine))
    return stops, unknown


def scale_down_requeues(records: Sequence[LogRecord], decisions: Iterable[Decision]) -> list[str]:
    """A task taken from an agent because the autoscaler stopped it: a ``task.requeued``
    (``handed_back`` or ``agent_lost``) of an assignment made to an incarnation of an
    agent that ended in a scale-down (a ``cluster.scaled_down`` naming it, recorded
    between that registration and the next), re-queued once that scale-down had begun
    (:attr:`_Stop.drain_at`). A drained agent finishes what it holds before it stops:
    there must be none. (Re-queues from an incarnation that died with its process, a
    kill, or before its scale-down began, are not the autoscaler's.)"""
    stops, _ = _stops(records, decisions)
    by_agent: dict[str, list[_Stop]] = defaultdict(list)
    for stop in stops:
        by_agent[stop.decision.agent_id].append(stop)
    assigned: dict[str, tuple[str, float]] = {}  # task -> (agent, when) of its last assignment
    out = []
    for r in records:
        e = r.item
        if isinstance(e, TaskAssigned):
            assigned[e.task_id] = (e.agent_id, r.at)
        elif isinstance(e, TaskRequeued) and e.reason in ("handed_back", "agent_lost"):
            agent, at = assigned.get(e.task_id, ("", r.at))
            if e.agent_id and e.agent_id != agent:
                agent, at = e.agent_id, r.at
            for stop in by_agent.get(agent, ()):
                if stop.span.start <= at < stop.span.end and r.at >= stop.drain_at:
                    out.append(f"autoscale: {e.task_id} re-queued ({e.reason}, attempt {e.attempt}) from {agent}, "
                               f"{r.at - stop.drain_at:.2f}s after the autoscaler began to scale it down")
                    break
    return out


def drained_before_stopped(records: Sequence[LogRecord], decisions: Iterable[Decision]) -> list[str]:
    """Every agent a ``cluster.scaled_down`` names was drained before it stopped: in the
    incarnation it ended, ``agent.maintenance_started``, no task started after it, then
    ``agent.offline`` (reason ``shutdown``), both before the decision was recorded."""
    stops, out = _stops(records, decisions)
    for stop in stops:
        aid, mine = stop.decision.agent_id, stop.events
        drained = next((i for i, r in enumerate(mine) if isinstance(r.item, AgentMaintenanceStarted)), None)
        offline = next((i for i, r in enumerate(mine) if isinstance(r.item, AgentWentOffline)), None)
        if drained is None:
            out.append(f"autoscale: {aid} scaled down without being drained (no agent.maintenance_started)")
        elif offline is None or offline < drained or mine[offline].item.reason != "shutdown":
            why = "never went offline" if offline is None else \
                f"went offline ({mine[offline].item.reason}) " + ("before it was drained" if offline < drained else "")
            out.append(f"autoscale: {aid} scaled down but {why.strip()}")
        elif any(isinstance(r.item, AgentTaskStarted) for r in mine[drained:offline]):
            out.append(f"autoscale: {aid} started a task while it was being drained")
    return out


class Figures(msgspec.Struct, kw_only=True):
    """Seconds, from the log and the decisions (None: it did not happen)."""

    first_up: float | None  # burst -> first scale-up
    peak: int  # most agents at once
    all_up: float | None  # burst -> the last task's pull request up
    down_after: float | None  # that -> the fleet back at the minimum
    burst_to_min: float | None  # burst -> the fleet back at the minimum

    def note(self, bounds: tuple[int, int], cooldowns: tuple[float, float]) -> str:
        def s(v: float | None) -> str:
            return "never" if v is None else f"{v:.1f}s"
        return (f"figures: first scale-up {s(self.first_up)} after the burst; peak {self.peak} agents "
                f"(max {bounds[1]}); last pull request up {s(self.all_up)} after the burst; fleet back to "
                f"{bounds[0]} {s(self.down_after)} after that; burst -> scaled down {s(self.burst_to_min)} "
                f"(cool-downs up {cooldowns[0]:g}s, down {cooldowns[1]:g}s)")


def last_pr_up(records: Iterable[LogRecord], prefix: str, task_ids: Iterable[str]) -> float | None:
    """When the last of ``task_ids`` (last) got its pull request up (None: one never did)."""
    model = ReadModel(prefix)
    wanted = set(task_ids)
    up_at: dict[str, float] = {}
    for r in records:
        model.apply(r.seq, r.item)
        tid = getattr(r.item, "task_id", None)
        if isinstance(r.item, TaskEventBase) and tid in wanted:
            state = model.tasks.get(tid)
            if state is not None and state.status in PR_UP:
                up_at.setdefault(tid, r.at)
            else:
                up_at.pop(tid, None)  # back out of review (a fix round): not up until it is again
    if not wanted or set(up_at) != wanted:
        return None
    return max(up_at.values())


class AutoscaleVerdict(msgspec.Struct, kw_only=True):
    figures: Figures
    ups: int
    downs: int
    violations: list[str]


def check_autoscale(records: Sequence[LogRecord], decisions: Sequence[Decision], *, bounds: tuple[int, int],
                    burst_at: float, task_ids: Iterable[str], prefix: str, resets: Sequence[float] = (),
                    allowed_ids: Iterable[str] = ()) -> AutoscaleVerdict:
    """The scenario's expectations of the fleet (see the module's docstring)."""
    lo, hi = bounds
    points, out = fleet_sizes(decisions, resets)
    allowed = set(allowed_ids)
    ups = [p for p in points if isinstance(p.decision, ClusterScaledUp)]
    downs = [p for p in points if isinstance(p.decision, ClusterScaledDown)]
    for p in points:
        d = p.decision
        if d.outcome != "done":
            out.append(f"autoscale: {d.event_id}: {d.outcome}")
        if not d.reason.strip():
            out.append(f"autoscale: {d.event_id} gives no reason")
        if allowed and d.agent_id not in allowed:
            out.append(f"autoscale: {d.event_id} names {d.agent_id}, not an id the autoscaler may use")
        if p.size > hi:
            out.append(f"autoscale: {p.size} agents after {d.event_id}, above the maximum of {hi}")
    done_ups = [p for p in ups if p.decision.outcome == "done"]
    if len(done_ups) < 2:
        out.append(f"autoscale: the burst scaled the fleet up {len(done_ups)} time(s); expected at least 2")
    done = last_pr_up(records, prefix, task_ids)
    since_reset = [p for p in points if not resets or p.at > max(resets)]
    final = since_reset[-1] if since_reset else None
    back = final is not None and isinstance(final.decision, ClusterScaledDown) and final.size == lo
    if not back:
        size = final.size if final is not None else 0
        out.append(f"autoscale: the fleet ended at {size} agent(s)"
                   + ("" if final is None else f" after {final.decision.__struct_config__.tag}")
                   + f", not scaled back down to {lo}")
    elif done is not None and final.at < done:
        out.append(f"autoscale: the fleet was back at {lo} {done - final.at:.1f}s before the last pull request "
                   "was up")
    out += drained_before_stopped(records, decisions)
    out += scale_down_requeues(records, decisions)
    first_up = next((p.at for p in done_ups if p.at >= burst_at), None)
    down_at = final.at if back and final is not None else None
    figures = Figures(
        first_up=None if first_up is None else first_up - burst_at,
        peak=max((p.size for p in points), default=0),
        all_up=None if done is None else done - burst_at,
        down_after=None if down_at is None or done is None else down_at - done,
        burst_to_min=None if down_at is None else down_at - burst_at)
    return AutoscaleVerdict(figures=figures, ups=len(ups), downs=len(downs), violations=out)


def back_at_min(decisions: Sequence[Decision], lo: int, resets: Sequence[float] = ()) -> bool:
    """Has the fleet (replayed) come back to ``lo`` by a scale-down, after the last reset?"""
    points, _ = fleet_sizes(decisions, resets)
    last = [p for p in points if not resets or p.at > max(resets)]
    return bool(last) and isinstance(last[-1].decision, ClusterScaledDown) and last[-1].size == lo


# -- the run -------------------------------------------------------------------------------------
async def autoscale(sb: Sandbox, run: int) -> RunResult:
    """One run: a server, ``ccc up --agents 0 --autoscale`` as a process, the burst, the
    kill; done when every task's pull request is up and the fleet is back at the minimum."""
    quick = sb.options.quick
    bounds = (MIN_AGENTS, max_agents(quick))
    cooldowns = (COOLDOWN_UP, COOLDOWN_DOWN)
    timeout = sb.options.run_timeout or (150.0 if quick else 420.0)
    sec = sb.security
    server = sb.embedded_server()
    nc: Client | None = None
    try:
        url = await asyncio.to_thread(server.start)
        nc, refused = await sb.open_bus(url)
        ids = agent_ids(AutoscalePolicy(min_agents=bounds[0], max_agents=bounds[1], specialties=(SPECIALTY,)),
                        (SPECIALTY,))
        if sec is not None:  # every id the autoscaler may use, before it runs (ccc up does this itself only
            for agent_id in ids:  # for the server it embeds; here the server is the harness's)
                await sec.register_agent(nc, url, agent_id, replicas=1, reload=server.reload)
        proc = sb.autoscaling_coordinator(COORDINATOR, url, bounds=bounds, specialty=SPECIALTY,
                                          cooldown_up=cooldowns[0], cooldown_down=cooldowns[1])
        await sb.start(proc.name)
        tracker = Tracker(nc, sb.ns)
        tracker.start()
        fleet = FleetWatch(nc, sb.ns)
        fleet.start()
        world = World(sb, nc, url, tracker)
        world.server = server
        kills: list[float] = []
        await sb.publish_issues(nc, list(range(1, sb.options.n_tasks + 1)))
        burst_at = max(sb.published.values())
        injector = asyncio.create_task(kill_up_mid_burst(world, fleet, kills))
        done = lambda: (tracker.all_in(sb.issues) and injector.done()
                        and back_at_min(fleet.decisions, bounds[0], kills))
        stuck = lambda: injector.done() and tracker.quiet_for() > sb.options.stall
        await tracker.wait(lambda: done() or stuck(), timeout)
        finished = done()
        f = world.fault
        f.violations += refused
        note_run_end(sb, f, tracker, injector, refused=refused, secure=sec is not None, cluster=False,
                     finished=finished, stuck=stuck(), timeout=timeout, wanted=PR_UP,
                     what="no pull request up or the fleet not back at the minimum")
        if not finished:
            f.notes.append(f"fleet at the end: {[p.size for p in fleet_sizes(fleet.decisions, kills)[0]][-5:]}")
        await tracker.stop()
        await fleet.stop()
        f.end = time.time()
        f.notes += await sb.close(keep_servers=True)
        f.violations += sb.denials()
        records = await read_log(nc, sb.ns)
        decisions, bad = await read_decisions(nc, sb.ns)
        verdict = check_autoscale(records, decisions, bounds=bounds, burst_at=burst_at, task_ids=sb.issues,
                                  prefix=sb.ns.prefix, resets=kills, allowed_ids=ids)
        f.notes.insert(0, verdict.figures.note(bounds, cooldowns))
        f.notes.insert(1, f"decisions: {verdict.ups} scale-up(s), {verdict.downs} scale-down(s)"
                          + (f"; ccc up killed {len(kills)} time(s), the fleet with it" if kills else ""))
        f.checks.append(lambda recs: forge_holds_the_pr(sb.forge, recs, sb.ns.prefix))
        f.checks.append(lambda recs: bad + verdict.violations)
        return judge(sb, run, "autoscale", records, f, tracker.seen)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        server.stop()


# -- the fault --------------------------------------------------------------------------------
async def kill_up_mid_burst(w: World, fleet: FleetWatch, kills: list[float]) -> None:
    """SIGKILL the whole ``ccc up`` once the fleet has grown to two and a task is in
    progress (while the burst is still queued, if it still is), then start it again."""
    proc = w.sb.procs[COORDINATOR]

    def ready() -> bool:  # grown, working, and more to do: the next fleet has to grow again
        points, _ = fleet_sizes(fleet.decisions)
        grown = bool(points) and points[-1].size >= 2
        queued = any(s.status == "queued" for s in w.tracker.model.tasks.values())
        return grown and queued and any(st == "in_progress" for _, _, st in w.tracker.in_flight())

    if not await w.tracker.wait(ready, WAIT):
        if not any(s.status == "queued" for s in w.tracker.model.tasks.values()):
            w.fault.notes.append("no kill: the queue was empty before the fleet had grown to two")
        else:
            w.fault.violations.append(f"scenario: the fleet did not grow to two with work in progress in {WAIT:.0f}s")
        return
    await asyncio.sleep(w.rng.uniform(0.2, 1.0))
    tasks = w.tracker.model.tasks
    held: dict[str, dict[str, int]] = defaultdict(dict)  # agent -> {task: attempt}
    for tid, s in tasks.items():
        if s.status in WITH_AGENT and s.agent_id:
            held[s.agent_id][tid] = s.attempt
    queued = sum(1 for s in tasks.values() if s.status == "queued")
    proc.kill()
    t_kill = time.time()
    kills.append(t_kill)
    w.fault.count += 1
    everything = {t: a for h in held.values() for t, a in h.items()}
    w.fault.marks.append(_taken_back_mark(w, everything, t_kill))
    for agent, h in held.items():
        w.fault.checks.append(finished_by_other(h, agent, t_kill))
    await asyncio.sleep(w.rng.uniform(0.1, 1.0))
    proc.start()
    up = await proc.wait_for_output(READY["up"], 60)
    w.fault.notes.append(f"ccc up SIGKILLed with {len(held)} agent(s) holding {len(everything)} task(s), "
                         f"{queued} queued; up again {up - t_kill:.2f}s after the kill")


def _taken_back_mark(w: World, held: dict[str, int], t_kill: float) -> Mark:
    """Kill -> the last of the tasks the killed agents held re-queued (tasks whose pull
    request the restarted coordinator recorded from a report made before the kill are
    not taken back, and not counted)."""
    def mark(records: list[LogRecord]) -> float | None:
        delays = []
        for tid in held:
            at = next((r.at for r in records if r.at >= t_kill and isinstance(r.item, TaskRequeued)
                       and r.item.task_id == tid), None)
            if at is not None:
                delays.append(at - t_kill)
        if not delays:
            return None
        worst = max(delays)
        w.fault.notes.append(f"recovery: ccc up killed -> {len(delays)} of the {len(held)} task(s) its agents "
                             f"held re-queued, the last after {worst:.2f}s")
        return worst
    return mark
