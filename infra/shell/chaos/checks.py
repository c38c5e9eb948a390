"""Invariants of ``ccc chaos``, checked from the event log itself.

:func:`read_log` reads the whole ``<NS>_EVENTS`` stream with each message's stream
timestamp (an ordered push consumer, as every rebuild does); :func:`check_log` is a
pure function of those records and of what the harness published:

* every task's history is a legal sequence: folding it with ``task_state.evolve``
  raises nothing, and the read model rejects nothing that the harness did not inject
  on purpose (poison messages);
* every agent's history folds with ``agent_state.evolve``;
* a transition that names an agent (started, testing, PR opened) names the current
  assignee, and is not caused by a report about another attempt (a stale report);
* every published issue has exactly one ``task.created`` (none: *lost*; more than one
  task for an issue: *duplicated*), and no task exists that nobody asked for;
* at most one ``task.assigned`` per (task, attempt, round), at most one
  ``task.pr_opened`` per (task, attempt, round), and at most one
  ``agent.changes_pushed`` / ``agent.pr_opened`` report per (task, attempt, round)
  across all agents (*duplicated* otherwise). A *round* is the attempt's implementation
  or one CI fix / rebase on the pull request's branch (:func:`round_of`): each assigns,
  pushes and reports the pull request once, within the same attempt;
* every task ends in an expected state (*lost* if it is stuck anywhere else).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime
from typing import NamedTuple

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js import api

from events.agent import AgentChangesPushed, AgentEventBase, AgentPullRequestOpened
from events.agent_state import evolve as evolve_agent
from events.codec import BadMessage, Event, decode_or_bad
from events.errors import CccError, DomainError, StoreUnavailable
from events.subjects import Namespace
from events.task import (
    TaskAssigned,
    TaskCreated,
    TaskEventBase,
    TaskPullRequestOpened,
    TaskRequeued,
    TaskStarted,
    TaskTestsStarted,
)
from events.task_state import PR_OPEN, TaskState
from events.task_state import evolve as evolve_task
from projections.read_model import ReadModel

# a run ends well for a task whose pull request is up: its checks running or green, or merged
PR_UP: tuple[str, ...] = ("checking", "review", "completed")

from infra.adapters.forge.local import LocalForge

MAX_DETAILS = 50  # violations listed per run; the counts are exact


class LogRecord(NamedTuple):
    seq: int
    subject: str
    at: float  # the stream's timestamp of the message, seconds since the epoch
    item: Event | BadMessage


async def read_log(nc: Client, ns: Namespace, *, from_seq: int = 1, timeout: float = 30.0) -> list[LogRecord]:
    """Every message of the events stream from ``from_seq`` as it is now, decoded
    (or as :class:`BadMessage`), with the server's timestamps. A read that fails
    (e.g. just after a leader election, while the cluster cannot create consumers
    yet) is started again until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _read_log_once(nc, ns, from_seq, max(1.0, deadline - time.monotonic()))
        except StoreUnavailable:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)


async def _read_log_once(nc: Client, ns: Namespace, from_seq: int, timeout: float) -> list[LogRecord]:
    js = nc.jetstream(timeout=5.0)
    out: list[LogRecord] = []
    done = asyncio.Event()
    cut = len(ns.prefix) + 1
    try:
        info = await js.stream_info(ns.events_stream)
        end = info.state.last_seq
        if end < from_seq or info.state.messages == 0:
            return []

        async def cb(msg) -> None:
            md = msg.metadata
            seq = md.sequence.stream
            if seq <= end:
                at = md.timestamp.timestamp() if isinstance(md.timestamp, datetime) else 0.0
                out.append(LogRecord(seq, msg.subject, at,
                                     decode_or_bad(seq, msg.subject, msg.subject[cut:], msg.data)))
            if seq >= end:
                done.set()

        sub = await js.subscribe(
            "", stream=ns.events_stream, cb=cb, ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                      opt_start_seq=max(1, from_seq)),
            pending_msgs_limit=512 * 1024, pending_bytes_limit=256 * 1024 * 1024,
        )
    except (TimeoutError, nats.errors.Error) as e:
        raise StoreUnavailable(f"read the log: {type(e).__name__}: {e}") from None
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except TimeoutError:
        raise StoreUnavailable(f"read the log: stopped at {out[-1].seq if out else 0} of {end}") from None
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass
    return out


