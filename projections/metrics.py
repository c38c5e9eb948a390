"""Prometheus metrics.

Facts of the log are computed from the read model *at scrape time* by a custom
collector (:class:`ClusterMetrics`), so a restart (which rebuilds the model from the log)
does not reset them, and every replica of the status API reports the same numbers for
the same log position. Counts the current states cannot give (events by type, tokens,
dollars, coder turns, test runs) come from :class:`LogCounters`, a pure fold kept next
to the read model. Process-side numbers (HTTP requests of this API process, pipeline
phases of this agent process) are ordinary client metrics kept with the adapters that
measure them (``infra.adapters.http``, ``infra.adapters.obs.metrics``).

The pull request's way to green (from :class:`LogCounters`): ``claude_pull_requests_opened_total``
and ``claude_pull_requests_green_total`` (tasks that opened a pull request; those whose pull
request then had every check pass) and their ratio ``claude_pull_request_green_ratio``;
``claude_time_to_green_seconds`` (a task's first ``pr_opened`` to its first
``checks_passed``); ``claude_ci_fix_attempts_started_total`` and
``claude_ci_fix_attempts_total{outcome}`` (what each CI fix round led to: ``green``,
``still_failing`` (another round), ``needs_human``, ``failed``, ``cancelled``, ``merged`` by
a person); ``claude_checks_failures_total{classification,stage}`` (``stage``: the pull
request's own checks or the merge queue's); ``claude_conflicts_detected_total`` and
``claude_conflicts_resolved_total`` (a conflicted task whose pull request was pushed again,
or merged); ``claude_merge_queue_total{step}`` (``entered``, ``merged``, ``ejected`` for
failing checks, ``left`` otherwise).

Naming follows the seed design (``claude_*``). ``claude_tasks_total`` and
``claude_agents_total`` keep the seed's names but are gauges: the number of tasks/agents
*now* in each status (a task moves between statuses, so they go down too). Monotonic
history is ``claude_events_total{type}``: e.g. ``rate(claude_events_total{type=
"task.completed"}[1h])``.

The HTTP side (API request metrics, the ``/metrics`` endpoint and server) is in
:mod:`infra.adapters.http.metrics`.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from events.agent import AgentImplementationProduced, AgentTestsRun
from events.agent_state import AGENT_STATUSES
from events.codec import BadMessage
from events.task import (
    TaskAnalyzed,
    TaskCancelled,
    TaskChecksFailed,
    TaskChecksPassed,
    TaskCompleted,
    TaskConflicted,
    TaskCreated,
    TaskEventBase,
    TaskFailed,
    TaskFixQueued,
    TaskMerged,
    TaskMergeDequeued,
    TaskMergeQueued,
    TaskNeedsHuman,
    TaskPullRequestOpened,
    TaskTestsStarted,
    Usage,
)
from events.task_state import ACTIVE, TaskState

if TYPE_CHECKING:
    from projections.read_model import ReadModel

TASK_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
UNKNOWN = "unknown"


# -- counts only the history knows ---------------------------------------------------------
class LogCounters:
    """A pure fold of applied events into monotonic counters. Call :meth:`observe` for
    each event the read model applied, *after* applying it (the task's specialty is read
    from ``tasks``), or :meth:`apply` to have it skip sequences already seen."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.events: dict[str, int] = {}  # event type tag -> count
        self.tokens: dict[tuple[str, str, str], int] = {}  # (model, specialty, direction)
        self.dollars: dict[tuple[str, str], float] = {}  # (model, specialty)
        self.coder_turns: dict[str, int] = {}  # coder -> turns
        self.test_runs: dict[str, int] = {}  # outcome -> runs
        self.green = GreenCounters()  # the pull requests' way to green

    def apply(self, seq: int, item: Any, tasks: Mapping[str, TaskState]) -> bool:
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        if isinstance(item, BadMessage):
            return False
        self.observe(item, tasks)
        return True

    def observe(self, event: Any, tasks: Mapping[str, TaskState]) -> None:
        tag = event.__struct_config__.tag
        self.events[tag] = self.events.get(tag, 0) + 1
        # usage is counted where the task's cost is (TaskState.dollars): the analysis, and
        # the implementation's usage, which the coordinator copies onto task.testing
        if isinstance(event, TaskAnalyzed):
            self._usage(event.usage, event.specialty)
        elif isinstance(event, TaskCreated) and event.analysis is not None:  # created and analysed
            self._usage(event.analysis.usage, event.analysis.specialty)
        elif isinstance(event, TaskTestsStarted):
            task = tasks.get(event.task_id)
            self._usage(event.usage, task.specialty if task else UNKNOWN)
        elif isinstance(event, AgentImplementationProduced):
            coder = event.coder or UNKNOWN
            self.coder_turns[coder] = self.coder_turns.get(coder, 0) + event.turns
        elif isinstance(event, AgentTestsRun):
            outcome = tests_outcome(event)
            self.test_runs[outcome] = self.test_runs.get(outcome, 0) + 1
        elif isinstance(event, TaskEventBase):
            self.green.observe(event, tasks)

    def _usage(self, usage: Usage | None, specialty: str) -> None:
        if usage is None:
            return
        model = usage.model or UNKNOWN
        for direction, n in (("input", usage.input_tokens), ("output", usage.output_tokens),
                             ("cache_read", usage.cache_read_tokens),
                             ("cache_write", usage.cache_write_tokens)):
            if n:
                key = (model, specialty, direction)
                self.tokens[key] = self.tokens.get(key, 0) + n
        if usage.dollars:
            self.dollars[(model, specialty)] = self.dollars.get((model, specialty), 0.0) + usage.dollars

    def snapshot(self) -> dict:
        return {"events": dict(sorted(self.events.items())),
                "tokens": {"/".join(k): v for k, v in sorted(self.tokens.items())},
                "dollars": {"/".join(k): round(v, 9) for k, v in sorted(self.dollars.items())},
                "coder_turns": dict(sorted(self.coder_turns.items())),
                "test_runs": dict(sorted(self.test_runs.items())),
                "green": self.green.snapshot()}


