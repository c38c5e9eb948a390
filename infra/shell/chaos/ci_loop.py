"""The ``ci-loop`` scenario of ``ccc chaos``: faults while pull requests are on their
way to green.

After ``pr_opened`` a task is not done: the local forge's CI (inside the coordinator's
``ccc up`` process: :mod:`actors.forge_ci`) runs the pushed commit's
``.ccc/test-command``, a failure caused by the change queues a CI fix round, an agent
pushes the fix on the same branch, and the fix's checks turn the task green (review).
Each issue here is the sandbox's CI-loop variant (:func:`.sandbox.ci_feature`): its
first push fails a CI-only check that names the changed file, its recorded fix passes.
So every task goes through exactly one fix round, and the faults land inside that loop:

* the coordinator is SIGKILLed while checks run (the CI run dies with it) and started
  again: the run must be redone, once, by the restarted coordinator (its ``forge-ci``
  consumer gets the unacknowledged ``pr_opened`` again after the consumer's ack wait);
* an agent is SIGKILLed in a CI fix round, before it pushed: the round is re-queued
  (the next attempt, ``work`` still ``ci_fix``) and another agent does it;
* (full runs) the coordinator again, while a fix's checks run.

Judged, beyond :func:`.checks.check_log` (with ``review`` the only final state): every
task has exactly one ``task.fix_queued`` (kind ``ci_fix``) and ``ci_fixes == 1``, one
``task.checks_failed`` (classified ``change``) and one ``task.checks_passed`` (no head
green twice), no re-run, no failed round; and the forge's branch holds the head that the
task's last ``pr_opened`` reported. A kill costs no fix round: the CI run it interrupts
is redone (a fix round is queued only by a recorded failure, once per failing head), and
a fix round taken from a killed agent is the same round again in the next attempt. What
it may cost is one attempt per agent kill (bounded: the task's attempts are at most
1 + the times it was taken from a lost agent, checked).

Recovery figures (the run's notes say which is which): restarted coordinator up -> next
task event; coordinator killed mid-CI -> the interrupted checks recorded (the
``forge-ci`` consumer's ack wait included); agent killed in a fix round -> the round
re-queued (the heartbeat timeout included).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import msgspec
from nats.aio.client import Client

from events.errors import CccError
from events.task import (
    TaskChecksFailed,
    TaskChecksPassed,
    TaskChecksRerun,
    TaskEventBase,
    TaskFailed,
    TaskFixQueued,
    TaskPullRequestOpened,
    TaskRequeued,
)
from events.task_state import WITH_AGENT, TaskState
from projections.read_model import ReadModel

from infra.adapters.forge.local import LocalForge
from infra.shell.chaos.checks import (
    LogRecord,
    Mark,
    coordinator_recovery,
    finished_by_other,
    forge_holds_the_pr,
    read_log,
    requeued_mark,
)
from infra.shell.chaos.model import RunResult
from infra.shell.chaos.processes import READY
from infra.shell.chaos.run import judge, note_run_end
from infra.shell.chaos.sandbox import Sandbox, Tracker
from infra.shell.chaos.world import World, offline, taken_by_other

GREEN = ("review",)  # the only state a task of this scenario may end in
COORDINATOR = "coordinator-1"
# the forge-ci consumer redelivers a pr_opened whose CI run died with its coordinator
# after its ack wait (actors.forge_ci: 10 s): a run is stuck only when nothing happened
# for much longer than that and a CI run
STALL = 60.0
WAIT = 150.0  # for the moment a fault waits for (a task in its checks, in a fix round)


# -- the run ----------------------------------------------------------------------------------
async def ci_loop(sb: Sandbox, run: int) -> RunResult:
    """One run: a server, a coordinator and agents as processes, the CI-loop issues,
    the faults while they are in the loop; then judged from the log and the forge. Like
    :func:`.run.standard_run`, except what it publishes and that a run is over only
    when every task is green (``review``), not as soon as its pull request is up."""
    sb.options = msgspec.structs.replace(sb.options, stall=max(sb.options.stall, STALL))
    timeout = sb.options.run_timeout or (240.0 if sb.options.quick else 420.0)
    sec = sb.security
    server = sb.embedded_server()
    nc: Client | None = None
    try:
        url = await asyncio.to_thread(server.start)
        nc, refused = await sb.open_bus(url)
        agent_ids = [f"agent-{i + 1}" for i in range(sb.options.agents)]
        if sec is not None:
            for agent_id in agent_ids:
                await sec.register_agent(nc, url, agent_id, replicas=1, reload=server.reload)
        names = [sb.coordinator(COORDINATOR, url).name]
        names += [sb.agent(agent_id, url).name for agent_id in agent_ids]
        await sb.start(*names)
        tracker = Tracker(nc, sb.ns)
        tracker.start()
        world = World(sb, nc, url, tracker)
        world.server = server
        await sb.publish_ci_issues(nc, list(range(1, sb.options.n_tasks + 1)))
        injector = asyncio.create_task(ci_faults(world))
        green = lambda: tracker.all_in(sb.issues, GREEN) and injector.done()
        stuck = lambda: injector.done() and tracker.quiet_for() > sb.options.stall
        await tracker.wait(lambda: green() or stuck(), timeout)
        f = world.fault
        f.violations += refused
        note_run_end(sb, f, tracker, injector, refused=refused, secure=sec is not None, cluster=False,
                     finished=green(), stuck=stuck(), timeout=timeout, wanted=GREEN, what="not green")
        await tracker.stop()
        f.end = time.time()
        f.notes += await sb.close(keep_servers=True)
        f.violations += sb.denials()
        records = await read_log(nc, sb.ns)
        f.checks.append(lambda recs: forge_holds_the_pr(sb.forge, recs, sb.ns.prefix))
        result = judge(sb, run, "ci-loop", records, f, tracker.seen, expected_final=GREEN)
        loop = check_ci_loop(records, sb.forge, sb.ns.prefix)
        result.duplicated += loop.duplicated
        result.other += loop.other
        result.violations = (result.violations + loop.violations)[:100]
        result.notes += loop.notes
        return result
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        server.stop()


# -- the faults -------------------------------------------------------------------------------
async def ci_faults(w: World) -> None:
    """Kill the coordinator while checks run, then an agent in a CI fix round (and, in a
    full run, the coordinator again while a fix's checks run)."""
    pending: list[tuple[float, float]] = []  # (spawn, up) of the coordinator incarnation alive
    await kill_coordinator_in_checks(w, pending, round_=0)
    await kill_agent_in_fix_round(w)
    if not w.quick:
        await kill_coordinator_in_checks(w, pending, round_=1)
    for spawn, up in pending:
        w.fault.marks.append(_up_mark(w, spawn, up, None))


def _checking(w: World, round_: int) -> dict[str, str]:
    """{task: head} of the tasks whose checks run now, of CI fix ``round_`` (0: the first push)."""
    return {t: s.head_sha for t, s in w.tracker.model.tasks.items()
            if s.status == "checking" and s.ci_fixes == round_ and s.head_sha}


async def kill_coordinator_in_checks(w: World, pending: list[tuple[float, float]], *, round_: int) -> None:
    what = "its first push" if round_ == 0 else f"CI fix {round_}"
    proc = w.sb.procs[COORDINATOR]
    if not await w.tracker.wait(lambda: bool(_checking(w, round_)), WAIT):
        w.fault.violations.append(f"scenario: no task's checks of {what} ran within {WAIT:.0f}s")
        return
    # into the run (its check sleeps CI_SECONDS; a failing head's base is checked after it)
    await asyncio.sleep(w.rng.uniform(0.2, 0.8))
    awaited = _checking(w, round_)
    proc.kill()
    t_kill = time.time()
    w.fault.count += 1
    if pending:
        spawn, up = pending.pop()
        w.fault.marks.append(_up_mark(w, spawn, up, t_kill))
    w.fault.marks.append(_ci_redone_mark(w, awaited, t_kill, what))
    await asyncio.sleep(w.rng.uniform(0.1, 1.0))
    proc.start()
    up = await proc.wait_for_output(READY["up"], 60)
    pending.append((proc.started_at, up))
    w.fault.notes.append(f"coordinator killed while the checks of {what} ran for {sorted(awaited)}; "
                         f"up {up - proc.started_at:.2f}s after its restart")


def _up_mark(w: World, spawn: float, up: float, end: float | None) -> Mark:
    inputs = dict(w.sb.published)

    def mark(records: list[LogRecord]) -> float | None:
        r = coordinator_recovery(records, inputs, spawn, up, end, w.fault.notes)
        if r is not None:
            w.fault.notes.append(f"recovery: restarted coordinator up -> next task event {r:.2f}s")
        return r
    return mark


def _ci_redone_mark(w: World, awaited: dict[str, str], t_kill: float, what: str) -> Mark:
    """Kill -> the last of the checks awaited at the kill recorded (checks the coordinator
    recorded before the kill landed, seen late by the tracker, are not counted)."""
    def mark(records: list[LogRecord]) -> float | None:
        delays = []
        for tid, head in awaited.items():
            at = next((r.at for r in records if isinstance(r.item, (TaskChecksPassed, TaskChecksFailed))
                       and r.item.task_id == tid and r.item.head_sha == head), None)
            if at is None:
                w.fault.notes.append(f"{tid}: the checks of {head[:10]} awaited at the kill were never recorded")
            elif at >= t_kill:
                delays.append(at - t_kill)
        if not delays:
            w.fault.notes.append(f"the kill during the checks of {what} interrupted no run (all recorded before it)")
            return None
        worst = max(delays)
        w.fault.notes.append(f"recovery: coordinator killed mid-CI ({what}) -> the checks of {len(delays)} "
                             f"task(s) awaited at the kill recorded, the last after {worst:.2f}s")
        return worst
    return mark


async def kill_agent_in_fix_round(w: World) -> None:
    """SIGKILL an agent working on a CI fix round, before its push (in progress, and no
    task of it past its tests: a kill between a round's push and its report is a
    different fault, see the module's docstring)."""
    found: list[tuple[str, dict[str, int]]] = []

    def pick() -> bool:
        tasks = w.tracker.model.tasks
        for s in tasks.values():
            agent = s.agent_id or ""
            if s.status != "in_progress" or s.work != "ci_fix" or agent not in w.sb.procs:
                continue
            held = {t: x.attempt for t, x in tasks.items() if x.agent_id == agent and x.status in WITH_AGENT}
            if all(tasks[t].status != "testing" for t in held):
                found.append((agent, held))
                return True
        return False

    if not await w.tracker.wait(pick, WAIT):
        w.fault.violations.append(f"scenario: no agent was in a CI fix round within {WAIT:.0f}s")
        return
    victim, held = found[0]
    proc = w.sb.procs[victim]
    proc.kill()
    t_kill = time.time()
    w.fault.count += 1
    w.fault.marks.append(_requeued_mark(w, held, t_kill))
    w.fault.checks.append(finished_by_other(held, victim, t_kill))
    hb = w.sb.options.heartbeat_timeout
    if not await w.tracker.wait(lambda: offline(w, victim) and taken_by_other(w, held, victim), hb * 5 + 20):
        w.fault.violations.append(f"scenario: {sorted(held)} of killed {victim} not given to another agent in time")
    proc.start()  # it comes back with the same id
    await proc.wait_for_output(READY["agent"], 60)
    w.fault.notes.append(f"killed {victim} in a CI fix round, holding {sorted(held)}")


def _requeued_mark(w: World, held: dict[str, int], t_kill: float) -> Mark:
    inner = requeued_mark(held, t_kill, "agent_lost")

    def mark(records: list[LogRecord]) -> float | None:
        r = inner(records)
        if r is not None:
            w.fault.notes.append(f"recovery: agent killed in a CI fix round -> the round re-queued {r:.2f}s")
        return r
    return mark


# -- the judgement ------------------------------------------------------------------------------
class LoopVerdict(msgspec.Struct, kw_only=True):
    duplicated: int = 0
    other: int = 0
    violations: list[str] = []
    notes: list[str] = []


class _Rounds:
    """What the log says one task went through on its way to green."""

    def __init__(self) -> None:
        self.fixes: list[TaskFixQueued] = []
        self.failed_checks: list[TaskChecksFailed] = []
        self.passed: Counter[str] = Counter()  # head -> task.checks_passed
        self.reruns = 0
        self.failures: list[TaskFailed] = []
        self.lost_agents = 0  # re-queued because its agent was lost
        self.heads: list[str] = []  # of every task.pr_opened, in order


def check_ci_loop(records: list[LogRecord], forge: LocalForge, prefix: str) -> LoopVerdict:
    """The scenario's own expectations, from the log (and the forge's branches): one CI
    fix round per task, one failure (the change's), green once, on the head the forge
    holds."""
    model = ReadModel(prefix)
    rounds: dict[str, _Rounds] = defaultdict(_Rounds)
    for r in records:
        model.apply(r.seq, r.item)
        e = r.item
        if not isinstance(e, TaskEventBase):
            continue
        k = rounds[e.task_id]
        if isinstance(e, TaskFixQueued):
            k.fixes.append(e)
        elif isinstance(e, TaskChecksFailed):
            k.failed_checks.append(e)
        elif isinstance(e, TaskChecksPassed):
            k.passed[e.head_sha] += 1
        elif isinstance(e, TaskChecksRerun):
            k.reruns += 1
        elif isinstance(e, TaskFailed):
            k.failures.append(e)
        elif isinstance(e, TaskRequeued) and e.reason == "agent_lost":
            k.lost_agents += 1
        elif isinstance(e, TaskPullRequestOpened):
            k.heads.append(e.head_sha)
    v = LoopVerdict()

    def flag(text: str, *, duplicate: bool = False) -> None:
        if duplicate:
            v.duplicated += 1
        else:
            v.other += 1
        v.violations.append(("duplicated: " if duplicate else "ci-loop: ") + text)

    for tid, state in sorted(model.tasks.items()):
        k = rounds[tid]
        _judge_task(tid, state, k, forge, flag)
    if model.tasks:
        attempts = Counter(s.attempt for s in model.tasks.values())
        lost = sum(k.lost_agents for k in rounds.values())
        v.notes.append(f"rounds: {sum(len(k.fixes) for k in rounds.values())} CI fix round(s) for "
                       f"{len(model.tasks)} task(s); {lost} round(s) taken from a lost agent; attempts "
                       f"{dict(sorted(attempts.items()))}")
    return v


def _judge_task(tid: str, state: TaskState, k: _Rounds, forge: LocalForge,
                flag: Callable[..., None]) -> None:
    ci_fixes = [e for e in k.fixes if e.kind == "ci_fix"]
    if len(ci_fixes) != 1 or state.ci_fixes != 1:
        flag(f"{tid}: {len(ci_fixes)} CI fix round(s) queued, ci_fixes {state.ci_fixes}; expected exactly 1")
    if len(k.fixes) != len(ci_fixes):
        flag(f"{tid}: {len(k.fixes) - len(ci_fixes)} rebase round(s): nothing moved the base")
    if len(k.failed_checks) != 1 or any(e.classification != "change" for e in k.failed_checks):
        flag(f"{tid}: checks failed {len(k.failed_checks)} time(s) "
             f"({', '.join(e.classification for e in k.failed_checks) or 'never'}); expected once, the change's")
    for head, n in sorted(k.passed.items()):
        if n > 1:
            flag(f"{tid}: {n} task.checks_passed for head {head[:10]}", duplicate=True)
    if len(k.passed) != 1 and state.status == "review":
        flag(f"{tid}: green on {len(k.passed)} heads; expected once, on the fix")
    if k.reruns:
        flag(f"{tid}: {k.reruns} check re-run(s): a kill made a failure look flaky or the CI's")
    for e in k.failures:
        flag(f"{tid}: a round failed ({e.phase}): {e.reason[:160]}")
    if state.attempt > 1 + k.lost_agents:
        flag(f"{tid}: attempt {state.attempt}, taken from a lost agent {k.lost_agents} time(s)")
    if state.status != "review" or not state.branch:
        return  # (not green: check_log counts it lost)
    if not k.heads or k.heads[-1] != state.head_sha or len(set(k.heads)) < 2:
        flag(f"{tid}: pull request heads {[h[:10] for h in k.heads]}; expected the first push and its fix")
    try:
        have = forge.branch_sha(state.issue.repo, state.branch)
    except CccError as e:
        flag(f"{tid}: the forge: {e}")
        return
    if have != state.head_sha:
        flag(f"{tid}: branch {state.branch} holds {have[:10]}, not {state.head_sha[:10]} that the last "
             "pr_opened reported")