class Verdict(msgspec.Struct, kw_only=True):
    issues: int  # issues published
    tasks: int  # tasks created
    lost: int  # issues without a task + tasks not in an expected final state
    duplicated: int  # extra tasks per issue, double assignments / PRs per attempt
    illegal: int  # histories that do not fold, transitions by a non-assignee or a stale report
    bad_events: int  # rejected by the projection, beyond what was injected
    final_states: dict[str, int]
    violations: list[str]
    events: int = 0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.illegal == 0


class _Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.details: list[str] = []

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.details) < MAX_DETAILS:
            self.details.append(f"{kind}: {text}")


_BY_AGENT = (TaskStarted, TaskTestsStarted, TaskPullRequestOpened)


def round_of(state: TaskState | None) -> str:
    """The round of its attempt a task is in (or, after its pull request, last was in),
    as a suffix for messages: "" for the implementation, ", CI fix n" / ", rebase n" for a
    round on the pull request's branch (``work`` and its count change only when the next
    round is queued)."""
    if state is None or state.work == "implement":
        return ""
    return f", CI fix {state.ci_fixes}" if state.work == "ci_fix" else f", rebase {state.rebases}"


def check_log(
    records: Iterable[LogRecord],
    issues: Mapping[str, tuple[str, int]],
    *,
    expected_final: Mapping[str, Collection[str]] | Collection[str] = PR_UP,
    injected_bad: Collection[int] = (),
    prefix: str = "ccc",
) -> Verdict:
    """``issues``: task id -> (repo, number) of every issue the harness published.
    ``expected_final``: the states a task may end in (one set for all, or per task id).
    ``injected_bad``: stream sequences of poison messages the harness wrote itself."""
    tally = _Tally()
    model = ReadModel(prefix)
    task_hist: dict[str, list[tuple[int, TaskEventBase]]] = defaultdict(list)
    agent_hist: dict[str, list[tuple[int, AgentEventBase]]] = defaultdict(list)
    reports: dict[str, AgentEventBase] = {}
    report_round: dict[str, str] = {}  # event id of a push/PR report -> its task's round then
    n = 0
    injected = set(injected_bad)
    for rec in records:
        n += 1
        model.apply(rec.seq, rec.item)
        item = rec.item
        if isinstance(item, BadMessage):
            if rec.seq not in injected:
                tally.add("illegal", f"undecodable message seq {rec.seq} on {rec.subject}: {item.error[:120]}")
        elif isinstance(item, TaskEventBase):
            task_hist[item.task_id].append((rec.seq, item))
        else:
            agent_hist[item.agent_id].append((rec.seq, item))
            reports[item.event_id] = item
            if isinstance(item, (AgentChangesPushed, AgentPullRequestOpened)):
                report_round[item.event_id] = round_of(model.tasks.get(item.task_id))
    rejected_injected = sum(1 for b in model.bad if b.seq in injected)
    bad_events = model.bad_count - rejected_injected

    # agents: every history folds
    pushes: Counter[tuple[str, int, str]] = Counter()
    pr_reports: Counter[tuple[str, int, str]] = Counter()
    for aid, hist in agent_hist.items():
        state = None
        for seq, e in hist:
            try:
                state = evolve_agent(state, e)
            except DomainError as err:
                tally.add("illegal", f"agent {aid} seq {seq} {e.__struct_config__.tag}: {err}")
                break
        for _, e in hist:
            if isinstance(e, AgentChangesPushed):
                pushes[(e.task_id, e.attempt, report_round.get(e.event_id, ""))] += 1
            elif isinstance(e, AgentPullRequestOpened):
                pr_reports[(e.task_id, e.attempt, report_round.get(e.event_id, ""))] += 1
    for (tid, attempt, rnd), k in sorted(pushes.items()):
        if k > 1:
            tally.add("duplicated", f"{tid} attempt {attempt}{rnd}: {k} agent.changes_pushed reports")
    for (tid, attempt, rnd), k in sorted(pr_reports.items()):
        if k > 1:
            tally.add("duplicated", f"{tid} attempt {attempt}{rnd}: {k} agent.pr_opened reports")

    # tasks: fold, assignment and PR counts, who moved them
    finals: dict[str, TaskState | None] = {}
    created_per_issue: Counter[tuple[str, int]] = Counter()
    for tid, hist in task_hist.items():
        state: TaskState | None = None
        assigned: Counter[tuple[int, str]] = Counter()  # (attempt, round)
        prs: Counter[tuple[int, str]] = Counter()
        for seq, e in hist:
            if isinstance(e, TaskCreated):
                created_per_issue[(e.issue.repo, e.issue.number)] += 1
            if isinstance(e, TaskAssigned):
                assigned[(e.attempt, round_of(state))] += 1  # counted even where the fold breaks
            try:
                new = evolve_task(state, e)
            except DomainError as err:
                tally.add("illegal", f"task {tid} seq {seq} {e.__struct_config__.tag}: {err}")
                break
            if isinstance(e, TaskAssigned) and state is not None and e.attempt != state.attempt:
                tally.add("illegal", f"task {tid} seq {seq}: assigned as attempt {e.attempt}, "
                                     f"task is at attempt {state.attempt}")
            if isinstance(e, _BY_AGENT) and state is not None:
                if e.agent_id != state.agent_id:
                    tally.add("illegal", f"task {tid} seq {seq} {e.__struct_config__.tag} by {e.agent_id}, "
                                         f"assignee {state.agent_id}")
                cause = reports.get(e.causation_id or "")
                cause_attempt = getattr(cause, "attempt", 0)
                if cause is not None and cause_attempt and cause_attempt != state.attempt:
                    tally.add("illegal", f"task {tid} seq {seq} {e.__struct_config__.tag} caused by a stale "
                                         f"report ({cause.event_id}, attempt {cause_attempt} != {state.attempt})")
            if isinstance(e, TaskPullRequestOpened) and state is not None:
                prs[(state.attempt, round_of(state))] += 1
            state = new
        finals[tid] = state
        for (attempt, rnd), k in sorted(assigned.items()):
            if k > 1:
                tally.add("duplicated", f"{tid} attempt {attempt}{rnd}: assigned {k} times")
        for (attempt, rnd), k in sorted(prs.items()):
            if k > 1:
                tally.add("duplicated", f"{tid} attempt {attempt}{rnd}: {k} task.pr_opened")
    for (repo, number), k in sorted(created_per_issue.items()):
        if k > 1:
            tally.add("duplicated", f"{repo}#{number}: {k} tasks created")

    # every issue -> exactly one task, in an expected final state
    states: Counter[str] = Counter()
    for tid, (repo, number) in sorted(issues.items()):
        if created_per_issue[(repo, number)] == 0 or tid not in task_hist:
            tally.add("lost", f"{repo}#{number}: no task created")
            continue
        state = finals.get(tid)
        status = state.status if state is not None else "unreadable"
        states[status] += 1
        allowed = expected_final.get(tid, PR_UP) if isinstance(expected_final, Mapping) \
            else expected_final
        if status not in allowed:
            holder = f", held by {state.agent_id}" if state is not None and state.agent_id else ""
            tally.add("lost", f"{tid}: stuck in {status} (attempt {state.attempt if state else '?'}{holder}; "
                              f"expected {'/'.join(sorted(allowed))})")
    for tid in sorted(set(task_hist) - set(issues)):
        tally.add("illegal", f"{tid}: a task nobody published an issue for")
    if bad_events:
        for b in model.bad:
            if b.seq not in injected:
                tally.add("illegal", f"projection rejected seq {b.seq} ({b.subject}): {b.error[:160]}")
    return Verdict(
        issues=len(issues), tasks=len(task_hist), lost=tally.counts["lost"],
        duplicated=tally.counts["duplicated"], illegal=tally.counts["illegal"], bad_events=bad_events,
        final_states=dict(sorted(states.items())), violations=tally.details, events=n,
    )


