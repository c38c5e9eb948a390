"""The web dashboard's view models, pure: what each page shows, computed from the read
model (:mod:`projections.read_model`), a small fold of the history the current states
cannot tell (:class:`DashboardFold`), and, for one task, its messages as read from the
log. No HTTP, no HTML, no clock: ``now`` is an argument, so the same log and the same
``now`` always give the same pages (the handlers and templates are in
``infra.adapters.http.dashboard``).

* :func:`overview`: agents by state and specialty, each specialty's queue (depth, oldest
  wait, who could take it), tasks per state, throughput and cost over the last hour and
  day, and alerts (bad events, dead letters, a waiting specialty no agent serves, lag).
* :func:`board_page`: columns by state over one page of the tasks matching the filters
  (state, specialty, agent, repository, a search over id, title and repository), newest
  first. :class:`BoardIndex` keeps the order and the search text incrementally (tasks are
  never removed and what is searched never changes), so a page over 10,000 tasks is one
  pass of cheap comparisons (tests/unit/test_dashboard_views.py bounds it).
* :func:`task_page`: a task's timeline (every event of the task and every agent report
  about it, with its stream sequence, time, actor and ``traceparent``), the time spent in
  each state, its attempts, test runs, cost, failure, pull request and artifacts, what it
  waits for, its place in the scheduler's order while queued and why its agent was chosen;
  :func:`replay`: the task as it was after any sequence (the log folded up to there).
* :func:`agent_page`: an agent, its tasks (current first), its recent pipeline phases and
  its last heartbeat.
"""

from __future__ import annotations

import bisect
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from itertools import islice
from typing import Any

import msgspec

from events.agent import (
    AgentChangesPushed,
    AgentCodebaseAnalysed,
    AgentEventBase,
    AgentImplementationProduced,
    AgentPullRequestOpened,
    AgentTaskDeclined,
    AgentTaskReleased,
    AgentTaskStarted,
    AgentTestsRun,
    AgentWorkFailed,
    AgentWorkspacePrepared,
    Heartbeat,
)
from events.agent_state import AGENT_STATUSES, ONLINE, AgentState
from events.codec import BadMessage
from events.errors import DomainError
from events.task import (
    SPECIALTIES,
    TaskAnalyzed,
    TaskAssigned,
    TaskCancelled,
    TaskChecksFailed,
    TaskChecksPassed,
    TaskCompleted,
    TaskCreated,
    TaskEventBase,
    TaskFailed,
    TaskMerged,
    TaskPullRequestOpened,
    TaskRequeued,
    TaskStarted,
    TaskTestsStarted,
    Usage,
)
from events.task_state import TASK_STATUSES, TaskState
from events.task_state import evolve as evolve_task
from projections.fairness import DEFAULT_POLICY, FairnessPolicy, explain
from projections.waits import Waits

MINUTE = 60
KEEP_MINUTES = 25 * 60  # a day of buckets, and an hour of slack for late events
RECENT_REPORTS = 50  # per agent
LAG_ALERT = 100  # messages behind before lag is an alert
BOARD_LIMIT, BOARD_MAX_LIMIT = 100, 500
SEARCH_MAX_CHARS = 200
SUMMARY_CHARS = 240


# -- small pure helpers ---------------------------------------------------------------------
def safe_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL fit for an ``href``, else ``""``: a pull
    request URL comes from the log, and ``javascript:`` or ``data:`` must never become a
    link (escaping alone does not stop those)."""
    url = (url or "").strip()
    if not re.match(r"(?i)^https?://[^\s/?#]+", url) or any(ord(c) < 32 or c in "<>\"'`\\ " for c in url):
        return ""
    return url


def short(text: str, limit: int = SUMMARY_CHARS) -> str:
    """One line, at most ``limit`` characters."""
    text = re.sub(r"\s+", " ", text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def trace_of(traceparent: str) -> str:
    """The trace id of a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``), or ""."""
    parts = (traceparent or "").strip().split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 and parts[1].isalnum() else ""


def tag_of(item: Any) -> str:
    return "bad" if isinstance(item, BadMessage) else item.__struct_config__.tag


def _minute(at: datetime) -> int:
    return int(at.timestamp()) // MINUTE


def _task_of_subject(subject: str, prefix: str) -> str | None:
    parts = subject.split(".", 3)
    if len(parts) >= 3 and parts[0] == prefix and parts[1] == "task":
        return parts[2]
    return None


# -- the fold of what the states cannot tell ---------------------------------------------------
class Bucket(msgspec.Struct, kw_only=True, gc=False):
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    dollars: float = 0.0


class ReportRef(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One pipeline phase an agent reported (or a task it took or let go)."""

    seq: int
    task_id: str
    phase: str  # the event's tag without ``agent.``: ``tests_run``, ``task_started``...
    at: datetime
    attempt: int = 0
    ok: bool = True  # False for a failed phase (and a failed test run)


