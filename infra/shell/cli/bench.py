"""``ccc bench``: the store and dispatch benchmarks, and how their results are shown."""

from __future__ import annotations

import sys

import click
import msgspec

from infra.shell.cli.context import CliState, run_async
from infra.shell.cli.output import console, emit_json, print_table

APPEND_TARGET, REBUILD_TARGET = 0.5, 0.75
SECURITY_OPTION = click.option(
    "--security", type=click.Choice(["both", "off", "on"]), default="both", show_default=True,
    help="Measure with security off (plain, no auth, unencrypted store), on (mutual TLS, nkey users "
         "with role permissions, encrypted store, as `ccc up` runs), or both in the same run.")


@click.group("bench")
def bench_group() -> None:
    """Benchmarks against the client ceiling."""


@bench_group.command("store")
@click.option("--events", "n_events", type=click.IntRange(min=7), default=20000, show_default=True,
              help="Events per round.")
@click.option("--rounds", type=click.IntRange(1, 50), default=3, show_default=True)
@SECURITY_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def bench_store(obj: CliState, n_events: int, rounds: int, security: str, as_json: bool) -> None:
    """Event store append and rebuild vs raw nats-py, security off beside on.

    Targets: append >= 0.5 of raw pipelined publish, rebuild >= 0.75 of a raw
    ordered-consumer replay (each against the raw figure on the same server). Uses its
    own temporary nats-servers."""
    from infra.shell.bench.store import run_store_bench

    sync_interval = obj.settings().sync_interval
    result = _with_progress(rounds, lambda progress: run_async(run_store_bench(
        n_events=n_events, rounds=rounds, sync_interval=sync_interval, progress=progress, security=security)))
    if as_json:
        emit_json({**msgspec.to_builtins(result), "append_target": APPEND_TARGET,
                   "rebuild_target": REBUILD_TARGET})
        return

    def row(name, raw, ours, ratio, target):
        return (name, f"{raw:,.0f}/s", f"{ours:,.0f}/s", f"{ratio:.3f}", f">= {target}",
                "ok" if ratio >= target else "BELOW")

    table = []
    for side in [result] + ([result.secure] if result.secure is not None else []):
        table += [
            (side.security, *row("append", side.raw_publish_per_s, side.append_per_s, side.append_ratio,
                                 APPEND_TARGET)),
            (side.security, *row("rebuild", side.raw_replay_per_s, side.rebuild_per_s, side.rebuild_ratio,
                                 REBUILD_TARGET)),
        ]
    footer = [f"{result.events} events x {result.rounds} rounds (median), "
              f"{result.avg_event_bytes} B/event, sync_interval {result.sync_interval}"]
    for side in [result] + ([result.secure] if result.secure is not None else []):
        footer.append(f"security {side.security}: {side.security_detail}")
    if result.on_vs_off:
        footer.append("security on/off: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x"
                                                     for k, v in result.on_vs_off.items()))
    print_table(("SECURITY", "METRIC", "RAW", "PROJECT", "RATIO", "TARGET", "RESULT"), table, footer=footer)


@bench_group.command("dispatch")
@click.option("--agents", "agents", type=click.IntRange(min=1), default=None,
              help="Registered idle agents for the latency runs (one run). Default: 10, 100 and 1000.")
@click.option("--tasks", type=click.IntRange(min=1), default=200, show_default=True,
              help="Issues per latency run, published one at a time.")