# -- figures taken from the log ------------------------------------------------------------
def first_after(records: Iterable[LogRecord], t: float, *, tasks_only: bool = False) -> float | None:
    """Timestamp of the first event appended at or after wall time ``t``."""
    for rec in records:
        if rec.at >= t and (not tasks_only or isinstance(rec.item, TaskEventBase)):
            return rec.at
    return None


def first_matching(records: Iterable[LogRecord], t: float, pred) -> float | None:
    for rec in records:
        if rec.at >= t and not isinstance(rec.item, BadMessage) and pred(rec.item):
            return rec.at
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# -- scenario checks and recovery figures over the log -------------------------------------
Mark = Callable[[list[LogRecord]], float | None]  # a recovery time read from the log
Check = Callable[[list[LogRecord]], list[str]]  # violations found in the log


def since(t: float | None, t0: float) -> float | None:
    return None if t is None else max(0.0, t - t0)


def requeued_mark(held: dict[str, int], t0: float, reason: str) -> Mark:
    def mark(records: list[LogRecord]) -> float | None:
        t = first_matching(records, t0, lambda e: isinstance(e, TaskRequeued) and e.task_id in held
                           and e.reason == reason)
        return since(t, t0)
    return mark


def finished_by_other(held: dict[str, int], agent: str, t0: float) -> Check:
    """Tasks taken from ``agent`` at the fault (re-queued after ``t0``) were not finished
    by the work it was doing then: the pull request the task ended with was not opened in
    the attempt it held (a task it finished before the fault landed is not counted). The
    restarted agent may well do a *later* attempt, or a later round of one (a CI fix round
    of the attempt another agent took over): that is new work, assigned to it afresh."""
    def check(records: list[LogRecord]) -> list[str]:
        out = []
        for tid, attempt in held.items():
            taken = any(r.at >= t0 and isinstance(r.item, TaskRequeued) and r.item.task_id == tid
                        for r in records)
            assigned: TaskAssigned | None = None
            finisher: TaskAssigned | None = None  # the assignment the last pull request came from
            for r in records:
                if isinstance(r.item, TaskAssigned) and r.item.task_id == tid:
                    assigned = r.item
                elif isinstance(r.item, TaskPullRequestOpened) and r.item.task_id == tid:
                    finisher = assigned
            if taken and finisher is not None and finisher.agent_id == agent and finisher.attempt <= attempt:
                out.append(f"scenario: {tid} was finished by {agent}, the agent it was taken from, in "
                           f"attempt {finisher.attempt}")
        return out
    return check