class GreenCounters:
    """The pull requests' way to green, folded from the task events (part of
    :class:`LogCounters`). What it remembers per task is only what an outcome still
    waits for (an open pull request not yet green, a CI fix round not yet judged, a
    conflict not yet resolved), and it forgets the task once that is known."""

    def __init__(self) -> None:
        self.prs_opened = 0  # tasks that opened a pull request
        self.prs_green = 0  # of those, tasks whose pull request then had every check pass
        self.time_to_green: list[float] = []  # seconds, first pr_opened -> first checks_passed
        self.ci_fixes_started = 0
        self.ci_fix_outcomes: dict[str, int] = {}  # outcome -> CI fix rounds
        self.checks_failures: dict[tuple[str, str], int] = {}  # (classification, stage)
        self.conflicts_detected = 0
        self.conflicts_resolved = 0
        self.merge_queue: dict[str, int] = {}  # step -> tasks
        self._not_green: dict[str, datetime] = {}  # task -> its first pr_opened time, until green
        self._fixing: set[str] = set()  # tasks whose last CI fix round is not judged yet
        self._conflicts: dict[str, int] = {}  # task -> conflicts detected, not yet resolved

    def observe(self, event: TaskEventBase, tasks: Mapping[str, TaskState]) -> None:
        tid = event.task_id
        if isinstance(event, TaskPullRequestOpened):
            state = tasks.get(tid)
            if tid not in self._not_green and (state is None or state.green_at is None):
                self.prs_opened += 1
                self._not_green[tid] = event.occurred_at
            self._resolve_conflicts(tid)
        elif isinstance(event, TaskChecksPassed):
            opened = self._not_green.pop(tid, None)
            if opened is not None:
                self.prs_green += 1
                self.time_to_green.append(max(0.0, (event.occurred_at - opened).total_seconds()))
            self._judge_fix(tid, "green")
        elif isinstance(event, TaskChecksFailed):
            self._tally(self.checks_failures, (event.classification, "pull_request"))
        elif isinstance(event, TaskFixQueued):
            if event.kind == "ci_fix":
                self._judge_fix(tid, "still_failing")
                self.ci_fixes_started += 1
                self._fixing.add(tid)
        elif isinstance(event, TaskNeedsHuman):
            self._judge_fix(tid, "needs_human")
        elif isinstance(event, TaskConflicted):
            self.conflicts_detected += 1
            self._conflicts[tid] = self._conflicts.get(tid, 0) + 1
        elif isinstance(event, TaskMergeQueued):
            self._tally(self.merge_queue, "entered")
        elif isinstance(event, TaskMergeDequeued):
            if event.checks:
                self._tally(self.merge_queue, "ejected")
                self._tally(self.checks_failures, (event.classification or UNKNOWN, "merge_queue"))
            else:
                self._tally(self.merge_queue, "left")
        elif isinstance(event, TaskMerged):
            self._tally(self.merge_queue, "merged")
            self._resolve_conflicts(tid)
            self._forget(tid)
        elif isinstance(event, TaskCompleted):
            self._judge_fix(tid, "merged")
            self._resolve_conflicts(tid)
            self._forget(tid)
        elif isinstance(event, TaskCancelled):
            self._judge_fix(tid, "cancelled")
            self._forget(tid)
        elif isinstance(event, TaskFailed):
            state = tasks.get(tid)
            if state is None or not state.can_retry:  # the end of it, unless a person retries
                self._judge_fix(tid, "failed")

    def _judge_fix(self, tid: str, outcome: str) -> None:
        if tid in self._fixing:
            self._fixing.discard(tid)
            self._tally(self.ci_fix_outcomes, outcome)

    def _resolve_conflicts(self, tid: str) -> None:
        self.conflicts_resolved += self._conflicts.pop(tid, 0)

    def _forget(self, tid: str) -> None:  # a final task: nothing of it is awaited any more
        self._not_green.pop(tid, None)
        self._fixing.discard(tid)
        self._conflicts.pop(tid, None)

    @staticmethod
    def _tally(counts: dict, key: Any) -> None:
        counts[key] = counts.get(key, 0) + 1

    @property
    def green_ratio(self) -> float:
        return self.prs_green / self.prs_opened if self.prs_opened else 0.0

    def snapshot(self) -> dict:
        return {"prs_opened": self.prs_opened, "prs_green": self.prs_green,
                "time_to_green": list(self.time_to_green), "ci_fixes_started": self.ci_fixes_started,
                "ci_fix_outcomes": dict(sorted(self.ci_fix_outcomes.items())),
                "checks_failures": {"/".join(k): v for k, v in sorted(self.checks_failures.items())},
                "conflicts_detected": self.conflicts_detected, "conflicts_resolved": self.conflicts_resolved,
                "merge_queue": dict(sorted(self.merge_queue.items()))}


