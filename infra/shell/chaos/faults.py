"""The fault injectors of ``ccc chaos``: each acts on a running :class:`World`
(kill or restart the coordinator, an agent, the nats-server or the stream leader,
publish poison, SIGTERM an agent) and records in ``w.fault`` how to judge it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
import uuid

from nats.aio.client import Client

from events.agent import AgentEventBase, AgentRegistered, AgentTaskReleased, AgentWentOffline
from events.dead_letter import dead_letter_decoder
from events.subjects import repo_token

from infra.shell.chaos.checks import (
    LogRecord,
    Mark,
    coordinator_recovery,
    finished_by_other,
    first_after,
    requeued_mark,
    since,
)
from infra.adapters.nats.cluster import wait_for_leader
from infra.shell.chaos.processes import CCC, READY, clean_env
from infra.shell.chaos.sandbox import REPO
from infra.shell.chaos.world import World, busy_agent, offline, taken_by_other


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
        up = await proc.wait_for_output(READY["up"], 60)
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
    await proc.wait_for_output(READY["agent"], 60)

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
    # subject -> (kind, who takes it off its durable consumer): "dlq" the coordinator,
    # which parks it as a dead letter; "agent" the agent, whose credentials may not write
    # dead letters (it logs actor.message_dropped and terms it; the original stays in
    # the log, where `ccc bad-events` finds it); None: no durable consumer reads it
    targets = {
        ns.subject(f"issue.local.{repo_token(REPO)}.1.opened"): ("issue", "dlq"),
        ns.subject(f"agent.{agent}.task_started"): ("agent", "dlq"),
        ns.subject(f"task.{tid_assigned}.assigned.{agent}"): ("task", "agent"),
        ns.subject(f"task.{tid_cancel}.cancel_requested"): ("task", None),
        ns.subject(f"hb.{agent}"): ("hb", None),
    }
    expected: set[tuple[str, int]] = set()
    dropped: set[tuple[str, int]] = set()
    for subject, (kind, handler) in targets.items():
        for payload in poison_payloads(kind).values():
            ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": f"poison-{uuid.uuid4().hex}"})
            w.fault.count += 1
            if ack.stream == ns.events_stream:
                w.fault.injected.add(ack.seq)
            if handler == "dlq":
                expected.add((ack.stream, ack.seq))
            elif handler == "agent":
                dropped.add((ack.stream, ack.seq))
    w.fault.notes.append(f"{w.fault.count} poison messages ({len(expected)} for the coordinator to dead-letter, "
                         f"{len(dropped)} for {agent} to drop: {agent}, assigned {tid_assigned}, "
                         f"cancel {tid_cancel})")
    # leave time to look at the letters, and do not wait for tasks that are stuck
    await w.tracker.wait(lambda: w.done() or w.tracker.quiet_for() > w.sb.options.stall,
                         w.sb.options.timeout * 0.6)
    letters: list = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        letters = await read_dead_letters(w.nc, ns.dlq_stream)
        if expected <= {(d.stream, d.seq) for d in letters} and dropped <= _dropped_by(w, agent):
            break
        await asyncio.sleep(0.5)
    parked = {(d.stream, d.seq) for d in letters}
    for stream, seq in sorted(expected - parked):
        w.fault.violations.append(f"poison: {stream} seq {seq} was not dead-lettered")
    logged = _dropped_by(w, agent)
    for stream, seq in sorted(dropped - logged):
        w.fault.violations.append(f"poison: {agent} did not drop {stream} seq {seq} (no actor.message_dropped)")
    for d in letters:
        if (d.stream, d.seq) not in expected:
            w.fault.violations.append(f"poison: unexpected dead letter {d.stream}:{d.seq} {d.subject} "
                                      f"{d.reason}: {d.error[:100]}")
    listed = await asyncio.to_thread(_cli_dead_letters, w)
    if listed != len(letters):
        w.fault.violations.append(f"poison: `ccc dead-letters --json` listed {listed}, the stream has {len(letters)}")
    w.fault.notes.append(f"dead letters: {len(letters)} parked, {len(expected)} expected, CLI lists {listed}; "
                         f"{len(dropped & logged)} of {len(dropped)} dropped by {agent}")


def _dropped_by(w: World, agent: str) -> set[tuple[str, int]]:
    """(stream, seq) of every message ``agent`` logged as dropped (``actor.message_dropped``,
    JSON log lines on its stderr)."""
    out = set()
    try:
        lines = w.sb.procs[agent].err_path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if "actor.message_dropped" not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            rec = json.loads(line)
            out.add((rec["stream"], int(rec["seq"])))
    return out


def _cli_dead_letters(w: World) -> int:
    creds = w.sb.security.creds_args("cli") if w.sb.security is not None else []  # reads everything, writes none
    result = subprocess.run(
        [*CCC, "--nats-url", w.url, "--namespace", w.sb.ns.prefix, "--data-dir", str(w.sb.root / "cli"), *creds,
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
