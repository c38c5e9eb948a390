"""The fault suite of ``ccc chaos``: it proves, with figures, that nothing is lost and
nothing happens twice whatever fails.

Each scenario run builds a throwaway world under a temp dir: its own nats-server (or a
3-node JetStream cluster), a tiny sample repository on the local forge, recorded
sessions for the scripted coder, and the real actors as real processes
(``ccc up --agents 0 --no-api`` for a coordinator, ``ccc agent`` for each agent).
Secure by default, as the cluster is deployed: mutual TLS, per-role nkey users, an
encrypted store and TLS routes, each process with its own role's credentials
(:mod:`.security`); ``--insecure`` runs the old way.
It publishes N issues at once, injects its fault at random moments while they are in
flight, waits (bounded) until every task is in review, stops everything and then
judges the run from the event log alone (:mod:`.checks`).

Recovery times are read from the log's own timestamps (the stream's append times),
measured from the harness's wall clock at the fault; the scenarios say from what to
what (:mod:`.scenarios`).

This module: running the scenarios and aggregating their runs. The shared types are
in :mod:`.model`, the processes in :mod:`.processes`, the sandbox and progress
tracking in :mod:`.sandbox`; the ``ccc chaos`` command (and its table) is
:mod:`infra.shell.cli.chaos`.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog

from events.subjects import Namespace

from infra.shell.chaos.checks import percentile
from infra.shell.chaos.model import ChaosOptions, RunResult, ScenarioResult
from infra.shell.chaos.sandbox import Sandbox
from infra.shell.chaos.scenarios import SCENARIOS

log = structlog.get_logger("ccc.chaos")


def summarise(name: str, runs: list[RunResult], target: float | None, what: str,
              expected_failure: str = "", secure: bool = True) -> ScenarioResult:
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
        expected_failure=expected_failure, secure=secure,
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
        results.append(summarise(name, runs, spec.target, spec.recovery, spec.expected_failure,
                                 secure=not options.insecure))
    return results
