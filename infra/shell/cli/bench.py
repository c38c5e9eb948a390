"""``ccc bench``: the store, dispatch, sandbox and status API benchmarks, ``ccc soak``, and
how their results are shown."""

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


@bench_group.command("workspace")
@click.option("--files", type=click.IntRange(3, 1_000_000), default=None,
              help="Files of the generated repository [default: 30,000; --quick 2,000].")
@click.option("--commits", type=click.IntRange(1, 1_000_000), default=None,
              help="Its commits [default: 5,000; --quick 200].")
@click.option("--rounds", type=click.IntRange(1, 50), default=None, help="[default: 5; --quick 2]")
@click.option("--quick", is_flag=True, help="CI-sized: a small repository, 2 rounds; targets shown, not enforced.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the run's repositories go [default: the temp dir].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench_workspace(files: int | None, commits: int | None, rounds: int | None, quick: bool, work_dir: str | None,
                    as_json: bool) -> None:
    """How long a task waits for its workspace on a large repository (a warm mirror and
    a first task), beside the raw git operations measured in the same run: plain and
    local clones, `git worktree add` and `git clone --shared` from a mirror, a copy of a
    warm checkout. Also the analysis phase and the implement phase's git beside plain
    git, and what a finished task keeps.

    Generates the repository with `git fast-import` in a temporary directory. Targets:
    warm <= 0.3x the plain clone and <= 1.2x the fastest raw method, first task <= the
    plain clone. Exits 1 if one is missed (not with --quick)."""
    from infra.shell.bench.workspace import (
        FULL,
        QUICK,
        STEPS_PER_ROUND,
        footer,
        phase_rows,
        rows,
        run_workspace_bench,
        target_rows,
    )

    size = QUICK if quick else FULL
    files, commits, rounds = files or size["files"], commits or size["commits"], rounds or size["rounds"]
    result = _with_progress(rounds * STEPS_PER_ROUND, lambda progress: run_workspace_bench(
        files=files, commits=commits, rounds=rounds, progress=progress, work_dir=work_dir))
    if as_json:
        emit_json(msgspec.to_builtins(result))
    else:
        print_table(("METHOD", "MEDIAN", "MIN–MAX", "X PLAIN CLONE", "NOTE"), rows(result),
                    title="a task's workspace: raw git beside ours, same repository, same run")
        click.echo()
        print_table(("TARGET", "RATIO", "LIMIT", "RESULT"), target_rows(result))
        click.echo()
        print_table(("PHASE", "OURS", "RAW FLOOR", "RATIO"), phase_rows(result), footer=footer(result))
    if not result.targets_met and not quick:
        sys.exit(1)


@bench_group.command("task")
@click.option("--files", type=click.IntRange(3, 1_000_000), default=None,
              help="Files of the large generated repository [default: 30,000; --quick 2,000].")
@click.option("--commits", type=click.IntRange(1, 1_000_000), default=None,
              help="Its commits [default: 5,000; --quick 200].")
@click.option("--tasks", type=click.IntRange(2, 100), default=None,
              help="Tasks per repository, one after another: the first cold, the others warm [default: 5; "
                   "--quick 3].")
@click.option("--quick", is_flag=True, help="CI-sized: a 2,000-file large repository, 3 tasks each; the target "
                                            "shown, not enforced.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the run's server, repositories and workspaces go [default: the temp dir].")
