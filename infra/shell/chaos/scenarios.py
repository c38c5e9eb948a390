"""The scenarios of ``ccc chaos``. Each run: start a server (or a 3-node cluster), a
coordinator and agents as real processes, publish N issues at once, inject the fault
while they are in flight, wait (bounded) until every task is in review, stop the
actors, then judge the run from the event log (:func:`.checks.check_log`)
plus the scenario's own expectations.

Recovery times (from the log's append timestamps; the fault's moment from the
harness's wall clock, same host):

* coordinator      restarted coordinator up (it printed "is up") -> next task event
* agent            agent SIGKILLed -> its task re-queued (includes the heartbeat timeout)
* nats-restart     nats-server back (listening) -> next event appended
* cluster          stream leader SIGKILLed -> next event appended (after the election)
* graceful         agent SIGTERMed -> its task re-queued (handed back)
* ci-loop          coordinator SIGKILLed while checks run -> the interrupted checks recorded
                   (the forge-ci consumer's ack wait included); agent SIGKILLed in a CI fix
                   round -> the round re-queued; restarted coordinator up -> next task event
                   (:mod:`.ci_loop`)
* autoscale        ``ccc up --autoscale`` SIGKILLed mid-burst with its agents -> every task they
                   held re-queued (:mod:`.autoscale`)

This module: the graceful scenario (with ``ccc up`` leaving no orphans) and the table
of scenarios. The standard run is in :mod:`.run`, the fault injectors in
:mod:`.faults`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import msgspec

from infra.adapters.forge.local import LocalForge
from infra.adapters.nats.connection import connect
from infra.adapters.nats.secure import SecureDir
from infra.adapters.nats.server import EmbeddedServer
from infra.shell.chaos.autoscale import autoscale
from infra.shell.chaos.checks import PR_UP, read_log
from infra.shell.chaos.ci_loop import ci_loop
from infra.shell.chaos.faults import kill_agent, kill_coordinator, kill_leader, poison, restart_nats, sigterm_agent
from infra.shell.chaos.model import Fault, RunResult
from infra.shell.chaos.processes import CCC, READY, Proc, clean_env, is_alive, process_tree, processes_under
from infra.shell.chaos.run import judge, standard_run
from infra.shell.chaos.sandbox import REPO, REPO_FILES, Sandbox, Tracker


async def graceful(sb: Sandbox, run: int) -> RunResult:
    sb.options = msgspec.structs.replace(sb.options, work_seconds=max(sb.options.work_seconds, 3.0))
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


async def up_leaves_no_orphans(sb: Sandbox) -> RunResult:
    """SIGTERM to a whole ``ccc up`` (embedded server, coordinator, 2 agents) with tasks
    in flight: it must exit 0 and leave no process behind, with its tasks handed back."""
    data = sb.root / "up"
    LocalForge(data / "forge").create_repo(REPO, REPO_FILES)
    # secure by default, as `ccc up` is: it makes <data>/secure itself at its first start
    insecure = ["--insecure"] if sb.security is None else []
    proc = Proc("up", [*CCC, "--data-dir", str(data), "--namespace", sb.ns.prefix, "--log-level", "info", *insecure,
                       "up", "--agents", "2", "--specialties", "backend", "--no-api", "--script-dir",
                       str(sb.scripts), "--heartbeat-timeout", "2", "--shutdown-grace", "0.2"], sb.logs, clean_env())
    sb.procs["up"] = proc
    proc.start()
    await proc.wait_for_output(READY["up"], 60)
    url = (data / "nats.url").read_text().strip()
    secure = SecureDir.of(data)
    kit = secure.kit("admin") if sb.security is not None else None  # what `ccc up` generated
    nc = await connect(url, name="ccc-chaos-up", quiet=True, kit=kit)
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
        tree = process_tree(proc.pid or 0)
        proc.signal(signal.SIGTERM)
        f.count += 1
        code = await asyncio.to_thread(proc.proc.wait, 60)
    finally:
        await nc.close()
    await asyncio.sleep(1.0)
    left = [pid for pid in tree if is_alive(pid)]
    left += [pid for pid, _, _ in processes_under(data) if pid not in left]
    if code != 0:
        f.violations.append(f"orphans: ccc up exited with {code} after SIGTERM")
    if left:
        f.violations.append(f"orphans: {len(left)} processes left after ccc up exited: {left}")
    f.notes.append(f"ccc up had {len(tree)} descendants; exit {code}; {len(left)} left")
    f.violations += sb.denials("up")
    if sb.security is not None and not url.startswith("tls://"):
        f.violations.append(f"orphans: ccc up served {url}, not TLS: it did not start secure by default")
    # the log, read back with a server on the same data dir (its users, its store key):
    # nothing may be left held
    key = secure.js_key() if secure.js_key_file.is_file() else ""
    server = EmbeddedServer(data, sync_interval="always", secure=secure if kit is not None else None, js_key=key)
    url = await asyncio.to_thread(server.start)
    try:
        nc = await connect(url, name="ccc-chaos-up-check", quiet=True, kit=kit)
        records = await read_log(nc, sb.ns)
        await nc.close()
    finally:
        server.stop()
    return judge(sb, 0, "graceful", records, f, {}, expected_final=("queued", *PR_UP),
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
    # the worst recovery is the CI run that died with its coordinator: redone after the
    # forge-ci consumer's 10 s ack wait, plus the run itself (see .ci_loop)
    "ci-loop": Spec(ci_loop, 1, 2, 20.0,
                    "coordinator killed mid-CI -> the interrupted checks recorded (10 s ack wait included); "
                    "agent killed in a CI fix round -> round re-queued; restarted coordinator up -> next task "
                    "event"),
    # a burst of one specialty on `ccc up --agents 0 --autoscale 0:N`, which is SIGKILLed
    # (with every agent it started) once mid-burst; the figures are in the notes (.autoscale).
    # The re-queue waits for the restart (~1.5 s) and the restarted health monitor's grace
    # (one 2 s heartbeat timeout for agents it never heard): 3-5 s measured, 10 s allowed
    "autoscale": Spec(autoscale, 1, 1, 10.0,
                      "ccc up SIGKILLed with its autoscaled agents -> every task they held re-queued "
                      "(restart and 2 s heartbeat timeout included)"),
}