def coordinator_recovery(records: list[LogRecord], inputs: dict[str, float], spawn: float, up: float,
                         end: float | None, notes: list[str]) -> float | None:
    """How long a restarted coordinator took to resume work, from the log.

    An *input* is something the coordinator must act on: an issue (published at a
    known time) or an agent report; it is handled by the task event that names it as
    its cause. If inputs were waiting when the coordinator came up (handled only by
    this or a later incarnation), recovery is up -> its first task event. If nothing
    was waiting, it is the first input after up -> its handling (plain dispatch
    latency). ``end``: when this incarnation was killed again (a sample it could not
    finish is censored, reported in the notes)."""
    times = dict(inputs)
    for r in records:
        if isinstance(r.item, AgentEventBase) and r.item.event_id not in times:
            times[r.item.event_id] = r.at
    handled: dict[str, float] = {}
    for r in records:
        cause = getattr(r.item, "causation_id", None)
        if isinstance(r.item, TaskEventBase) and cause in times and cause not in handled:
            handled[cause] = r.at
    waiting = [c for c, t in times.items() if t < up and c in handled and handled[c] >= spawn]
    if waiting:
        start = up
    else:
        later = [times[c] for c in handled if times[c] >= up]
        if not later:
            return None
        start = min(later)
    first = first_matching(records, max(spawn, start), lambda e: isinstance(e, TaskEventBase))
    if first is None:
        return None
    if end is not None and first > end:
        notes.append(f"incarnation up at {up:.2f} was killed {end - up:.2f}s later before it acted (censored)")
        return None
    return max(0.0, first - start)


def forge_holds_the_pr(forge: LocalForge, records: list[LogRecord], prefix: str) -> list[str]:
    """The branch of every task in review holds the commit its PR attempt pushed: a
    stale attempt (an agent that resumed after its task was given to another) must not
    have pushed over it."""
    model = ReadModel(prefix)
    pushed: dict[tuple[str, int], str] = {}
    for r in records:
        model.apply(r.seq, r.item)
        if isinstance(r.item, AgentChangesPushed):
            pushed[(r.item.task_id, r.item.attempt)] = r.item.commit
    out = []
    for tid, task in model.tasks.items():
        if task.status not in PR_OPEN or not task.branch:
            continue
        want = pushed.get((tid, task.attempt))
        try:
            have = forge.branch_sha(task.issue.repo, task.branch)
        except CccError as e:
            out.append(f"forge: {tid}: {e}")
            continue
        if want and have != want:
            out.append(f"forge: {tid}: branch {task.branch} holds {have[:10]}, not {want[:10]} that attempt "
                       f"{task.attempt} pushed and opened its PR with")
    return out