@click.option("--security", type=click.Choice(["off", "on"]), default="off", show_default=True,
              help="The bench's nats-server plain, or secured as `ccc up` secures it (mutual TLS, the "
                   "coordinator and the agent each as its own nkey user with its role's permissions, the "
                   "store encrypted). The agent's sandbox is the default either way.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench_task(files: int | None, commits: int | None, tasks: int | None, quick: bool, work_dir: str | None,
               security: str, as_json: bool) -> None:
    """What a task costs besides the coder and the tests, phase by phase (workspace,
    analysis, commit, push, pull request, every report appended), beside each phase's
    raw floor measured in the same run on the same repository.

    A throwaway nats-server, the coordinator and one real agent composed as `ccc up`
    composes them (the scripted coder, the local forge, the real workbench), on a small
    (50 files) and a large generated repository. Phases are read from the log (each
    report's own time and its store time). Target: <= 1 s of overhead per task on the
    large repository, warm (median). Exits 1 if it is missed (not with --quick)."""
    from infra.shell.bench.task import FULL, QUICK, footer, run_task_bench, table_rows, verdict_rows

    size = QUICK if quick else FULL
    files, commits, tasks = files or size["files"], commits or size["commits"], tasks or size["tasks"]
    result = run_async(run_task_bench(files=files, commits=commits, tasks=tasks, work_dir=work_dir,
                                      security=security,
                                      progress=lambda step: click.echo(f"bench task: {step}", err=True)))
    if as_json:
        emit_json(msgspec.to_builtins(result))
    else:
        for run in result.repos:
            print_table(("PHASE", "WARM (MEDIAN)", "FIRST TASK", "RAW FLOOR", "RATIO", "WHAT"), table_rows(run),
                        title=f"a task on the {run.name} repository ({run.repo}): ours beside the raw floors",
                        footer=footer(result, run))
            click.echo()
        print_table(("OVERHEAD", "FIGURE", "TARGET", "RESULT"), verdict_rows(result))
    if not result.ok and not quick:
        sys.exit(1)


@bench_group.command("api")
@click.option("--tasks", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True,
              help="Tasks on the board the API serves.")
@click.option("--agents", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--rate", type=click.FloatRange(1, 100_000), default=500.0, show_default=True,
              help="Requests per second, open loop (each timed from when it was due).")
@click.option("--seconds", type=click.FloatRange(0.2, 600), default=2.0, show_default=True,
              help="Per endpoint per round.")
@click.option("--rounds", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Rounds over every endpoint; each p99 is the median of the rounds' p99s.")
@click.option("--endpoint", "endpoints", multiple=True, metavar="NAME",
              help="Measure only this endpoint (repeatable; hello, the baseline, always runs): "
                   "task, tasks, agent, agents, health.")
@click.option("--quick", is_flag=True, help="CI-sized: 1,000 tasks, 20 agents, 2 rounds of 0.5 s per endpoint.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Run the API process under cProfile; write its stats to FILE (inflates the figures).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench_api(tasks: int, agents: int, rate: float, seconds: float, rounds: int, endpoints: tuple[str, ...],
              quick: bool, profile_path: str | None, as_json: bool) -> None:
    """The status API under an open-loop load vs a hello-world route of the same
    framework on the same server, in the same run.

    A throwaway nats-server holds a board appended straight to its log; the API runs
    as `ccc api` runs it, in its own process, with one extra route (/bench/hello).
    Latency counts from when each request was due (no coordinated omission). Targets:
    task, tasks, agent and agents p99 <= 1.5x hello's; /health no more CPU per request
    than a task read. Exits 1 if a target is missed."""
    from infra.shell.bench.api import ENDPOINTS, run_api_bench

    unknown = [e for e in endpoints if e not in ENDPOINTS]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(ENDPOINTS)}",
                                 param_hint="--endpoint")
    if quick:
        tasks, agents, seconds, rounds = min(tasks, 1000), min(agents, 20), min(seconds, 0.5), 2
    chosen = tuple(endpoints) or ENDPOINTS
    steps = rounds * len({"hello", *chosen})
    result = _with_progress(steps, lambda progress: run_async(run_api_bench(
        tasks=tasks, agents=agents, rate=rate, seconds=seconds, rounds=rounds, endpoints=chosen,
        progress=progress, profile_path=profile_path)))
    if as_json:
        emit_json(msgspec.to_builtins(result))
    else:
        table = [(r.endpoint, r.example, f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.p99_pooled_ms:.2f}",
                  "-" if r.endpoint == "hello" else f"{r.p50_x_hello:.2f}x",
                  "-" if r.endpoint == "hello" else f"{r.p99_x_hello:.2f}x",
                  f"{r.api_cpu_ms:.3f}", f"{r.nats_cpu_ms:.3f}", f"{r.preempted_per_s:g}",
                  f"{r.bytes_per_response:,}",
                  ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0",
                  r.target or "-", "-" if r.ok is None else "ok" if r.ok else "MISSED")
                 for r in result.endpoints]
        gc_words = ", ".join(f"gen{g} {v['count']} (longest {v['max_ms']:g} ms)"
                             for g, v in sorted(result.api_gc.items()))
        footer = [(f"{result.rate:g} requests/s open loop, {result.seconds:g} s per endpoint x {result.rounds} "
                   "rounds (order rotated; p99: the median of the rounds' p99s, pooled beside it; p99/hello: "
                   "the median of the ratios within each round)"),
                  f"board: {result.tasks:,} tasks, {result.agents:,} agents ({result.events:,} events)",
                  ("latency from when each request was due; generator lag (sent - due) "
                   f"p50 {result.lag_p50_ms:.2f} / p99 {result.lag_p99_ms:.2f} ms, {result.connections} connections, "
                   f"driver cpu {result.driver_cpu_ms:.3f} ms/request"),
                  f"API process garbage collections while serving: {gc_words or 'not reported'}",
                  f"{result.cpus} cpus, load {result.loadavg[0]:.1f} -> {result.loadavg[1]:.1f}"]
        print_table(("ENDPOINT", "EXAMPLE", "P50 MS", "P99 MS", "POOLED P99", "P50/HELLO", "P99/HELLO",
                     "API CPU MS/REQ", "NATS CPU MS/REQ", "PREEMPTED/S", "BYTES", "ERRORS", "TARGET", "RESULT"), table,
                    title="status API vs hello world, same server, same run", footer=footer)
    if not result.targets_met:
        sys.exit(1)