class DashboardFold:
    """An incremental fold riding along with the read model (register :meth:`apply` as an
    observer of :class:`projections.live.LiveReadModel` before it replays):

    * completions, failures, cancellations and model cost per minute of event time, for
      the last day (older minutes are dropped as newer ones arrive);
    * per task, the stream sequences of its events and of the agents' events about it,
      in log order: the task page reads exactly those messages (with their headers);
    * per agent, its recent work reports: the agent page's phases.

    Idempotent by stream sequence, like the read model."""

    def __init__(self, prefix: str = "ccc", *, keep_minutes: int = KEEP_MINUTES,
                 recent_reports: int = RECENT_REPORTS) -> None:
        self.prefix = prefix
        self.keep_minutes = keep_minutes
        self.recent_reports = recent_reports
        self.last_seq = 0
        self.buckets: dict[int, Bucket] = {}
        self.newest_minute = 0
        self.task_seqs: dict[str, list[int]] = {}
        self.agent_reports: dict[str, deque[ReportRef]] = {}

    def apply(self, seq: int, item: Any) -> bool:
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        if isinstance(item, TaskEventBase):
            self.task_seqs.setdefault(item.task_id, []).append(seq)
            self._count(item)
        elif isinstance(item, AgentEventBase):
            tid = getattr(item, "task_id", None)
            if tid is not None:
                self.task_seqs.setdefault(tid, []).append(seq)
                reports = self.agent_reports.get(item.agent_id)
                if reports is None:
                    reports = self.agent_reports[item.agent_id] = deque(maxlen=self.recent_reports)
                reports.append(ReportRef(
                    seq=seq, task_id=tid, phase=tag_of(item).removeprefix("agent."), at=item.occurred_at,
                    attempt=getattr(item, "attempt", 0), ok=_report_ok(item)))
        elif isinstance(item, BadMessage):
            tid = _task_of_subject(item.subject, self.prefix)
            if tid is not None:  # shown on its task's timeline, as what it is
                self.task_seqs.setdefault(tid, []).append(seq)
        return True

    def _count(self, event: TaskEventBase) -> None:
        kind = type(event)
        usage: Usage | None = getattr(event, "usage", None) if kind in (TaskAnalyzed, TaskTestsStarted) else None
        if isinstance(event, TaskCreated) and event.analysis is not None:
            usage = event.analysis.usage
        if kind not in (TaskCompleted, TaskMerged, TaskFailed, TaskCancelled) and not (usage and usage.dollars):
            return
        minute = _minute(event.occurred_at)
        if minute <= self.newest_minute - self.keep_minutes:
            return  # older than anything kept
        bucket = self.buckets.get(minute)
        if bucket is None:
            bucket = self.buckets[minute] = Bucket()
        if kind in (TaskCompleted, TaskMerged):
            bucket.completed += 1
        elif kind is TaskFailed:
            bucket.failed += 1
        elif kind is TaskCancelled:
            bucket.cancelled += 1
        if usage is not None:
            bucket.dollars += usage.dollars
        if minute > self.newest_minute:
            self.newest_minute = minute
            horizon = minute - self.keep_minutes
            for old in [m for m in self.buckets if m <= horizon]:
                del self.buckets[old]

    def window(self, now: datetime, minutes: int) -> Bucket:
        """What happened in the ``minutes`` before ``now`` (by the events' own times)."""
        end = _minute(now)
        total = Bucket()
        for minute, b in self.buckets.items():
            if end - minutes < minute <= end:
                total.completed += b.completed
                total.failed += b.failed
                total.cancelled += b.cancelled
                total.dollars += b.dollars
        return total

    def seqs_of(self, task_id: str) -> list[int]:
        return list(self.task_seqs.get(task_id, ()))


def _report_ok(event: Any) -> bool:
    if isinstance(event, AgentWorkFailed):
        return False
    if isinstance(event, AgentTestsRun):
        return event.exit_code == 0 and not event.timed_out and not event.failed and not event.errors
    if isinstance(event, AgentTaskReleased):
        return event.outcome in ("done", "handed_back")
    return not isinstance(event, AgentTaskDeclined)


# -- the overview ------------------------------------------------------------------------------
class Alert(msgspec.Struct, frozen=True, kw_only=True):
    level: str  # "error" | "warning" | "info"
    kind: str  # "bad_events" | "dead_letters" | "no_agent" | "lag"
    text: str


class QueueRow(msgspec.Struct, frozen=True, kw_only=True):
    specialty: str
    depth: int  # tasks queued
    oldest_task: str
    oldest_wait: float  # seconds
    agents: int  # online agents that can take it (its specialists, and generalists)


class SpecialtyAgents(msgspec.Struct, frozen=True, kw_only=True):
    specialty: str
    by_state: dict[str, int]  # every agent status, 0 included
    total: int


