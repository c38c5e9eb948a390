"""``ccc chaos``: runs the fault suite (:mod:`infra.shell.chaos`) and prints one row per
scenario."""

from __future__ import annotations

import sys

import click

from infra.shell.cli.context import run_async
from infra.shell.cli.output import emit_json, print_table


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
@click.option("--insecure", is_flag=True,
              help="Run the servers without TLS, users or store encryption (the global --insecure does too). "
                   "Default: secure, as `ccc up` is.")
@click.pass_obj
def chaos_cmd(obj, quick, scenarios, tasks, runs, seed, keep, work_dir, as_json, insecure) -> None:
    """The fault suite: crashes, restarts, duplicates, poison messages, a 3-node cluster.

    Starts its own throwaway NATS servers and actor processes, runs each scenario with
    many tasks in flight, checks the invariants from the event log and prints one row
    per scenario. Exits 1 if anything was lost, duplicated or corrupted."""
    from infra.shell.chaos.model import ChaosOptions
    from infra.shell.chaos.scenarios import SCENARIOS
    from infra.shell.chaos.suite import run_chaos

    names = list(scenarios) or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
                                 param_hint="--scenario")
    # `ccc --insecure chaos` (or CCC_INSECURE=1) means it too; the global flag has warned already
    global_insecure = obj is not None and obj.settings().insecure
    if insecure and not global_insecure:
        click.echo("warning: --insecure: the chaos suite runs its servers without TLS, users or store "
                   "encryption", err=True)
    options = ChaosOptions(quick=quick, tasks=tasks, runs=runs, seed=seed, keep=keep, work_dir=work_dir,
                           insecure=insecure or global_insecure)
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
        footer.insert(0, "security: on (mutual TLS, per-role nkey users, encrypted store; TLS routes in the cluster)"
                      if all(r.secure for r in results) else "security: OFF (--insecure)")
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