def tests_outcome(event: AgentTestsRun) -> str:
    if event.timed_out:
        return "timed_out"
    if event.exit_code is None:
        return "error"
    return "passed" if event.exit_code == 0 else "failed"



def duration_buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, ending with ``+Inf``, as Prometheus wants them."""
    values = sorted(values)
    out, i = [], 0
    for bound in bounds:
        while i < len(values) and values[i] <= bound:
            i += 1
        out.append((repr(float(bound)), i))
    out.append(("+Inf", len(values)))
    return out


# -- the collector over the read model -----------------------------------------------------
class ClusterMetrics(Collector):
    """Metrics computed from ``model`` (and its ``counters``) at each scrape. Scrape on the
    thread that applies events (the event loop), so each scrape is one log position."""

    def __init__(
        self,
        model: ReadModel,
        registry: CollectorRegistry | None = None,
        *,
        counters: LogCounters | None = None,
        stream_last_seq: Callable[[], int] | None = None,
        duration_buckets: tuple[float, ...] = TASK_DURATION_BUCKETS,
    ) -> None:
        self.model = model
        self._counters = counters
        self.buckets = duration_buckets
        self.lag_sources: dict[str, tuple[Callable[[], int], Callable[[], int]]] = {}
        if stream_last_seq is not None:
            self.add_lag_source("read_model", lambda: self.model.last_seq, stream_last_seq)
        if registry is not None:
            registry.register(self)

    @property
    def counters(self) -> LogCounters | None:
        return self._counters if self._counters is not None else getattr(self.model, "counters", None)

    def add_lag_source(self, projection: str, applied: Callable[[], int],
                       stream_last: Callable[[], int]) -> None:
        """Report ``claude_event_log_lag{projection}`` = stream's last seq - applied seq."""
        self.lag_sources[projection] = (applied, stream_last)

    def describe(self) -> Iterator[Any]:
        return self._families(describe=True)

    def collect(self) -> Iterator[Any]:
        return self._families(describe=False)

    def _families(self, *, describe: bool) -> Iterator[Any]:
        m = self.model
        tasks = GaugeMetricFamily("claude_tasks_total", "Tasks now in each status, by specialty (agent_type)",
                                  labels=["status", "agent_type"])
        active = GaugeMetricFamily("claude_active_tasks",
                                   "Tasks held by agents (assigned, in_progress, testing)")
        durations = HistogramMetricFamily(
            "claude_task_duration_seconds", "Created to completed, of completed tasks", labels=["agent_type"])
        agents = GaugeMetricFamily("claude_agents_total", "Agents now in each status", labels=["status"])
        load = GaugeMetricFamily("claude_agent_load", "Active tasks / capacity, per online agent",
                                 labels=["agent_id"])
        cluster_load = GaugeMetricFamily("claude_cluster_load", "Active tasks / capacity of online agents")
        capacity = GaugeMetricFamily("claude_cluster_capacity", "Task slots on online agents")
        bad = CounterMetricFamily("claude_bad_events", "Log messages the projection could not apply")
        lag = GaugeMetricFamily("claude_event_log_lag", "Stream last sequence - applied sequence",
                                labels=["projection"])
        applied = GaugeMetricFamily("claude_event_log_applied_seq", "Last stream sequence applied",
                                    labels=["projection"])
        events = CounterMetricFamily("claude_events", "Events applied, by type", labels=["type"])
        tokens = CounterMetricFamily("claude_model_tokens", "Model tokens by model, specialty, direction",
                                     labels=["model", "specialty", "direction"])
        dollars = CounterMetricFamily("claude_model_dollars", "Model cost in dollars",
                                      labels=["model", "specialty"])
        turns = CounterMetricFamily("claude_coder_turns", "Coder turns", labels=["coder"])
        tests = CounterMetricFamily("claude_test_runs", "Test runs of the repos under work",
                                    labels=["outcome"])
        prs_opened = CounterMetricFamily("claude_pull_requests_opened", "Tasks that opened a pull request")
        prs_green = CounterMetricFamily(
            "claude_pull_requests_green", "Tasks whose pull request reached green (every check passed)")
        green_ratio = GaugeMetricFamily("claude_pull_request_green_ratio",
                                        "Pull requests that reached green / pull requests opened (by task)")
        to_green = HistogramMetricFamily("claude_time_to_green_seconds",
                                         "A task's first pull request opened to its first checks passed")
        fixes_started = CounterMetricFamily("claude_ci_fix_attempts_started", "CI fix rounds queued")
        fixes = CounterMetricFamily("claude_ci_fix_attempts", "CI fix rounds, by what they led to",
                                    labels=["outcome"])
        check_failures = CounterMetricFamily(
            "claude_checks_failures", "Failing check runs of a pull request or of the merge queue, by cause",
            labels=["classification", "stage"])
        conflicts = CounterMetricFamily("claude_conflicts_detected", "Pull requests found conflicting with "
                                        "their moved base branch")
        resolved = CounterMetricFamily("claude_conflicts_resolved", "Conflicts resolved: the pull request "
                                       "pushed again (rebased) or merged")
        queue = CounterMetricFamily("claude_merge_queue", "Merge queue steps: entered, merged, ejected, left",
                                    labels=["step"])
        families = [tasks, active, durations, agents, load, cluster_load, capacity, bad, lag, applied,
                    events, tokens, dollars, turns, tests, prs_opened, prs_green, green_ratio, to_green,
                    fixes_started, fixes, check_failures, conflicts, resolved, queue]
        if describe:
            yield from families
            return

        by_status: Tally[tuple[str, str]] = Tally()
        done: dict[str, list[float]] = {}
        for t in m.tasks.values():
            by_status[(t.status, t.specialty)] += 1
            if t.status == "completed":
                done.setdefault(t.specialty, []).append((t.updated_at - t.created_at).total_seconds())
        for (status, specialty), n in sorted(by_status.items()):
            tasks.add_metric([status, specialty], n)
        active.add_metric([], sum(m.task_status_counts.get(s, 0) for s in ACTIVE))
        for specialty, values in sorted(done.items()):
            durations.add_metric([specialty], duration_buckets(values, self.buckets), sum(values))

        agent_status = Tally(a.status for a in m.agents.values())
        slots = held = 0
        for status in AGENT_STATUSES:
            agents.add_metric([status], agent_status.get(status, 0))
        for aid, a in sorted(m.agents.items()):
            if a.status != "offline":
                load.add_metric([aid], a.load)
                slots += a.capacity
                held += len(a.active_tasks)
        cluster_load.add_metric([], held / slots if slots else 0.0)
        capacity.add_metric([], slots)
        bad.add_metric([], m.bad_count)
        for name, (applied_of, last_of) in sorted(self.lag_sources.items()):
            done_seq = applied_of()
            lag.add_metric([name], max(0, last_of() - done_seq))
            applied.add_metric([name], done_seq)

        c = self.counters
        if c is not None:
            for tag, n in sorted(c.events.items()):
                events.add_metric([tag], n)
            for key, n in sorted(c.tokens.items()):
                tokens.add_metric(list(key), n)
            for key, v in sorted(c.dollars.items()):
                dollars.add_metric(list(key), v)
            for coder, n in sorted(c.coder_turns.items()):
                turns.add_metric([coder], n)
            for outcome, n in sorted(c.test_runs.items()):
                tests.add_metric([outcome], n)
            g = c.green
            prs_opened.add_metric([], g.prs_opened)
            prs_green.add_metric([], g.prs_green)
            green_ratio.add_metric([], g.green_ratio)
            to_green.add_metric([], duration_buckets(g.time_to_green, self.buckets), sum(g.time_to_green))
            fixes_started.add_metric([], g.ci_fixes_started)
            for outcome, n in sorted(g.ci_fix_outcomes.items()):
                fixes.add_metric([outcome], n)
            for key, n in sorted(g.checks_failures.items()):
                check_failures.add_metric(list(key), n)
            conflicts.add_metric([], g.conflicts_detected)
            resolved.add_metric([], g.conflicts_resolved)
            for step, n in sorted(g.merge_queue.items()):
                queue.add_metric([step], n)
        yield from families


__all__ = ["ClusterMetrics", "GreenCounters", "LogCounters"]