class AgentRow(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    status: str
    specialties: tuple[str, ...]
    active: int
    capacity: int
    reason: str = ""


class Throughput(msgspec.Struct, frozen=True, kw_only=True):
    label: str
    minutes: int
    completed: int
    failed: int
    cancelled: int
    dollars: float


class ConsumerLag(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    pending: int | None  # None: unknown (not reachable, or no such consumer)


class Overview(msgspec.Struct, frozen=True, kw_only=True):
    last_seq: int
    tasks_total: int
    tasks_by_state: list[tuple[str, int]]  # every state with tasks in it, in the machine's order
    agents_total: int
    agents_by_state: dict[str, int]  # every agent status, 0 included
    agents_by_specialty: list[SpecialtyAgents]
    agents: list[AgentRow]  # (the first ``MAX_AGENT_ROWS`` by id)
    queues: list[QueueRow]
    throughput: list[Throughput]
    dollars_total: float
    alerts: list[Alert]
    projection_lag: int | None
    consumers: list[ConsumerLag]
    dead_letters: int | None
    bad_events: int


MAX_AGENT_ROWS = 200
WINDOWS = (("last hour", 60), ("last day", 24 * 60))


def overview(model: Any, fold: DashboardFold, now: datetime, *, stream_last_seq: int | None = None,
             dead_letters: int | None = None, consumers: Mapping[str, int | None] | None = None) -> Overview:
    """The cluster at a glance. ``model``: the :class:`~projections.read_model.ReadModel`;
    ``stream_last_seq``: the log's end (None: unknown); ``dead_letters``: messages in the
    dead-letter stream (None: not reachable); ``consumers``: durable consumers' pending
    messages (None for one that could not be asked)."""
    tasks: Mapping[str, TaskState] = model.tasks
    agents: Mapping[str, AgentState] = model.agents
    counts = model.task_status_counts
    by_state = [(s, counts.get(s, 0)) for s in TASK_STATUSES if counts.get(s, 0)]

    agents_by_state = dict.fromkeys(AGENT_STATUSES, 0)
    matrix: dict[str, dict[str, int]] = {}
    servers: dict[str, int] = {}  # specialty -> online agents having it
    general = 0
    for a in agents.values():
        agents_by_state[a.status] = agents_by_state.get(a.status, 0) + 1
        for sp in a.specialties:
            row = matrix.setdefault(sp, dict.fromkeys(AGENT_STATUSES, 0))
            row[a.status] = row.get(a.status, 0) + 1
            if a.status in ONLINE:
                servers[sp] = servers.get(sp, 0) + 1
        if a.status in ONLINE and "general" in a.specialties:
            general += 1
    order = {s: i for i, s in enumerate(SPECIALTIES)}
    by_specialty = [SpecialtyAgents(specialty=sp, by_state=row, total=sum(row.values()))
                    for sp, row in sorted(matrix.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))]

    waiting: dict[str, list[TaskState]] = {}
    for tid in model.queued:
        t = tasks[tid]
        waiting.setdefault(t.specialty, []).append(t)
    queues = []
    for sp, queued in sorted(waiting.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])):
        oldest = min(queued, key=lambda t: (t.updated_at, t.task_id))  # queued since its last change
        can = servers.get(sp, 0) + (general if sp != "general" else 0)
        queues.append(QueueRow(specialty=sp, depth=len(queued), oldest_task=oldest.task_id,
                               oldest_wait=max(0.0, (now - oldest.updated_at).total_seconds()), agents=can))

    throughput = []
    for label, minutes in WINDOWS:
        b = fold.window(now, minutes)
        throughput.append(Throughput(label=label, minutes=minutes, completed=b.completed, failed=b.failed,
                                     cancelled=b.cancelled, dollars=round(b.dollars, 6)))

    lag = None if stream_last_seq is None else max(0, stream_last_seq - model.last_seq)
    consumer_rows = [ConsumerLag(name=n, pending=p) for n, p in sorted((consumers or {}).items())]
    alerts = _alerts(model, queues, dead_letters, lag, consumer_rows)
    rows = [AgentRow(agent_id=a.agent_id, status=a.status, specialties=a.specialties,
                     active=len(a.active_tasks), capacity=a.capacity, reason=short(a.reason, 120))
            for _, a in islice(sorted(agents.items()), MAX_AGENT_ROWS)]
    return Overview(
        last_seq=model.last_seq, tasks_total=len(tasks), tasks_by_state=by_state,
        agents_total=len(agents), agents_by_state=agents_by_state, agents_by_specialty=by_specialty,
        agents=rows, queues=queues, throughput=throughput,
        dollars_total=round(sum(t.dollars for t in tasks.values()), 6), alerts=alerts,
        projection_lag=lag, consumers=consumer_rows, dead_letters=dead_letters, bad_events=model.bad_count,
    )


