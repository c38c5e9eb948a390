"""The scenarios of ``ccc chaos``. Each run: start a server (or a 3-node cluster), a
coordinator and agents as real processes, publish N issues at once, inject the fault
while they are in flight, wait (bounded) until every task is in review, stop the
actors, then judge the run from the event log (:func:`infra.chaos_checks.check_log`)
plus the scenario's own expectations.

Recovery times (from the log's append timestamps; the fault's moment from the
harness's wall clock, same host):

* coordinator      restarted coordinator up (it printed "is up") -> next task event
* agent            agent SIGKILLed -> its task re-queued (includes the heartbeat timeout)
* nats-restart     nats-server back (listening) -> next event appended
* cluster          stream leader SIGKILLed -> next event appended (after the election)
* graceful         agent SIGTERMed -> its task re-queued (handed back)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
from nats.aio.client import Client

from events.agent import AgentEventBase, AgentRegistered, AgentTaskReleased, AgentWentOffline
from events.dead_letter import dead_letter_decoder
from events.subjects import repo_token
from events.task_state import WITH_AGENT

from .chaos import (
    _READY,
    CCC,
    REPO,
    REPO_FILES,
    Proc,
    RunResult,
    Sandbox,
    Tracker,
    _ps,
    clean_env,
    processes_under,
)
from .chaos_checks import (
    Check,
    LogRecord,
    Mark,
    check_log,
    coordinator_recovery,
    finished_by_other,
    first_after,
    forge_holds_the_pr,
    read_log,
    requeued_mark,
    since,
)
from .forge_local import LocalForge
from .nats_cluster import NatsCluster, wait_for_jetstream, wait_for_leader
from .nats_conn import connect
from .nats_server import EmbeddedServer
from .provision import provision


class Fault:
    """What a fault injector reports back: how many faults, how to read each recovery
    time from the log, and extra checks over the log."""

    def __init__(self) -> None:
        self.count = 0
        self.marks: list[Mark] = []
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.violations: list[str] = []
        self.injected: set[int] = set()  # poison written to the events stream on purpose
        self.end: float | None = None  # when the harness began stopping the actors


class World:
    def __init__(self, sb: Sandbox, nc: Client, url: str, tracker: Tracker) -> None:
        self.sb, self.nc, self.url, self.tracker = sb, nc, url, tracker
        self.rng = sb.rng
        self.fault = Fault()
        self.server: EmbeddedServer | None = None
        self.cluster: NatsCluster | None = None

    @property
    def quick(self) -> bool:
        return self.sb.options.quick

    def done(self) -> bool:
        return self.tracker.all_in(self.sb.issues)


async def standard_run(
    sb: Sandbox, run: int, name: str, *, fault: Callable[[World], Awaitable[None]] | None = None,
    cluster: bool = False, coordinators: int = 1, agents: int | None = None, capacity: int | None = None,
    copies: int = 1, agent_grace: float = 0.5, heartbeat_timeout: float | None = None,
) -> RunResult:
    if heartbeat_timeout is not None:
        sb.options = _with(sb.options, heartbeat_timeout=heartbeat_timeout)
    server: EmbeddedServer | None = None
    nodes: NatsCluster | None = None
    nc: Client | None = None
    try:
        if cluster:
            nodes = NatsCluster(sb.root / "nats", name="ccc-chaos")
            url = await asyncio.to_thread(nodes.start)
            sb.env["CCC_REPLICAS"] = "3"  # every process provisions: all must ask for R3
        else:
            server = EmbeddedServer(sb.root / "nats", sync_interval="always", name="chaos")
            url = await asyncio.to_thread(server.start)
        nc = await connect(url, name="ccc-chaos", quiet=True)
        if cluster:
            await wait_for_jetstream(nc)
        await provision(nc, sb.ns, replicas=3 if cluster else 1)
        names = [sb.coordinator(f"coordinator-{i + 1}", url).name for i in range(coordinators)]
        names += [sb.agent(f"agent-{i + 1}", url, capacity=capacity, grace=agent_grace).name
                  for i in range(agents or sb.options.agents)]
        await sb.start(*names)
        tracker = Tracker(nc, sb.ns)
        tracker.start()
        world = World(sb, nc, url, tracker)
        world.server, world.cluster = server, nodes
        await sb.publish_issues(nc, list(range(1, sb.options.n_tasks + 1)), copies=copies)
        injector = asyncio.create_task(fault(world)) if fault is not None else None
        injected = lambda: injector is None or injector.done()
        stuck = lambda: injected() and tracker.quiet_for() > sb.options.stall
        await tracker.wait(lambda: (world.done() and injected()) or stuck(), sb.options.timeout)
        finished = world.done() and injected()
        f = world.fault
        if injector is not None:
            if not injector.done():
                injector.cancel()
                f.violations.append("harness: the fault injector was still running at the timeout")
            elif injector.exception() is not None:
                e = injector.exception()
                f.violations.append(f"harness: fault injection failed: {type(e).__name__}: {e}")
        if not finished:
            left = {t: s for t, s in tracker.statuses(sb.issues).items() if s not in ("review", "completed")}
            why = f"no event for {sb.options.stall:.0f}s" if stuck() else f"timed out after {sb.options.timeout:.0f}s"
            f.notes.append(f"{why}; not in review: {left}")
        await tracker.stop()
        f.end = time.time()  # events after this are the shutdown's, not a recovery
        f.notes += await sb.close(keep_servers=True)
        records = await read_log(nc, sb.ns)
        f.checks.append(lambda recs: forge_holds_the_pr(sb.forge, recs, sb.ns.prefix))
        return judge(sb, run, name, records, f, tracker.seen)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        if server is not None:
            server.stop()
        if nodes is not None:
            nodes.stop()


def judge(sb: Sandbox, run: int, name: str, records: list[LogRecord], f: Fault, seen: dict[int, str | None],
          expected_final=("review", "completed"), issues: dict[str, tuple[str, int]] | None = None) -> RunResult:
    verdict = check_log(records, sb.issues if issues is None else issues, expected_final=expected_final,
                        injected_bad=f.injected,
                        prefix=sb.ns.prefix)
    violations = list(verdict.violations) + f.violations
    other = verdict.illegal + len(f.violations)
    # nothing the tracker saw (acknowledged, committed) may be missing from the final log
    final = {r.seq: getattr(r.item, "event_id", None) for r in records}
    vanished = [s for s, eid in seen.items() if final.get(s, "missing") != eid]
    if vanished:
        violations.append(f"lost: {len(vanished)} events seen during the run are not in the final log "
                          f"(first seqs {vanished[:5]})")
    for check in f.checks:
        found = check(records)
        other += len(found)
        violations += found
    recoveries = []
    during = [r for r in records if f.end is None or r.at < f.end]
    for mark in f.marks:
        r = mark(during)
        if r is None:
            f.notes.append("a fault had no measurable recovery (no event after it before the run ended)")
        else:
            recoveries.append(round(r, 3))
    return RunResult(
        scenario=name, run=run, tasks=verdict.tasks, lost=verdict.lost + len(vanished),
        duplicated=verdict.duplicated, other=other, recoveries=recoveries, faults=f.count,
        final_states=verdict.final_states, notes=f.notes, violations=violations[:100],
    )


# -- helpers for injectors ---------------------------------------------------------------
async def busy_agent(w: World, exclude: tuple[str, ...] = (), status: str = "in_progress",
                     timeout: float = 60.0) -> tuple[str, dict[str, int]]:
    """An agent working on a task (in ``status``): its id and {task: attempt} it holds."""
    found: list[str] = []

    def pick() -> bool:
        for _, agent, st in w.tracker.in_flight():
            if st == status and agent not in exclude and agent in w.sb.procs:
                found.append(agent)
                return True
        return False

    if not await w.tracker.wait(pick, timeout):
        raise TimeoutError(f"no agent had a task {status} within {timeout}s")
    agent = found[0]
    held = {t: s.attempt for t, s in w.tracker.model.tasks.items() if s.agent_id == agent and s.status in WITH_AGENT}
    return agent, held


def offline(w: World, agent: str) -> bool:
    a = w.tracker.model.agents.get(agent)
    return a is not None and a.status == "offline"


def taken_by_other(w: World, held: dict[str, int], agent: str) -> bool:
    """Every task ``agent`` held is done or, in a later attempt, with another agent."""
    tasks = w.tracker.model.tasks
    return all(tasks[t].status in ("review", "completed")
               or (tasks[t].attempt > a and tasks[t].agent_id not in (None, agent)) for t, a in held.items())


# -- 1. coordinator killed ------------------------------------------------------------------
async def kill_coordinator(w: World) -> None:
    proc = w.sb.procs["coordinator-1"]
    pending: list[tuple[float, float]] = []  # (spawn, up) of the incarnation still alive
    for k in range(2 if w.quick else 3):
        await asyncio.sleep(w.rng.uniform(0.3, 2.0))
        if w.done():
            w.fault.notes.append(f"every task was in review before kill {k + 1}")
            break
        proc.kill()
        t_kill = time.time()
        w.fault.count += 1
        if pending:
            spawn, up = pending.pop()
            w.fault.marks.append(_coordinator_mark(w, spawn, up, t_kill))
        await asyncio.sleep(w.rng.uniform(0.1, 1.0))
        proc.start()
        up = await proc.wait_for_output(_READY["up"], 60)
        pending.append((proc.started_at, up))
        w.fault.notes.append(f"restart {k + 1}: up {up - proc.started_at:.2f}s after spawn")
    for spawn, up in pending:
        w.fault.marks.append(_coordinator_mark(w, spawn, up, None))


def _coordinator_mark(w: World, spawn: float, up: float, end: float | None) -> Mark:
    inputs = dict(w.sb.published)
    return lambda recs: coordinator_recovery(recs, inputs, spawn, up, end, w.fault.notes)


# -- 2. agent killed (and one stalled) --------------------------------------------------------
async def kill_agent(w: World) -> None:
    hb = w.sb.options.heartbeat_timeout
    victim, held = await busy_agent(w)
    proc = w.sb.procs[victim]
    proc.kill()
    t_kill = time.time()
    w.fault.count += 1
    w.fault.marks.append(requeued_mark(held, t_kill, "agent_lost"))
    w.fault.checks.append(finished_by_other(held, victim, t_kill))
    if not await w.tracker.wait(lambda: offline(w, victim) and taken_by_other(w, held, victim), hb * 5 + 20):
        w.fault.violations.append(f"scenario: {sorted(held)} of killed {victim} not given to another agent in time")
        return
    # a stalled agent (SIGSTOP) is the one that can really report stale work: it
    # resumes believing it still holds its task, after the task was given to another
    stalled, stalled_held = await busy_agent(w, exclude=(victim,))
    paused = w.sb.procs[stalled]
    paused.signal(signal.SIGSTOP, group=True)
    w.fault.count += 1
    t_stop = time.time()
    w.fault.marks.append(requeued_mark(stalled_held, t_stop, "agent_lost"))
    w.fault.checks.append(finished_by_other(stalled_held, stalled, t_stop))
    try:
        await w.tracker.wait(lambda: offline(w, stalled) and taken_by_other(w, stalled_held, stalled), hb * 5 + 20)
    finally:
        paused.signal(signal.SIGCONT, group=True)
    proc.start()  # the killed agent comes back with the same id
    await proc.wait_for_output(_READY["agent"], 60)

    def came_back(records: list[LogRecord]) -> list[str]:
        out = []
        for agent, t in ((victim, t_kill), (stalled, t_stop)):
            after = [r.item for r in records if r.at >= t and isinstance(r.item, AgentEventBase)
                     and r.item.agent_id == agent]
            if not any(isinstance(e, AgentWentOffline) for e in after):
                out.append(f"scenario: {agent} was never declared offline")
            if not any(isinstance(e, AgentRegistered) for e in after):
                out.append(f"scenario: {agent} did not register again after it came back")
        return out
    w.fault.checks.append(came_back)
    w.fault.notes.append(f"killed {victim} holding {sorted(held)}; stalled {stalled} holding {sorted(stalled_held)}")


# -- 4. nats-server killed and restarted ------------------------------------------------------
async def restart_nats(w: World) -> None:
    assert w.server is not None
    for k in range(1 if w.quick else 2):
        await asyncio.sleep(w.rng.uniform(0.5, 2.5))
        if w.done():
            w.fault.notes.append(f"every task was in review before restart {k + 1}")
            break
        w.server.kill()
        w.fault.count += 1
        t_kill = time.time()
        await asyncio.sleep(w.rng.uniform(0.3, 1.0))
        await asyncio.to_thread(w.server.start)  # same port, same store dir
        t_up = time.time()
        w.fault.notes.append(f"restart {k + 1}: down {t_up - t_kill:.2f}s")
        w.fault.marks.append(lambda recs, k0=t_kill, u=t_up: since(first_after(recs, k0), u))


# -- 5. stream leader of a 3-node cluster killed --------------------------------------------------
async def kill_leader(w: World) -> None:
    assert w.cluster is not None
    stream = w.sb.ns.events_stream
    await asyncio.sleep(w.rng.uniform(1.0, 3.0))
    leader = await wait_for_leader(w.nc, stream, timeout=20)
    w.cluster.kill(leader)
    w.fault.count += 1
    t_kill = time.time()
    w.fault.marks.append(lambda recs: since(first_after(recs, t_kill), t_kill))
    new = await wait_for_leader(w.nc, stream, not_=leader, timeout=60)
    w.fault.notes.append(f"killed leader {leader}; new leader {new} after {time.time() - t_kill:.2f}s")
    await asyncio.sleep(2.0)
    await asyncio.to_thread(w.cluster.start_node, leader)  # it rejoins and catches up


# -- 6. duplicates and poison ------------------------------------------------------------------------
def poison_payloads(subject_kind: str) -> dict[str, bytes]:
    wrong = {"issue": {"type": "issue.opened", "event_id": "poison", "repo": 12, "number": "x"},
             "agent": {"type": "agent.task_started", "agent_id": "agent-1", "version": "one"},
             "task": {"type": "task.assigned", "task_id": "t", "version": "one", "agent_id": 3}}
    return {
        "not-json": b"\x00\xffthis is not json{",
        "unknown-type": json.dumps({"type": f"{subject_kind}.exploded", "event_id": "poison"}).encode(),
        "wrong-fields": json.dumps(wrong.get(subject_kind, wrong["task"])).encode(),
        "oversize": b'{"type":"agent.registered","pad":"' + b"x" * 300_000 + b'"}',
    }


async def read_dead_letters(nc: Client, stream: str) -> list:
    js = nc.jetstream(timeout=5.0)
    info = await js.stream_info(stream)
    letters = []
    for seq in range(info.state.first_seq or 1, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            letters.append(dead_letter_decoder.decode((await js.get_msg(stream, seq)).data))
    return letters


async def poison(w: World) -> None:
    ns, js = w.sb.ns, w.nc.jetstream(timeout=10.0)
    agent, held = await busy_agent(w)
    in_flight = [t for t, _, _ in w.tracker.in_flight()]
    tid_assigned = next(iter(held))
    tid_cancel = next((t for t in in_flight if t != tid_assigned), tid_assigned)
    targets = {  # subject -> (kind, consumed by a durable consumer that dead-letters)
        ns.subject(f"issue.local.{repo_token(REPO)}.1.opened"): ("issue", True),
        ns.subject(f"agent.{agent}.task_started"): ("agent", True),
        ns.subject(f"task.{tid_assigned}.assigned.{agent}"): ("task", True),
        ns.subject(f"task.{tid_cancel}.cancel_requested"): ("task", False),
        ns.subject(f"hb.{agent}"): ("hb", False),
    }
    expected: set[tuple[str, int]] = set()
    for subject, (kind, durable) in targets.items():
        for payload in poison_payloads(kind).values():
            ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": f"poison-{uuid.uuid4().hex}"})
            w.fault.count += 1
            if ack.stream == ns.events_stream:
                w.fault.injected.add(ack.seq)
            if durable:
                expected.add((ack.stream, ack.seq))
    w.fault.notes.append(f"{w.fault.count} poison messages ({len(expected)} on durable-consumed subjects: "
                         f"{agent}, assigned {tid_assigned}, cancel {tid_cancel})")
    # leave time to look at the letters, and do not wait for tasks that are stuck
    await w.tracker.wait(lambda: w.done() or w.tracker.quiet_for() > w.sb.options.stall,
                         w.sb.options.timeout * 0.6)
    letters: list = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        letters = await read_dead_letters(w.nc, ns.dlq_stream)
        if expected <= {(d.stream, d.seq) for d in letters}:
            break
        await asyncio.sleep(0.5)
    parked = {(d.stream, d.seq) for d in letters}
    for stream, seq in sorted(expected - parked):
        w.fault.violations.append(f"poison: {stream} seq {seq} was not dead-lettered")
    for d in letters:
        if (d.stream, d.seq) not in expected:
            w.fault.violations.append(f"poison: unexpected dead letter {d.stream}:{d.seq} {d.subject} "
                                      f"{d.reason}: {d.error[:100]}")
    listed = await asyncio.to_thread(_cli_dead_letters, w)
    if listed != len(letters):
        w.fault.violations.append(f"poison: `ccc dead-letters --json` listed {listed}, the stream has {len(letters)}")
    w.fault.notes.append(f"dead letters: {len(letters)} parked, {len(expected)} expected, CLI lists {listed}")


def _cli_dead_letters(w: World) -> int:
    result = subprocess.run(
        [*CCC, "--nats-url", w.url, "--namespace", w.sb.ns.prefix, "--data-dir", str(w.sb.root / "cli"),
         "dead-letters", "--json"], check=False, env=clean_env(w.sb.env), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return -1
    return sum(1 for line in result.stdout.splitlines() if line.strip())


# -- 7. graceful shutdown -----------------------------------------------------------------------------
async def sigterm_agent(w: World) -> None:
    victim, held = await busy_agent(w)
    proc = w.sb.procs[victim]
    proc.signal(signal.SIGTERM)
    t_term = time.time()
    w.fault.count += 1
    code = await asyncio.to_thread(proc.proc.wait, 30) if proc.proc is not None else None
    if code != 0:
        w.fault.violations.append(f"graceful: {victim} exited with {code} after SIGTERM")
    w.fault.marks.append(requeued_mark(held, t_term, "handed_back"))
    w.fault.checks.append(finished_by_other(held, victim, t_term))

    def handed_back(records: list[LogRecord]) -> list[str]:
        out = []
        mine = [r.item for r in records if r.at >= t_term and isinstance(r.item, AgentEventBase)
                and r.item.agent_id == victim]
        released = {e.task_id: e.outcome for e in mine if isinstance(e, AgentTaskReleased)}
        for tid in held:
            if released.get(tid) not in ("handed_back", "done"):
                out.append(f"graceful: {victim} did not hand back {tid} (released: {released.get(tid)})")
        if not mine or not isinstance(mine[-1], AgentWentOffline) or mine[-1].reason != "shutdown":
            out.append(f"graceful: {victim}'s last event is not agent.offline(shutdown): "
                       f"{mine[-1].__struct_config__.tag if mine else None}")
        return out
    w.fault.checks.append(handed_back)
    w.fault.notes.append(f"SIGTERM {victim} holding {sorted(held)}")


async def graceful(sb: Sandbox, run: int) -> RunResult:
    sb.options = _with(sb.options, work_seconds=max(sb.options.work_seconds, 3.0))
    result = await standard_run(sb, run, "graceful", fault=sigterm_agent, agent_grace=0.2)
    orphans = await up_leaves_no_orphans(sb)
    result.tasks += orphans.tasks
    result.lost += orphans.lost
    result.duplicated += orphans.duplicated
    result.other += orphans.other
    result.faults += orphans.faults
    result.notes += orphans.notes
    result.violations += orphans.violations
    return result


def _with(options, **changes):
    return msgspec.structs.replace(options, **changes)


def _tree(root_pid: int) -> set[int]:
    rows = _ps()
    found, frontier = set(), {root_pid}
    while frontier:
        frontier = {p for p, pp, _ in rows if pp in frontier and p not in found}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def up_leaves_no_orphans(sb: Sandbox) -> RunResult:
    """SIGTERM to a whole ``ccc up`` (embedded server, coordinator, 2 agents) with tasks
    in flight: it must exit 0 and leave no process behind, with its tasks handed back."""
    data = sb.root / "up"
    LocalForge(data / "forge").create_repo(REPO, REPO_FILES)
    proc = Proc("up", [*CCC, "--data-dir", str(data), "--namespace", sb.ns.prefix, "--log-level", "info", "up",
                       "--agents", "2", "--specialties", "backend", "--no-api", "--script-dir", str(sb.scripts),
                       "--heartbeat-timeout", "2", "--shutdown-grace", "0.2"], sb.logs, clean_env())
    sb.procs["up"] = proc
    proc.start()
    await proc.wait_for_output(_READY["up"], 60)
    url = (data / "nats.url").read_text().strip()
    nc = await connect(url, name="ccc-chaos-up", quiet=True)
    numbers = list(range(1001, 1005))
    f = Fault()
    try:
        tracker = Tracker(nc, sb.ns)
        tracker.start()
        await sb.publish_issues(nc, numbers)
        ours = {t: v for t, v in sb.issues.items() if v[1] in numbers}
        if not await tracker.wait(lambda: sum(1 for _, _, s in tracker.in_flight() if s == "in_progress") >= 2, 60):
            f.violations.append("orphans: the tasks never got in progress")
        await tracker.stop()
        tree = _tree(proc.pid or 0)
        proc.signal(signal.SIGTERM)
        f.count += 1
        code = await asyncio.to_thread(proc.proc.wait, 60)
    finally:
        await nc.close()
    await asyncio.sleep(1.0)
    left = [pid for pid in tree if _alive(pid)]
    left += [pid for pid, _, _ in processes_under(data) if pid not in left]
    if code != 0:
        f.violations.append(f"orphans: ccc up exited with {code} after SIGTERM")
    if left:
        f.violations.append(f"orphans: {len(left)} processes left after ccc up exited: {left}")
    f.notes.append(f"ccc up had {len(tree)} descendants; exit {code}; {len(left)} left")
    # the log, read back with a server on the same data dir: nothing may be left held
    server = EmbeddedServer(data, sync_interval="always")
    url = await asyncio.to_thread(server.start)
    try:
        nc = await connect(url, name="ccc-chaos-up-check", quiet=True)
        records = await read_log(nc, sb.ns)
        await nc.close()
    finally:
        server.stop()
    return judge(sb, 0, "graceful", records, f, {}, expected_final=("queued", "review", "completed"),
                 issues=ours)


# -- the table of scenarios --------------------------------------------------------------------------
class Spec(NamedTuple):
    run: Callable[[Sandbox, int], Awaitable[RunResult]]
    quick_runs: int
    full_runs: int
    target: float | None  # seconds, for the worst recovery
    recovery: str
    expected_failure: str = ""


def _standard(name: str, **kw) -> Callable[[Sandbox, int], Awaitable[RunResult]]:
    async def run(sb: Sandbox, i: int) -> RunResult:
        return await standard_run(sb, i, name, **kw)
    return run


# A scenario that fails because of a known bug carries its description in
# ``Spec.expected_failure``: it still counts as a failure (exit 1) and the table says why.
# None does today: the bugs this suite found were fixed (see the README).
SCENARIOS: dict[str, Spec] = {
    "coordinator": Spec(_standard("coordinator", fault=kill_coordinator), 1, 3, 2.0,
                        "restarted coordinator up -> next task event"),
    "agent": Spec(_standard("agent", fault=kill_agent), 1, 2, 3.0,
                  "agent killed/stalled -> its task re-queued (2 s heartbeat timeout included)"),
    "two-coordinators": Spec(_standard("two-coordinators", coordinators=2), 1, 2, None, ""),
    "nats-restart": Spec(_standard("nats-restart", fault=restart_nats), 1, 2, None,
                         "nats-server back -> next event appended"),
    # heartbeat timeout 10s (the `ccc up` default), above the ~5s election stall: with a
    # shorter one every agent is declared lost during the election (see the report)
    "cluster": Spec(_standard("cluster", fault=kill_leader, cluster=True, heartbeat_timeout=10.0), 1, 2, 10.0,
                    "stream leader killed -> next event appended"),
    "duplicates-and-poison": Spec(_standard("duplicates-and-poison", fault=poison, copies=5, agents=2), 1, 1,
                                  None, ""),
    "graceful": Spec(graceful, 1, 1, None, "agent SIGTERMed -> its task re-queued (handed back)"),
}