@click.command("soak")
@click.option("--minutes", type=click.FloatRange(0.5, 24 * 60), default=60.0, show_default=True,
              help="How long the stream of issues runs (the drain and the checks come after).")
@click.option("--rate", type=click.FloatRange(0.5, 600), default=12.0, show_default=True,
              help="Issues published per minute, on schedule.")
@click.option("--agents", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--capacity", type=click.IntRange(1, 32), default=1, show_default=True,
              help="Tasks each agent works on at once.")
@click.option("--sample-every", type=click.FloatRange(0.5, 600), default=None, metavar="SECONDS",
              help="Seconds between samples [default: 5; 2 for runs under 5 minutes].")
@click.option("--warmup", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Samples before this are not fitted [default: a quarter of the run, 20 s to 10 min].")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the run's directory goes [default: the temp dir].")
@click.option("--keep", is_flag=True, help="Keep the run's directory (a failed run's is always kept).")
@click.option("--samples", "samples_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write every sample as JSON lines to FILE.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (samples included).")
@click.pass_obj
def soak_cmd(obj: CliState, minutes: float, rate: float, agents: int, capacity: int, sample_every: float | None,
             warmup: float | None, work_dir: str | None, keep: bool, samples_path: str | None,
             as_json: bool) -> None:
    """A steady stream of tasks through `ccc up` for --minutes: RSS, open files,
    consumers, KV and stream sizes and workspace disk sampled, their slopes after the
    warm-up fitted and judged, the log checked for anything lost.

    Starts its own `ccc up` (secure, as by default; the global --insecure runs it
    without), the scripted coder and a small repository on a local forge in a
    directory of its own; the harness merges every pull request whose checks are
    green. Exits 1 if a slope is over its limit or anything was lost."""
    from infra.shell.bench.soak import SoakOptions, run_soak

    options = SoakOptions(minutes=minutes, rate=rate, agents=agents, capacity=capacity, sample_every=sample_every,
                          warmup=warmup, work_dir=work_dir, keep=keep,
                          insecure=obj is not None and obj.settings().insecure)
    try:
        options.validate()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    result = run_async(run_soak(options, progress=lambda line: click.echo(f"soak: {line}", err=True)))
    if samples_path:
        with open(samples_path, "w") as f:
            f.writelines(msgspec.json.encode(s).decode() + "\n" for s in result.samples)
    if as_json:
        emit_json(msgspec.to_builtins(result))
    else:
        from infra.shell.bench.soak import METRIC_WORDS

        table = [(METRIC_WORDS[s.metric], f"{s.first:,.2f} {s.unit}", f"{s.last:,.2f} {s.unit}",
                  f"{s.per_hour:+,.2f}", f"{s.per_task:+.4f}", f"<= {s.limit:g} {s.unit}/{s.limit_per}",
                  "flat" if s.flat else "GROWS")
                 for s in result.slopes]
        footer = [(f"{result.published} issues at {result.rate:g}/min for {result.minutes:g} min, {result.agents} "
                   f"agents x {result.capacity}; {result.completed} completed ({result.tasks_per_min:g}/min in the "
                   f"fitted window); security {result.security}"),
                  (f"slopes: least squares over the {result.fit_samples} samples after a {result.warmup_s:g} s "
                   "warm-up (open fds and consumers: over their rolling minimum)"),
                  (f"log: {result.lost} lost, {result.duplicated} duplicated, {result.illegal} illegal; final states "
                   + ", ".join(f"{k} {v}" for k, v in sorted(result.final_states.items())))]
        footer += result.violations[:10]
        if result.work_dir:
            footer.append(f"run directory kept: {result.work_dir}")
        print_table(("METRIC", "AFTER WARM-UP", "AT THE END", "PER HOUR", "PER TASK", "LIMIT", "RESULT"), table,
                    title="soak: slopes after the warm-up", footer=footer)
    if not result.ok:
        sys.exit(1)