def _alerts(model: Any, queues: list[QueueRow], dead_letters: int | None, lag: int | None,
            consumers: list[ConsumerLag]) -> list[Alert]:
    alerts = []
    if model.bad_count:
        newest = model.bad[-1] if model.bad else None
        where = f" (newest at seq {newest.seq}: {short(newest.error, 120)})" if newest else ""
        alerts.append(Alert(level="warning", kind="bad_events",
                            text=f"{model.bad_count} message(s) on the log could not be applied{where}"))
    if dead_letters is None:
        alerts.append(Alert(level="info", kind="dead_letters",
                            text="dead letters: unknown (the dead-letter stream is not reachable)"))
    elif dead_letters:
        alerts.append(Alert(level="warning", kind="dead_letters",
                            text=f"{dead_letters} dead letter(s): messages an actor could not process"))
    for q in queues:
        if q.agents == 0:
            alerts.append(Alert(level="error", kind="no_agent",
                                text=f"{q.depth} {q.specialty} task(s) waiting and no online agent "
                                     f"takes {q.specialty} work"))
    if lag is not None and lag > LAG_ALERT:
        alerts.append(Alert(level="warning", kind="lag",
                            text=f"the dashboard's projection is {lag} messages behind the log"))
    for c in consumers:
        if c.pending is not None and c.pending > LAG_ALERT:
            alerts.append(Alert(level="warning", kind="lag",
                                text=f"consumer {c.name} has {c.pending} messages pending"))
    return alerts


# -- the board -----------------------------------------------------------------------------------
class BoardQuery(msgspec.Struct, frozen=True, kw_only=True):
    states: frozenset[str] | None = None
    specialty: str | None = None
    agent: str | None = None
    repo: str | None = None
    q: str = ""  # search: a substring of the id, the title or the repository (case-insensitive)
    limit: int = BOARD_LIMIT
    offset: int = 0


