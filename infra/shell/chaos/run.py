"""One standard run of a ``ccc chaos`` scenario (:func:`standard_run`): a server (or a
3-node cluster), a coordinator and agents as processes, N issues, the scenario's fault
injected while they are in flight; then the run judged from the log (:func:`judge`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection

import msgspec
from nats.aio.client import Client

from infra.adapters.nats.cluster import NatsCluster
from infra.adapters.nats.server import EmbeddedServer
from infra.shell.chaos.checks import PR_UP, LogRecord, check_log, forge_holds_the_pr, read_log
from infra.shell.chaos.model import Fault, RunResult
from infra.shell.chaos.sandbox import Sandbox, Tracker
from infra.shell.chaos.world import World



def note_run_end(sb: Sandbox, f: Fault, tracker: Tracker, injector: asyncio.Task | None, *,
                 refused: list[str], secure: bool, cluster: bool, finished: bool, stuck: bool,
                 timeout: float, wanted: Collection[str], what: str) -> None:
    """What a run's end says beside the log's judgement: the security it ran with, a fault
    injector that hung or failed, and, if the run did not finish, which tasks were not yet
    in a ``wanted`` state and why it stopped waiting."""
    note = security_note(sb, cluster)
    if secure and not refused:
        note += "; strangers (no certificate, no user, plain text) refused"
    f.notes.append(note)
    if injector is not None:
        if not injector.done():
            injector.cancel()
            f.violations.append("harness: the fault injector was still running at the timeout")
        elif injector.exception() is not None:
            e = injector.exception()
            f.violations.append(f"harness: fault injection failed: {type(e).__name__}: {e}")
    if not finished:
        left = {t: s for t, s in tracker.statuses(sb.issues).items() if s not in wanted}
        why = f"no event for {sb.options.stall:.0f}s" if stuck else f"timed out after {timeout:.0f}s"
        f.notes.append(f"{why}; {what}: {left}")

async def standard_run(
    sb: Sandbox, run: int, name: str, *, fault: Callable[[World], Awaitable[None]] | None = None,
    cluster: bool = False, coordinators: int = 1, agents: int | None = None, capacity: int | None = None,
    copies: int = 1, agent_grace: float = 0.5, heartbeat_timeout: float | None = None,
) -> RunResult:
    if heartbeat_timeout is not None:
        sb.options = msgspec.structs.replace(sb.options, heartbeat_timeout=heartbeat_timeout)
    server: EmbeddedServer | None = None
    nodes: NatsCluster | None = None
    nc: Client | None = None
    sec = sb.security
    secure, js_key = (sec.secure, sec.js_key) if sec is not None else (None, "")
    replicas = 3 if cluster else 1
    try:
        if cluster:
            nodes = NatsCluster(sb.server_dir, name="ccc-chaos", secure=secure, js_key=js_key)
            url = await asyncio.to_thread(nodes.start)
            reload: Callable[[], object] = nodes.reload
            sb.env["CCC_REPLICAS"] = "3"  # whoever provisions (ccc up, as admin) must ask for R3
        else:
            server = sb.embedded_server()
            url = await asyncio.to_thread(server.start)
            reload = server.reload
        nc, refused = await sb.open_bus(url, replicas=replicas, cluster=cluster)
        agent_ids = [f"agent-{i + 1}" for i in range(agents or sb.options.agents)]
        if sec is not None:
            for agent_id in agent_ids:  # added to the running cluster, as `ccc secure add-agent` does
                await sec.register_agent(nc, url, agent_id, replicas=replicas, reload=reload)
        names = [sb.coordinator(f"coordinator-{i + 1}", url).name for i in range(coordinators)]
        names += [sb.agent(agent_id, url, capacity=capacity, grace=agent_grace).name for agent_id in agent_ids]
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
        f.violations += refused
        note_run_end(sb, f, tracker, injector, refused=refused, secure=sec is not None, cluster=cluster,
                     finished=finished, stuck=stuck(), timeout=sb.options.timeout, wanted=PR_UP,
                     what="no pull request up")
        await tracker.stop()
        f.end = time.time()  # events after this are the shutdown's, not a recovery
        f.notes += await sb.close(keep_servers=True)
        f.violations += sb.denials()
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


def security_note(sb: Sandbox, cluster: bool = False) -> str:
    if sb.security is None:
        return "security: OFF (--insecure: no TLS, no users, plain store)"
    return ("security: on (mutual TLS, nkey users with per-role permissions, encrypted store"
            + (", TLS routes" if cluster else "") + ")")


def judge(sb: Sandbox, run: int, name: str, records: list[LogRecord], f: Fault, seen: dict[int, str | None],
          expected_final=PR_UP, issues: dict[str, tuple[str, int]] | None = None) -> RunResult:
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