@bench_group.command("fleet")
@click.option("--agents", type=click.IntRange(0, 100_000), default=1000, show_default=True,
              help="Real agents in the fleet run (0: skip it).")
@click.option("--tasks", type=click.IntRange(0, 10_000), default=100, show_default=True,
              help="Issues published at once to the fleet.")
@click.option("--connections", type=click.IntRange(0, 100_000), default=20, show_default=True,
              help="Connections the fleet's agents share (0: one each, as `ccc up` gives them).")
@click.option("--heartbeat-agents", type=click.IntRange(0, 100_000), default=1000, show_default=True,
              help="Agents heartbeating in the heartbeat run (0: skip it).")
@click.option("--window", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds of heartbeats whose CPU is measured.")
@click.option("--lose", type=click.IntRange(0), default=200, show_default=True,
              help="Heartbeating agents stopped at once after the window.")
@click.option("--sync-interval", default="always", show_default=True, metavar="INTERVAL",
              help='The throwaway servers\' JetStream sync_interval.')
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench_fleet(agents: int, tasks: int, connections: int, heartbeat_agents: int, window: float, lose: int,
                sync_interval: str, as_json: bool) -> None:
    """A thousand agents — and past it — on one machine, on throwaway nats-servers.

    Heartbeats: N agents heartbeat every 2 s; the coordinator's CPU beside a bare nats-py
    receiver of the same heartbeats over the same window, then K of them stop at once.
    Targets: the coordinator under 2 % of a core; every stopped agent declared offline
    between the timeout and the timeout plus 2 s. Fleet: real agents (as `ccc up` builds
    them) start beside the coordinator, then a batch of issues runs at once. Targets:
    one consumer per agent, every task completed (its pull request merged), nothing lost, no agent declared lost.
    Exits 1 if a target is missed."""
    from infra.shell.bench.fleet import fleet_rows, heartbeat_rows, run_fleet_bench

    if lose > heartbeat_agents:
        raise click.BadParameter(f"{lose} is more than the heartbeating agents ({heartbeat_agents})",
                                 param_hint="--lose")
    result = run_async(run_fleet_bench(
        agents=agents, tasks=tasks, connections=connections, heartbeat_agents=heartbeat_agents, window=window,
        lose=lose, sync_interval=sync_interval, progress=lambda step: click.echo(f"bench fleet: {step}", err=True)))
    if as_json:
        emit_json(msgspec.to_builtins(result))
    else:
        machine = (f"{result.cpus} CPUs, load average {result.loadavg_before:g} before, "
                   f"{result.loadavg_after:g} after; sync_interval {result.sync_interval}")
        foot = [machine]
        if result.heartbeats is not None:
            print_table(("METRIC", "VALUE", "TARGET", "RESULT"), heartbeat_rows(result.heartbeats),
                        title="heartbeats: the coordinator beside a bare receiver, same window", footer=foot)
        if result.fleet is not None:
            print_table(("METRIC", "VALUE", "TARGET", "RESULT"), fleet_rows(result.fleet),
                        title="the fleet: real agents, one machine", footer=foot)
    if not all(run.ok for run in (result.heartbeats, result.fleet) if run is not None):
        sys.exit(1)


def _with_progress(rounds: int, fn):
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(console=console(stderr=True), transient=True) as progress:
            bar = progress.add_task("benchmarking", total=rounds)
            return fn(lambda done, total: progress.update(bar, completed=done))
    return fn(lambda done, total: click.echo(f"bench: round {done}/{total} done", err=True))