class Card(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    title: str
    repo: str
    number: int
    status: str
    specialty: str
    priority: str
    agent_id: str | None
    attempt: int
    max_attempts: int
    dollars: float
    updated_at: datetime
    age: float  # seconds since its last change
    waiting: str
    pr_url: str  # safe for an href, or ""
    pr_number: int | None


class Column(msgspec.Struct, frozen=True, kw_only=True):
    state: str
    total: int  # tasks in this state matching the filters (on every page)
    cards: list[Card]  # those of this page


class BoardPage(msgspec.Struct, frozen=True, kw_only=True):
    columns: list[Column]
    total: int  # matching the filters
    limit: int
    offset: int
    next_offset: int | None
    prev_offset: int | None
    last_seq: int
    repos: list[str]  # every repository (for the filter's choices)
    agents: list[str]


class BoardIndex:
    """The board's order (newest first: ``created_at``, then id) and each task's search
    text, kept incrementally: tasks are never removed, and a task's id, creation time,
    title and repository never change, so only tasks added since the last call are
    looked at (the model's dict keeps insertion order)."""

    def __init__(self) -> None:
        self._keys: list[tuple[datetime, str]] = []  # ascending
        self._seen = 0
        self.text: dict[str, str] = {}
        self.repos: set[str] = set()

    def refresh(self, tasks: Mapping[str, TaskState]) -> None:
        if len(tasks) == self._seen:
            return
        for tid in islice(tasks, self._seen, None):
            t = tasks[tid]
            bisect.insort(self._keys, (t.created_at, tid))
            self.text[tid] = f"{tid}\n{t.issue.title}\n{t.issue.repo}#{t.issue.number}".casefold()
            self.repos.add(t.issue.repo)
        self._seen = len(tasks)

    def newest_first(self) -> Iterator[str]:
        return (tid for _, tid in reversed(self._keys))


def board_page(tasks: Mapping[str, TaskState], index: BoardIndex, query: BoardQuery, now: datetime, *,
               last_seq: int = 0, waits: Waits | None = None) -> BoardPage:
    """One page of the board: the tasks matching ``query`` (newest first), the page's
    ``limit`` of them from ``offset`` in columns by state; each column also says how many
    match in all. ``waits``: the board's leases and merge queues (built once per log
    position by the caller; None: built here)."""
    index.refresh(tasks)
    states, specialty, agent, repo = query.states, query.specialty, query.agent, query.repo
    needle = query.q.strip().casefold()[:SEARCH_MAX_CHARS]
    text = index.text
    limit = max(1, min(query.limit, BOARD_MAX_LIMIT))
    offset = max(0, query.offset)
    per_state: dict[str, int] = {}
    page: list[TaskState] = []
    total = 0
    for tid in index.newest_first():
        t = tasks[tid]
        if ((states is not None and t.status not in states)
                or (specialty is not None and t.specialty != specialty)
                or (agent is not None and t.agent_id != agent)
                or (repo is not None and t.issue.repo != repo)
                or (needle and needle not in text[tid])):
            continue
        per_state[t.status] = per_state.get(t.status, 0) + 1
        if offset <= total < offset + limit:
            page.append(t)
        total += 1
    if waits is None:
        waits = Waits(tasks)
    by_state: dict[str, list[Card]] = {}
    for t in page:
        by_state.setdefault(t.status, []).append(_card(t, waits, now))
    shown = [s for s in TASK_STATUSES if states is None or s in states]
    columns = [Column(state=s, total=per_state.get(s, 0), cards=by_state.get(s, [])) for s in shown]
    agents = sorted({t.agent_id for t in tasks.values() if t.agent_id}) if len(tasks) <= 20_000 else []
    return BoardPage(
        columns=columns, total=total, limit=limit, offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
        prev_offset=max(0, offset - limit) if offset > 0 else None,
        last_seq=last_seq, repos=sorted(index.repos), agents=agents,
    )


def _card(t: TaskState, waits: Waits, now: datetime) -> Card:
    return Card(
        task_id=t.task_id, title=short(t.issue.title, 160), repo=t.issue.repo, number=t.issue.number,
        status=t.status, specialty=t.specialty, priority=t.priority, agent_id=t.agent_id,
        attempt=t.attempt, max_attempts=t.max_attempts, dollars=round(t.dollars, 6), updated_at=t.updated_at,
        age=max(0.0, (now - t.updated_at).total_seconds()), waiting=waits.why(t, now),
        pr_url=safe_url(t.pr_url), pr_number=t.pr_number,
    )


# -- a task's history ---------------------------------------------------------------------------
class LogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a task's history as read from the log: its stream sequence, what
    it decoded to, and what of its headers the page shows."""

    seq: int
    item: Any  # an Event, or a BadMessage
    traceparent: str = ""
    stored_at: datetime | None = None  # when the stream stored it


class Detail(msgspec.Struct, frozen=True):
    label: str
    value: str


class ArtifactRef(msgspec.Struct, frozen=True, kw_only=True):
    ref: str  # ``<bucket> <name>``: what the reports carry (events.refs)
    kind: str  # "diff", "test log", "transcript", "failure log", "check log"
    seq: int  # of the event that named it
    attempt: int = 0


class TimelineItem(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    at: datetime | None
    kind: str  # "task" | "agent" | "bad"
    type: str  # the event's tag
    actor: str
    summary: str
    details: list[Detail]
    status: str  # the task's status after it ("" for agent reports and bad messages)
    since_prev: float | None  # seconds since the previous item
    traceparent: str
    dollars: float = 0.0
    rejected: str = ""  # why the state machine passed over it (a task event it refuses)
    ok: bool = True


class PhaseTime(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    seconds: float
    times: int  # how often the task entered it
    current: bool = False


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    number: int
    agent_id: str
    assigned_at: datetime
    ended_at: datetime | None
    outcome: str  # "running", "pull request opened", "failed: ...", "requeued (agent_lost)"...


class TestRunRow(msgspec.Struct, frozen=True, kw_only=True):
    __test__ = False  # not a pytest test class

    seq: int
    attempt: int
    passed: int
    failed: int
    errors: int
    skipped: int
    duration: float
    exit_code: int | None
    timed_out: bool
    log_ref: str


class TaskPage(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    state: TaskState | None  # as folded from the history read (None: no events)
    items: list[TimelineItem]
    phases: list[PhaseTime]
    attempts: list[Attempt]
    tests: list[TestRunRow]
    artifacts: list[ArtifactRef]
    dollars: float
    input_tokens: int
    output_tokens: int
    pr_url: str  # safe for an href, or ""
    seqs: list[int]  # of the task's own events: the scrubber's stops
    first_seq: int
    last_seq: int
    traces: list[str]  # the distinct trace ids of its messages' ``traceparent``, in order
    bad: int
    waiting: str = ""  # what it waits for now (projections.waits), "" when not waiting
    queue: str = ""  # queued: its lane and urgency now (projections.fairness.explain)


def task_page(task_id: str, entries: Iterable[LogEntry], now: datetime, *, waits: Waits | None = None,
              tasks: Mapping[str, TaskState] | None = None, fairness: FairnessPolicy | None = None) -> TaskPage:
    """The task page of ``task_id`` from its history (:class:`LogEntry` items in log order:
    its own events, the agents' events about it, and bad messages on its subjects).
    ``waits`` (the board's, over every task) and ``tasks`` (the task view) add what the
    task waits for and, queued, its place in the order, with the cluster's admission
    policy ``fairness`` (None: the coordinator's default). Why its agent was chosen is
    the state's ``assigned_why``."""
    entries = sorted(entries, key=lambda e: e.seq)
    state: TaskState | None = None
    items: list[TimelineItem] = []
    phase_secs: dict[str, float] = {}
    phase_times: dict[str, int] = {}
    entered: tuple[str, datetime] | None = None
    attempts: list[dict[str, Any]] = []
    tests: list[TestRunRow] = []
    artifacts: dict[str, ArtifactRef] = {}
    seqs: list[int] = []
    traces: list[str] = []
    prev_at: datetime | None = None
    bad = 0
    for e in entries:
        item = e.item
        trace_id = trace_of(e.traceparent)
        if trace_id and trace_id not in traces:
            traces.append(trace_id)
        if isinstance(item, BadMessage):
            bad += 1
            items.append(TimelineItem(
                seq=e.seq, at=e.stored_at, kind="bad", type="bad", actor="", summary=short(item.error),
                details=[Detail("subject", item.subject), Detail("preview", short(item.preview, 200))],
                status="", since_prev=None, traceparent=e.traceparent, ok=False))
            continue
        at = item.occurred_at
        since = None if prev_at is None else max(0.0, (at - prev_at).total_seconds())
        prev_at = at
        summary, details = describe(item)
        for ref in _refs(item, e.seq):
            artifacts.setdefault(ref.ref, ref)
        if isinstance(item, TaskEventBase):
            seqs.append(e.seq)
            rejected = ""
            try:
                new = evolve_task(state, item)
            except DomainError as err:
                rejected = f"{type(err).__name__}: {err}"
                new = state
            if not rejected and new is not None:
                if state is None or new.status != state.status:
                    if entered is not None:
                        secs = max(0.0, (at - entered[1]).total_seconds())
                        phase_secs[entered[0]] = phase_secs.get(entered[0], 0.0) + secs
                    entered = (new.status, at)
                    phase_times[new.status] = phase_times.get(new.status, 0) + 1
                _attempts(attempts, item, new)
                state = new
            usage = getattr(item, "usage", None)
            items.append(TimelineItem(
                seq=e.seq, at=at, kind="task", type=tag_of(item), actor=item.actor, summary=summary,
                details=details, status=state.status if state is not None else "", since_prev=since,
                traceparent=e.traceparent, dollars=usage.dollars if isinstance(usage, Usage) else 0.0,
                rejected=rejected, ok=not rejected and not isinstance(item, TaskFailed)))
        else:
            if isinstance(item, AgentTestsRun):
                tests.append(TestRunRow(seq=e.seq, attempt=item.attempt, passed=item.passed, failed=item.failed,
                                        errors=item.errors, skipped=item.skipped, duration=item.duration,
                                        exit_code=item.exit_code, timed_out=item.timed_out, log_ref=item.log_ref))
            items.append(TimelineItem(
                seq=e.seq, at=at, kind="agent", type=tag_of(item), actor=item.actor, summary=summary,
                details=details, status="", since_prev=since, traceparent=e.traceparent,
                ok=_report_ok(item)))
    phases = []
    if entered is not None:
        current = entered[0]
        if state is not None and not state.final and (state.status != "failed" or state.can_retry):
            phase_secs[current] = phase_secs.get(current, 0.0) + max(0.0, (now - entered[1]).total_seconds())
        else:
            phase_secs.setdefault(current, 0.0)
        phases = [PhaseTime(status=s, seconds=round(phase_secs.get(s, 0.0), 3), times=phase_times.get(s, 0),
                            current=s == current)
                  for s in TASK_STATUSES if s in phase_times]
    return TaskPage(
        task_id=task_id, state=state, items=items, phases=phases,
        attempts=[Attempt(**a) for a in attempts], tests=tests, artifacts=list(artifacts.values()),
        dollars=round(state.dollars, 6) if state else 0.0,
        input_tokens=state.input_tokens if state else 0, output_tokens=state.output_tokens if state else 0,
        pr_url=safe_url(state.pr_url) if state else "", seqs=seqs,
        first_seq=seqs[0] if seqs else 0, last_seq=seqs[-1] if seqs else 0,
        traces=traces, bad=bad,
        waiting=waits.why(state, now) if waits is not None and state is not None else "",
        queue=explain(state, now, fairness or DEFAULT_POLICY, tasks) if state is not None else "",
    )


def _attempts(attempts: list[dict[str, Any]], event: TaskEventBase, state: TaskState) -> None:
    """Each assignment is an attempt's run on an agent: when it began, and how it ended."""
    if isinstance(event, TaskAssigned):
        attempts.append({"number": event.attempt, "agent_id": event.agent_id, "assigned_at": event.occurred_at,
                         "ended_at": None, "outcome": "running"})
        return
    if not attempts or attempts[-1]["ended_at"] is not None:
        return
    current = attempts[-1]
    outcome = None
    if isinstance(event, TaskPullRequestOpened):
        outcome = "pull request opened" if not event.draft else "draft pull request opened"
    elif isinstance(event, TaskFailed):
        outcome = f"failed in {event.phase or 'a phase'}: {short(event.reason, 160)}"
    elif isinstance(event, TaskRequeued):
        outcome = f"requeued ({event.reason})"
    elif isinstance(event, TaskCancelled):
        outcome = "cancelled"
    elif isinstance(event, (TaskCompleted, TaskMerged)):
        outcome = "completed"
    if outcome is not None:
        current["ended_at"] = event.occurred_at
        current["outcome"] = outcome


def _refs(item: Any, seq: int) -> Iterator[ArtifactRef]:
    attempt = getattr(item, "attempt", 0) or 0
    pairs: list[tuple[str, str]] = []
    if isinstance(item, AgentImplementationProduced):
        pairs = [(item.diff_ref, "diff"), (item.transcript_ref, "transcript")]
    elif isinstance(item, AgentTestsRun):
        pairs = [(item.log_ref, "test log")]
    elif isinstance(item, (AgentWorkFailed, TaskFailed)):
        pairs = [(item.log_ref, "failure log")]
    elif isinstance(item, TaskTestsStarted):
        pairs = [(item.diff_ref, "diff")]
    for check in getattr(item, "checks", ()) or ():
        if not isinstance(check, str) and getattr(check, "log_ref", ""):
            pairs.append((check.log_ref, f"check log ({short(check.name, 60)})"))
    for ref, kind in pairs:
        if ref and "/" in ref:
            yield ArtifactRef(ref=ref, kind=kind, seq=seq, attempt=attempt)


def describe(event: Any) -> tuple[str, list[Detail]]:
    """One line about ``event`` and its details worth a look, as text (escaped later)."""
    d: list[Detail] = []

    def add(label: str, value: Any) -> None:
        if value not in (None, "", (), [], 0, 0.0, False):
            d.append(Detail(label, short(", ".join(map(str, value)) if isinstance(value, (tuple, list))
                                         else str(value), 400)))

    usage = getattr(event, "usage", None)
    if isinstance(usage, Usage):
        add("cost", f"${usage.dollars:.4f}" if usage.dollars else "")
        add("tokens", f"{usage.input_tokens} in / {usage.output_tokens} out" if usage.input_tokens
            or usage.output_tokens else "")
        add("model", usage.model)
    add("attempt", getattr(event, "attempt", None))

    def analysed(a: Any) -> str:  # an Analysis, or task.analyzed (its fields, flat)
        for name in ("complexity", "priority", "paths", "dependencies", "reasons"):
            add(name, getattr(a, name))
        return f"analysed: {a.specialty}, {a.complexity}, {a.priority} priority"

    match event:
        case TaskCreated():
            add("issue", f"{event.issue.repo}#{event.issue.number}")
            add("author", event.issue.author)
            add("labels", event.issue.labels)
            created = f"created from {event.issue.repo}#{event.issue.number}: {short(event.issue.title, 160)}"
            if event.analysis is not None:  # a synchronous analyser's decision, on the creation
                add("analyser", event.analyser)
                return f"{created}; {analysed(event.analysis)}", d
            return created, d
        case TaskAnalyzed():
            return analysed(event), d
        case TaskAssigned():
            add("why", event.why)
            return f"assigned to {event.agent_id}", d
        case TaskStarted():
            return f"started by {event.agent_id}", d
        case TaskTestsStarted():
            add("files", event.files_changed)
            add("diff", event.diff_stat)
            return f"testing ({len(event.files_changed)} file(s) changed)", d
        case TaskPullRequestOpened():
            add("branch", event.branch)
            add("head", event.head_sha[:12])
            add("base", event.base_branch)
            add("tests", f"{event.tests_passed} passed, {event.tests_failed} failed")
            what = "draft pull request" if event.draft else "pull request"
            number = f" #{event.pr_number}" if event.pr_number else ""
            return f"{what}{number} opened on {event.branch}", d
        case TaskFailed():
            add("phase", event.phase)
            add("retryable", "yes" if event.retryable else "no")
            return f"failed{' in ' + event.phase if event.phase else ''}: {short(event.reason, 200)}", d
        case TaskRequeued():
            add("not before", event.not_before.isoformat() if event.not_before else "")
            add("from agent", event.agent_id)
            add("guidance", event.guidance)
            return f"requeued ({event.reason}), attempt {event.attempt}", d
        case TaskChecksPassed():
            add("checks", [c.name for c in event.checks])
            return f"checks passed on {event.head_sha[:7]}", d
        case TaskChecksFailed():
            add("failing", [f"{c.name}: {c.conclusion}" for c in event.checks if not c.passed])
            add("classification", event.classification)
            return f"checks failed on {event.head_sha[:7]} ({event.classification}): {short(event.reason, 160)}", d
        case TaskCancelled():
            return f"cancelled{': ' + short(event.reason, 200) if event.reason else ''}", d
        case TaskEventBase():
            for name in event.__struct_fields__:
                if name not in _ENVELOPE:
                    add(name.replace("_", " "), _plain(getattr(event, name)))
            return tag_of(event).removeprefix("task.").replace("_", " "), d
        case AgentWorkspacePrepared():
            add("base commit", event.base_commit[:12])
            return "workspace prepared", d
        case AgentCodebaseAnalysed():
            add("languages", [f"{k} {v}" for k, v in sorted(event.languages.items())])
            add("test command", " ".join(event.test_command))
            return "codebase analysed", d
        case AgentImplementationProduced():
            add("coder", event.coder)
            add("turns", event.turns)
            add("files", event.files_changed)
            add("diff", event.diff_stat)
            add("summary", event.summary)
            return f"implementation produced ({len(event.files_changed)} file(s))", d
        case AgentTestsRun():
            add("command", " ".join(event.command))
            add("exit code", event.exit_code if event.exit_code is not None else "none")
            add("duration", f"{event.duration:.1f}s")
            verdict = "timed out" if event.timed_out else (
                f"{event.passed} passed, {event.failed} failed, {event.errors} errors, {event.skipped} skipped")
            return f"tests run: {verdict}", d
        case AgentChangesPushed():
            add("commit", event.commit[:12])
            return f"changes pushed to {event.branch}", d
        case AgentPullRequestOpened():
            add("tests", f"{event.tests_passed} passed, {event.tests_failed} failed")
            return f"pull request {'#' + str(event.pr_number) + ' ' if event.pr_number else ''}opened", d
        case AgentWorkFailed():
            add("retryable", "yes" if event.retryable else "no")
            return f"{event.phase} failed: {short(event.reason, 200)}", d
        case AgentTaskStarted():
            return f"{event.agent_id} took the task", d
        case AgentTaskReleased():
            return f"{event.agent_id} released the task ({event.outcome})", d
        case AgentTaskDeclined():
            return f"{event.agent_id} declined the task{': ' + short(event.reason) if event.reason else ''}", d
    return tag_of(event), d


_ENVELOPE = frozenset({"event_id", "task_id", "version", "occurred_at", "correlation_id", "causation_id",
                       "actor", "usage", "attempt"})


def _plain(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return short(msgspec.json.encode(value).decode(), 200)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


# -- replay ---------------------------------------------------------------------------------------
class ReplayView(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the position asked for
    state: TaskState | None  # the task after every one of its events up to ``seq``
    events: int  # how many of its events that is
    last_type: str
    at: datetime | None  # when the last of them happened


def replay(entries: Iterable[LogEntry], seq: int) -> ReplayView:
    """The task as it was after stream sequence ``seq``: its events up to there, folded
    (events the state machine refuses are passed over, as the read model does)."""
    state: TaskState | None = None
    n = 0
    last: TaskEventBase | None = None
    for e in sorted(entries, key=lambda e: e.seq):
        if e.seq > seq:
            break
        if isinstance(e.item, TaskEventBase):
            try:
                state = evolve_task(state, e.item)
            except DomainError:
                continue
            n += 1
            last = e.item
    return ReplayView(seq=seq, state=state, events=n, last_type=tag_of(last) if last else "",
                      at=last.occurred_at if last else None)


# -- an agent ---------------------------------------------------------------------------------------
class AgentTask(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    title: str
    status: str
    attempt: int
    current: bool  # the agent holds it now
    phase: str  # its last phase reported by this agent ("" if none kept)
    phase_at: datetime | None
    updated_at: datetime


class HeartbeatView(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    age: float  # seconds before ``now``
    active_tasks: tuple[str, ...]
    seq: int


class AgentPage(msgspec.Struct, frozen=True, kw_only=True):
    agent: AgentState
    tasks: list[AgentTask]  # current first, then by last change, newest first
    recent: list[ReportRef]  # newest first
    heartbeat: HeartbeatView | None
    last_seq: int


MAX_AGENT_TASKS = 200


def agent_page(model: Any, fold: DashboardFold, agent_id: str, now: datetime,
               heartbeat: Heartbeat | None = None) -> AgentPage | None:
    """The agent page, or None for an agent the log does not know."""
    agent: AgentState | None = model.agents.get(agent_id)
    if agent is None:
        return None
    reports = list(fold.agent_reports.get(agent_id, ()))
    last_phase: dict[str, ReportRef] = {}
    for r in reports:
        last_phase[r.task_id] = r
    active = set(agent.active_tasks)
    rows = []
    for t in model.tasks_of_agent(agent_id):
        r = last_phase.get(t.task_id)
        rows.append(AgentTask(task_id=t.task_id, title=short(t.issue.title, 160), status=t.status,
                              attempt=t.attempt, current=t.task_id in active, phase=r.phase if r else "",
                              phase_at=r.at if r else None, updated_at=t.updated_at))
    rows.sort(key=lambda r: (not r.current, -r.updated_at.timestamp(), r.task_id))
    hb = None
    if heartbeat is not None:
        hb = HeartbeatView(at=heartbeat.at, age=max(0.0, (now - heartbeat.at).total_seconds()),
                           active_tasks=heartbeat.active_tasks, seq=heartbeat.seq)
    return AgentPage(agent=agent, tasks=rows[:MAX_AGENT_TASKS], recent=list(reversed(reports)),
                     heartbeat=hb, last_seq=model.last_seq)


__all__ = [
    "BOARD_LIMIT", "BOARD_MAX_LIMIT", "LAG_ALERT", "AgentPage", "AgentRow", "AgentTask", "Alert", "ArtifactRef",
    "Attempt", "BoardIndex", "BoardPage", "BoardQuery", "Bucket", "Card", "Column", "ConsumerLag",
    "DashboardFold", "Detail", "HeartbeatView", "LogEntry", "Overview", "PhaseTime", "QueueRow", "ReplayView",
    "ReportRef", "SpecialtyAgents", "TaskPage", "TestRunRow", "Throughput", "TimelineItem", "agent_page",
    "board_page", "describe", "overview", "replay", "safe_url", "short", "tag_of", "task_page", "trace_of",
]
