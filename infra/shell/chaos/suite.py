"""``ccc chaos``: the fault suite. It proves, with figures, that nothing is lost and
nothing happens twice whatever fails.

Each scenario run builds a throwaway world under a temp dir: its own nats-server (or a
3-node JetStream cluster), a tiny sample repository on the local forge, recorded
sessions for the scripted coder, and the real actors as real processes
(``ccc up --agents 0 --no-api`` for a coordinator, ``ccc agent`` for each agent).
It publishes N issues at once, injects its fault at random moments while they are in
flight, waits (bounded) until every task is in review, stops everything and then
judges the run from the event log alone (:mod:`infra.chaos_checks`).

Recovery times are read from the log's own timestamps (the stream's append times),
measured from the harness's wall clock at the fault; the scenarios say from what to
what (:mod:`infra.chaos_scenarios`).

This module: options, results, aggregation, running the scenarios, the table and the
``ccc chaos`` command. The processes are in :mod:`infra.chaos_procs`, the sandbox and
progress tracking in :mod:`infra.chaos_sandbox`.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import click
import msgspec
import structlog

from events.subjects import Namespace

from infra.shell.chaos.checks import percentile
from infra.shell.chaos.processes import CCC, Proc, clean_env, processes_under  # noqa: F401 - re-exported
from infra.shell.chaos.sandbox import FIX, REPO, REPO_FILES, Sandbox, Tracker  # noqa: F401 - re-exported

log = structlog.get_logger("ccc.chaos")


class ChaosOptions(msgspec.Struct, kw_only=True):
    quick: bool = False
    tasks: int | None = None  # issues per run (default: 12 quick, 40 full)
    runs: int | None = None  # runs per scenario (default: per scenario)
    seed: int | None = None
    keep: bool = False  # keep every sandbox (failed runs are always kept)
    work_dir: str | None = None
    agents: int = 3
    capacity: int = 2
    heartbeat_timeout: float = 2.0
    work_seconds: float = 2.5  # each recorded session sleeps this long: tasks stay in flight
    run_timeout: float | None = None

    @property
    def n_tasks(self) -> int:
        return self.tasks or (12 if self.quick else 40)

    @property
    def timeout(self) -> float:
        return self.run_timeout or (60.0 if self.quick else 240.0)

    # a run whose log has not grown for this long (after the faults) is stuck: longer
    # than a consumer's ack wait (30 s), after which an unacknowledged message comes back
    stall: float = 40.0


class RunResult(msgspec.Struct, kw_only=True):
    scenario: str
    run: int
    tasks: int
    lost: int
    duplicated: int
    other: int  # illegal histories, stale transitions, unmet scenario expectations
    recoveries: list[float] = []
    faults: int = 0
    seconds: float = 0.0
    final_states: dict[str, int] = {}
    notes: list[str] = []
    violations: list[str] = []
    sandbox: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.other == 0


class ScenarioResult(msgspec.Struct, kw_only=True):
    scenario: str
    runs: int
    tasks: int
    lost: int
    duplicated: int
    other: int
    faults: int
    recovery_p50: float | None
    recovery_max: float | None
    recovery_target: float | None
    recovery_what: str
    seconds: float
    ok: bool
    target_met: bool | None
    expected_failure: str = ""  # a known bug, reported loudly; see KNOWN_FAILURES
    notes: list[str] = []
    violations: list[str] = []
    sandboxes: list[str] = []


def summarise(name: str, runs: list[RunResult], target: float | None, what: str,
              expected_failure: str = "") -> ScenarioResult:
    rec = [r for run in runs for r in run.recoveries]
    p50, worst = percentile(rec, 0.5), (max(rec) if rec else None)
    lost = sum(r.lost for r in runs)
    dup = sum(r.duplicated for r in runs)
    other = sum(r.other for r in runs)
    return ScenarioResult(
        scenario=name, runs=len(runs), tasks=sum(r.tasks for r in runs), lost=lost, duplicated=dup,
        other=other, faults=sum(r.faults for r in runs),
        recovery_p50=None if p50 is None else round(p50, 3),
        recovery_max=None if worst is None else round(worst, 3), recovery_target=target,
        recovery_what=what, seconds=round(sum(r.seconds for r in runs), 1),
        ok=lost == 0 and dup == 0 and other == 0,
        target_met=None if target is None or worst is None else worst <= target,
        expected_failure=expected_failure,
        notes=[f"run {r.run}: {n}" for r in runs for n in r.notes],
        violations=[f"run {r.run}: {v}" for r in runs for v in r.violations][:100],
        sandboxes=[r.sandbox for r in runs if r.sandbox],
    )


# -- running scenarios -------------------------------------------------------------------------
def new_namespace() -> Namespace:
    # no "_": see the dead-letter subject note in the report
    return Namespace("chaos" + uuid.uuid4().hex[:8])


async def run_chaos(names: list[str], options: ChaosOptions,
                    progress: Callable[[str], None] | None = None) -> list[ScenarioResult]:
    from infra.shell.chaos.scenarios import SCENARIOS

    rng = random.Random(options.seed)
    base = Path(options.work_dir) if options.work_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        spec = SCENARIOS[name]
        runs: list[RunResult] = []
        n_runs = options.runs or (spec.quick_runs if options.quick else spec.full_runs)
        for i in range(1, n_runs + 1):
            root = Path(tempfile.mkdtemp(prefix=f"ccc-chaos-{name}-", dir=base))
            sandbox = Sandbox(root, new_namespace(), options, random.Random(rng.random()))
            started = time.monotonic()
            try:
                result = await spec.run(sandbox, i)
            except Exception as e:
                log.exception("chaos.run_crashed", scenario=name, run=i)
                result = RunResult(scenario=name, run=i, tasks=len(sandbox.issues), lost=len(sandbox.issues),
                                   duplicated=0, other=1,
                                   violations=[f"harness: the run crashed: {type(e).__name__}: {e}"])
            finally:
                with contextlib.suppress(Exception):
                    await sandbox.close()
            result.seconds = round(time.monotonic() - started, 1)
            if options.keep or not result.ok:
                result.sandbox = str(root)
            else:
                shutil.rmtree(root, ignore_errors=True)
            runs.append(result)
            if progress is not None:
                progress(f"{name} run {i}/{n_runs}: {result.tasks} tasks, lost {result.lost}, "
                         f"duplicated {result.duplicated}, other {result.other}, "
                         f"{result.seconds}s")
        results.append(summarise(name, runs, spec.target, spec.recovery, spec.expected_failure))
    return results


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


@click.command("chaos")
@click.option("--quick", is_flag=True, help="Fewer tasks and runs: a CI-sized pass (a few minutes).")
@click.option("--scenario", "scenarios", multiple=True, metavar="NAME",
              help="Run only this scenario (repeatable). Default: all.")
@click.option("--tasks", type=click.IntRange(1, 500), default=None, help="Issues per run [12 quick, 40 full].")
@click.option("--runs", type=click.IntRange(1, 50), default=None, help="Runs per scenario [per scenario].")
@click.option("--seed", type=int, default=None, help="Random seed for the fault timing.")
@click.option("--keep", is_flag=True, help="Keep every run's sandbox (failed runs are always kept).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where sandboxes go [default: the temp dir].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per scenario.")
def chaos_cmd(quick, scenarios, tasks, runs, seed, keep, work_dir, as_json) -> None:
    """The fault suite: crashes, restarts, duplicates, poison messages, a 3-node cluster.

    Starts its own throwaway NATS servers and actor processes, runs each scenario with
    many tasks in flight, checks the invariants from the event log and prints one row
    per scenario. Exits 1 if anything was lost, duplicated or corrupted."""
    from infra.shell.chaos.scenarios import SCENARIOS
    from infra.shell.cli.main import run_async
    from infra.shell.cli.read import emit_json, print_table

    names = list(scenarios) or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
                                 param_hint="--scenario")
    options = ChaosOptions(quick=quick, tasks=tasks, runs=runs, seed=seed, keep=keep, work_dir=work_dir)
    results = run_async(run_chaos(names, options, progress=lambda line: click.echo(f"chaos: {line}", err=True)))
    assert isinstance(results, list)
    if as_json:
        for r in results:
            emit_json(r)
    else:
        rows = []
        for r in results:
            target = "-" if r.recovery_target is None else f"<= {r.recovery_target:g}s"
            verdict = "ok" if r.ok else ("FAIL (known bug)" if r.expected_failure else "FAIL")
            if r.ok and r.target_met is False:
                verdict = "ok, SLOW"
            rows.append((r.scenario, r.runs, r.tasks, r.lost, r.duplicated, r.other, r.faults,
                         _fmt(r.recovery_p50), _fmt(r.recovery_max), target, verdict))
        footer = [f"recovery: {r.scenario}: {r.recovery_what}" for r in results if r.recovery_what]
        for r in results:
            if r.expected_failure:
                footer.append(f"KNOWN BUG ({r.scenario}): {r.expected_failure}")
            for v in r.violations[:10]:
                footer.append(f"{r.scenario}: {v}")
            for n in r.notes[:10]:
                footer.append(f"{r.scenario}: {n}")
            for s in r.sandboxes:
                footer.append(f"{r.scenario}: kept {s}")
        print_table(("SCENARIO", "RUNS", "TASKS", "LOST", "DUPLICATED", "OTHER", "FAULTS",
                     "RECOVERY P50", "RECOVERY MAX", "TARGET", "RESULT"), rows, footer=footer)
    if not all(r.ok for r in results):
        sys.exit(1)
