"""The arithmetic of ``ccc bench task``: phases from the log's two clocks (a report's own
time and its store time), the coder split off the implementation, the overhead, the
rows' medians and ratios against the raw floors; and what the bench found: the
workbench's background chores (the warm checkout's refill) run below the task's
priority."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest

from infra.adapters.git.background import CHORES_NICE, Chores
from infra.shell.bench.task import (
    APPENDS,
    EXCLUDED,
    FLOOR_OF,
    ROW_PHASES,
    TARGET_FILE,
    TaskTimes,
    bench_files,
    dispatch_floor,
    floor_total,
    overhead,
    ratio,
    rows_of,
    target_text,
    task_times,
    to_ns,
)

MS = 1_000_000  # ns


def test_to_ns_is_exact_to_the_microsecond() -> None:
    at = datetime(2026, 12, 2, 8, 30, 1, 123456, tzinfo=UTC)
    assert to_ns(at) == int(at.timestamp()) * 1_000_000_000 + 123456 * 1000
    assert to_ns(at + timedelta(microseconds=1)) - to_ns(at) == 1000
    assert to_ns(datetime(1970, 1, 1, tzinfo=UTC)) == 0


def _stamps() -> dict[str, tuple[int, int]]:
    """A task whose every step takes a known time: each report is built 10 ms (times its
    place) after the previous one was stored, and stored 1 ms after it was built."""
    t = 1_000 * MS
    stamps = {"issue.opened": (t, 0)}
    for i, stage in enumerate(APPENDS, 1):
        at = t + 10 * i * MS
        t = at + 1 * MS
        stamps[stage] = (t, at)
    return stamps


def test_task_times_split_the_task_into_phases_and_appends_that_add_up() -> None:
    stamps = _stamps()
    phases, appends, total = task_times(stamps, coder=0.015)
    assert list(phases) == list(ROW_PHASES)
    assert phases["dispatch"] == pytest.approx(0.010)
    assert phases["workspace"] == pytest.approx(0.020)
    assert phases["analysis"] == pytest.approx(0.030)
    # implementation = 40 ms, of which the coder 15 ms
    assert phases["coder"] == pytest.approx(0.015) and phases["commit"] == pytest.approx(0.025)
    assert phases["testing"] == pytest.approx(0.050)
    assert phases["push"] == pytest.approx(0.060)
    assert phases["pull request"] == pytest.approx(0.070)
    assert phases["release"] == pytest.approx(0.080)
    assert appends == pytest.approx({a: 0.001 for a in APPENDS})
    assert total == pytest.approx(sum(phases.values()) + sum(appends.values()))
    assert total == pytest.approx((stamps["task_released"][0] - stamps["issue.opened"][0]) / 1e9)
    # the overhead leaves out the coder and the testing phase, nothing else
    assert overhead(phases, total) == pytest.approx(total - 0.015 - 0.050)
    assert set(EXCLUDED) == {"coder", "testing"}


def test_a_task_missing_from_the_log_is_an_error_naming_what_is_missing() -> None:
    stamps = _stamps()
    del stamps["changes_pushed"], stamps["issue.opened"]
    with pytest.raises(ValueError, match="issue.opened, changes_pushed"):
        task_times(stamps, coder=0.0)


def _task(n: int, scale: float) -> TaskTimes:
    phases = {k: scale * (i + 1) / 100 for i, k in enumerate(ROW_PHASES)}
    appends = {a: scale / 1000 for a in APPENDS}
    total = sum(phases.values()) + sum(appends.values())
    return TaskTimes(number=n, task_id=f"t-{n}", warm=n > 1, phases=phases, appends=appends, total=total,
                     refill=0.5, overhead=overhead(phases, total), test_command=0.01, pr_url="u", branch="b")


def test_rows_take_the_median_of_the_warm_tasks_against_each_floor() -> None:
    tasks = [_task(1, 10.0), _task(2, 1.0), _task(3, 3.0), _task(4, 2.0)]  # first cold, then warm
    floors = {"dispatch": 0.001, "workspace": 0.02, "analysis": 0.005, "commit": 0.01, "push": 0.02,
              "pull request": 0.002, "append": 0.0001}
    rows = {r.name: r for r in rows_of(tasks, floors)}
    ws = rows["workspace"]
    assert ws.warm == pytest.approx(0.04) and ws.first == pytest.approx(0.2)  # median of 1, 3, 2 (x 0.02)
    assert ws.floor == 0.02 and ws.ratio == 2.0 and ws.floor_what == FLOOR_OF["workspace"]
    assert rows["coder"].kind == rows["testing"].kind == "excluded" and rows["coder"].floor == 0.0
    assert rows["coder"].ratio == 0.0 and rows["release"].ratio == 0.0  # no floor, no ratio
    assert rows["append agent.pr_opened"].warm == pytest.approx(0.002)
    assert rows["append agent.pr_opened"].ratio == 20.0
    total = rows["overhead per task"]
    assert total.kind == "total"
    assert total.warm == pytest.approx(sorted(t.overhead for t in tasks[1:])[1], abs=1e-6)
    assert total.floor == pytest.approx(floor_total(floors), abs=1e-6)
    assert total.ratio == pytest.approx(total.warm / total.floor, abs=0.005)
    assert len(rows) == len(ROW_PHASES) + len(APPENDS) + 1


def test_the_floor_total_counts_every_budget_phase_and_every_append() -> None:
    floors = {"dispatch": 1.0, "workspace": 2.0, "analysis": 3.0, "commit": 4.0, "push": 5.0,
              "pull request": 6.0, "append": 0.5, "coder": 100.0, "testing": 100.0}
    assert floor_total(floors) == 21.0 + len(APPENDS) * 0.5  # the excluded phases are not counted
    assert dispatch_floor(rtt=0.5, hop=0.25) == pytest.approx(2.0)
    assert ratio(1.0, 0.0) == 0.0 and ratio(3.0, 2.0) == 1.5


def test_only_warm_tasks_count_unless_there_are_none() -> None:
    alone = rows_of([_task(1, 1.0)], {"workspace": 0.01})
    ws = next(r for r in alone if r.name == "workspace")
    assert ws.warm == ws.first == pytest.approx(0.02)


def test_the_scripted_fix_edits_exactly_one_file_once() -> None:
    files = bench_files(3)
    assert files[".ccc/test-command"].strip() == "true"
    assert files[TARGET_FILE] == target_text("before")
    scripts = [json.loads(files[f".ccc/scripts/{n}.json"]) for n in (1, 2, 3)]
    for script in scripts:
        (step,) = script["attempts"][0]["steps"]
        edit = step["edit"]
        assert edit["path"] == TARGET_FILE and files[TARGET_FILE].count(edit["old"]) == 1
        assert files[TARGET_FILE].replace(edit["old"], edit["new"]) == target_text("after")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_workbench_chores_and_their_git_run_niced_and_the_rest_of_the_process_does_not() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    seen: list[tuple[int, int]] = []
    chores = Chores(idle_exit=0.2)
    # a chore's own thread, and a process it starts (as the refill starts git)
    chores.submit("probe", lambda: seen.append((niceness(), int(subprocess.run(
        ["nice"], capture_output=True, text=True, check=True).stdout))))
    assert chores.settle(10)
    assert seen == [(CHORES_NICE, CHORES_NICE)]
    assert niceness() == before  # the agent's event loop and its other threads keep theirs