@click.option("--throughput-tasks", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Issues for the throughput run, published pipelined (0: skip it).")
@click.option("--throughput-agents", type=click.IntRange(min=1), default=10, show_default=True,
              help="Null agents in the throughput run.")
@click.option("--sync-interval", default="always", show_default=True, metavar="INTERVAL",
              help='The throwaway server\'s JetStream sync_interval ("always" fsyncs every write; e.g. "1s").')
@click.option("--immediate-reports", is_flag=True,
              help="Null agents report back to back instead of after the coordinator's previous reaction.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Run the coordinator under cProfile; write its stats to DIR (inflates the figures).")
@SECURITY_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench_dispatch(agents: int | None, tasks: int, throughput_tasks: int, throughput_agents: int,
                   sync_interval: str, immediate_reports: bool, profile_dir: str | None, security: str,
                   as_json: bool) -> None:
    """Coordinator dispatch latency and orchestration throughput vs raw JetStream,
    security off beside on.

    Latency: issue published -> TaskAssigned observed, one issue at a time, with N idle
    agents. Throughput: issues -> completed through the whole task state machine with
    null agents that do no work. Targets: p50 <= 3 ms, p99 <= 10 ms (100 agents),
    >= 1,000 tasks/s. Uses its own temporary nats-servers (one per security setting,
    measured alternately in the same run); the coordinator runs in its own process."""
    from infra.shell.bench.dispatch import run_dispatch_bench
    from infra.shell.bench.report import comparison_rows, footer, rows, run_footer, title

    counts = (agents,) if agents else (10, 100, 1000)
    steps = (2 if security == "both" else 1) * (1 + len(counts) + (1 if throughput_tasks else 0))
    result = _with_progress(steps, lambda progress: run_async(run_dispatch_bench(
        agent_counts=counts, tasks=tasks, throughput_tasks=throughput_tasks, sync_interval=sync_interval,
        progress=progress, throughput_agents=throughput_agents, profile_dir=profile_dir,
        immediate_reports=immediate_reports, security=security)))
    if as_json:
        emit_json(msgspec.to_builtins(result))
        return
    for side in result.sides():
        print_table(("METRIC", "VALUE", "BASELINE", "RATIO", "TARGET", "RESULT"), rows(side),
                    title=title(side), footer=footer(side))
        click.echo()
    if result.on_vs_off:
        print_table(("METRIC", "SECURITY OFF", "SECURITY ON", "ON/OFF"), comparison_rows(result),
                    title="security on vs off (same run)")
    for line in run_footer(result):
        click.echo(line)


@bench_group.command("sandbox")
@click.option("--runs", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="Runs of each command on each side.")
@click.option("--no-proxy", is_flag=True, help="Skip the side with a network allow-list (proxy + forwarder).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def bench_sandbox(obj: CliState, runs: int, no_proxy: bool, as_json: bool) -> None:
    """What the sandbox costs per command: `true` and a Python start-up, plain beside
    bubblewrap (and bubblewrap with a network allow-list), through the workspace's real
    command runner, alternating, in the same run. Needs bubblewrap (CCC_SANDBOX_BIN)."""
    from infra.shell.bench.sandbox import run_sandbox_bench

    executable = obj.settings().sandbox_bin or "bwrap"
    total = runs * 2
    result = _with_progress(total, lambda progress: run_async(run_sandbox_bench(
        runs=runs, proxy=not no_proxy, executable=executable, progress=progress)))
    if as_json:
        emit_json(msgspec.to_builtins(result))
        return
    table = []
    for r in result.results:
        plain = r.side == "plain"
        table.append((r.command, r.side, f"{r.median_ms:.2f}", f"{r.mean_ms:.2f}", f"{r.p90_ms:.2f}",
                      "-" if plain else f"{result.overhead_ms[r.command][r.side]:+.2f}",
                      "-" if plain else f"{result.ratios[r.command][r.side]:.2f}x"))
    print_table(("COMMAND", "SIDE", "MEDIAN MS", "MEAN MS", "P90 MS", "OVER PLAIN MS", "RATIO"), table,
                footer=[f"{result.runs} runs of each, alternating, through Workspace.run"])


def _with_progress(rounds: int, fn):
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(console=console(stderr=True), transient=True) as progress:
            bar = progress.add_task("benchmarking", total=rounds)
            return fn(lambda done, total: progress.update(bar, completed=done))
    return fn(lambda done, total: click.echo(f"bench: round {done}/{total} done", err=True))
