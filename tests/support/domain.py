"""given/when/then for the pure state machines, in the style of pyeventsourcing.

    given(history, machine=task_state).when(command).then([expected events])
    given(history, machine=agent_state).when(command).then_raises(IllegalTransition)

``machine`` is a module exposing ``decide``, ``evolve`` and ``fold``. ``then`` also
applies the decided events to the given state (so a decision the log would refuse
fails the test) and returns the new state for further assertions.

Below that, the task machine's builders its tests share: commands and events with a
fixed envelope, check sets of each classification, and ``history(status)``: a log,
produced by ``decide`` itself, that leaves a task in any status.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

import pytest

from events import task_state as ts
from events.checks import CheckRun
from events.task import Analysis, IssueRef

AT = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


class Given:
    def __init__(self, history: Sequence[Any], machine: ModuleType) -> None:
        self.history = list(history)
        self.machine = machine
        self.state = machine.fold(self.history)

    def when(self, command: Any) -> When:
        return When(self, command)


class When:
    def __init__(self, given: Given, command: Any) -> None:
        self.given = given
        self.command = command

    def decide(self) -> list[Any]:
        return self.given.machine.decide(self.given.state, self.command)

    def then(self, expected: Sequence[Any]) -> Any:
        """Assert the exact events decided; return the state after applying them."""
        events = self.decide()
        expected = list(expected)
        assert events == expected, f"decided:\n  {events!r}\nexpected:\n  {expected!r}"
        return self.given.machine.fold(events, self.given.state)

    def then_raises(self, error: type[BaseException], match: str | None = None) -> BaseException:
        with pytest.raises(error, match=match) as info:
            self.decide()
        return info.value


def given(history: Sequence[Any], *, machine: ModuleType) -> Given:
    return Given(history, machine)


# -- the task machine: builders shared by its tests ----------------------------------------
# (tests/unit/test_task_state.py, test_pr_to_green.py, test_leases.py)

TID = "acme_repo-7"
A1, A2 = "agent-1", "agent-2"
ACTOR = "coordinator"
ISSUE = IssueRef(source="github", repo="acme/repo", number=7, title="Fix it", labels=("bug",))
H1, H2, H3 = "1" * 40, "2" * 40, "3" * 40  # the pull request's head commits, push by push
Q1, B1, M1 = "9" * 40, "b" * 40, "m" * 40  # a merge queue candidate, a base commit, a merge
CHANGED = ("src/calc.py",)  # what the agent's change touches (its tests report it)

# check sets, one per classification (tests/unit/test_checks.py pins each one down)
PASS = (CheckRun(name="lint", conclusion="success"), CheckRun(name="test", conclusion="success"))
RED = (CheckRun(name="lint", conclusion="success"),  # the log names the changed module's test
       CheckRun(name="test", conclusion="failure", run_id=11,
                log_tail="FAILED tests/test_calc.py::test_add - assert add(1, 2) == 3"))
FLAKY = (CheckRun(name="lint", conclusion="success"),  # names nothing the change touches
         CheckRun(name="test", conclusion="failure", run_id=12,
                  log_tail="FAILED tests/test_net.py::test_fetch - ReadTimeout"))
GREEN_BASE = {"lint": "success", "test": "success"}  # the checks on the base commit
RED_BASE = {"lint": "success", "test": "failure"}
INFRA = (CheckRun(name="lint", conclusion="success"),
         CheckRun(name="test", conclusion="failure", run_id=13,
                  log_tail="The runner has received a shutdown signal."))
WAITING = (CheckRun(name="lint", conclusion="success"),
           CheckRun(name="test", conclusion="action_required", run_id=14, started=False))


def cmd(cls: type, **kw) -> ts.Command:
    kw.setdefault("at", AT)
    kw.setdefault("actor", ACTOR)
    return cls(**kw)


def ev(cls: type, version: int, *, at=AT, actor=ACTOR, causation_id=None, **payload):
    return cls(event_id=f"{TID}:{version}", task_id=TID, version=version, occurred_at=at,
               correlation_id=TID, causation_id=causation_id, actor=actor, **payload)


class Cut:
    """A history step: ``command``'s chain of events cut after the first ``keep``, for
    the states a chain passes through and never rests in (checks_failed, conflicted):
    the log as it is between two events of one decision."""

    def __init__(self, command: ts.Command, keep: int = 1) -> None:
        self.command, self.keep = command, keep


def run(steps, events=()) -> list:
    """Decide and apply each command (or :class:`Cut`) in turn; the log they produce."""
    log, state = list(events), ts.fold(events)
    for step in steps:
        new = (ts.decide(state, step.command)[:step.keep] if isinstance(step, Cut)
               else ts.decide(state, step))
        state = ts.fold(new, state)
        log += new
    return log


def task(log) -> Given:
    return given(log, machine=ts)


def pr_opened(head: str = H1, agent: str = A1, **kw) -> ts.Command:
    return cmd(ts.OpenPullRequest, agent_id=agent, branch="ccc/7", pr_url="https://x/pr/3", pr_number=3,
               head_sha=head, base_branch="main", **kw)


def checks(head: str, runs=PASS, **kw) -> ts.Command:
    return cmd(ts.RecordChecks, head_sha=head, checks=runs, **kw)


def round_trip(head: str, agent: str = A1) -> list[ts.Command]:
    """A fix or rebase round: assigned again, worked, tested, pushed (same PR, new head)."""
    return [cmd(ts.AssignTask, agent_id=agent), cmd(ts.StartTask, agent_id=agent),
            cmd(ts.StartTests, agent_id=agent, files_changed=CHANGED), pr_opened(head, agent)]


HAPPY = [
    cmd(ts.StartAnalysis), cmd(ts.RecordAnalysis, analysis=Analysis(specialty="backend", paths=CHANGED)),
    cmd(ts.AssignTask, agent_id=A1), cmd(ts.StartTask, agent_id=A1),
    cmd(ts.StartTests, agent_id=A1, files_changed=CHANGED), pr_opened(H1), checks(H1), cmd(ts.CompleteTask),
]
PATHS: dict[str, list] = {status: HAPPY[:i] for i, status in enumerate(
    ["pending", "analyzing", "queued", "assigned", "in_progress", "testing", "checking", "review",
     "completed"])}
PATHS |= {
    "failed": HAPPY[:5] + [cmd(ts.FailTask, reason="tests red", phase="testing", agent_id=A1)],
    "cancelled": [cmd(ts.CancelTask, reason="duplicate")],
    "checks_failed": HAPPY[:6] + [Cut(checks(H1, RED))],  # -> a fix round follows
    "needs_human": HAPPY[:6] + [cmd(ts.ChecksTimedOut, waited=1800)],
    "conflicted": HAPPY[:7] + [Cut(cmd(ts.RecordConflict, base_branch="main", base_sha=B1, files=CHANGED))],
    "merge_queued": HAPPY[:7] + [cmd(ts.ApprovePullRequest, by="maintainer", merge_queue=True)],
}
PATHS["merging"] = PATHS["merge_queued"] + [
    cmd(ts.StartMergeTest, queue_ref="ccc/queue/main", queue_sha=Q1, base_sha=B1)]


def history(status: str, max_attempts: int = 3) -> list:
    """A log that leaves the task in ``status`` (by the paths above)."""
    return run([cmd(ts.CreateTask, task_id=TID, issue=ISSUE, max_attempts=max_attempts), *PATHS[status]])
