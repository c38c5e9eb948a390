"""Results of ``ccc bench dispatch`` and how they are shown."""

from __future__ import annotations

import msgspec

# the bench's settings and targets (the other bench modules import them from here)
P50_TARGET_MS, P99_TARGET_MS, LATENCY_TARGET_AGENTS, TASKS_PER_S_TARGET = 3.0, 10.0, 100, 1000.0
REPO = "bench/app"
SPECIALTIES = ("backend", "frontend", "general")
HEARTBEAT_TIMEOUT = 3600.0  # null agents heartbeat once; none may be declared lost
WAIT_ASSIGNED = 15.0  # seconds one dispatch may take before the bench gives up
# The reviewer merges as soon as it sees task.pr_opened in the log, and publishes the
# merge again (a forge redelivering the webhook) if the task has not completed
# MERGE_RESEND seconds later, so that a merge the coordinator dropped cannot stall the
# run (it once could: a refusal decided on a read model that had not applied the
# pr_opened yet; fixed, see Coordinator._run). A merge may wait longer than 0.5 s
# without being lost: it queues in the intake behind a burst of new issues. With 0.5 s,
# 20-190 of 1,000 merges were resent per run (978 of 2,000), each counted as one more
# event; with 3 s, none, and no run slower.
MERGE_RESEND, MERGE_ATTEMPTS = 3.0, 20
STEP_TIMEOUT = 60.0  # a paced null agent waits this long for the coordinator's reaction
STALL = 15.0  # the throughput run gives up when no task completed for this long




# -- results -------------------------------------------------------------------------
class Hop(msgspec.Struct, kw_only=True):
    """One step of a task's way through the system, over all tasks of a run."""

    name: str
    p50_ms: float
    p99_ms: float


class CpuUse(msgspec.Struct, kw_only=True):
    """CPU used in a measured window (seconds; -1 where the platform does not say)."""

    seconds: float  # wall time of the window
    coordinator: float
    driver: float  # this process: the driver, observers, null agents and reviewer
    nats_server: float
    machine: float  # every process on the machine, ours and others'
    pressure: float  # fraction of the window in which some runnable task waited for a CPU

    def cores(self, cpu_seconds: float) -> float:
        return cpu_seconds / self.seconds if self.seconds > 0 and cpu_seconds >= 0 else -1.0


class LatencyRun(msgspec.Struct, kw_only=True):
    agents: int
    tasks: int  # measured (after the warm-up)
    warmup: int
    assigned: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    p50_x_raw: float  # p50 / raw round trip p50
    p99_x_raw: float  # p99 / raw round trip p99
    p50_ok: bool
    p99_ok: bool
    hops: list[Hop]
    coordinator: dict
    cpu: CpuUse  # over the measured tasks


class ThroughputRun(msgspec.Struct, kw_only=True):
    agents: int
    capacity: int
    tasks: int
    completed: int
    seconds: float  # first issue published -> last TaskCompleted observed
    publish_seconds: float  # first issue published -> last issue acknowledged
    tasks_per_s: float
    events: int  # everything appended meanwhile: issue facts, task and agent events
    events_per_task: float
    events_per_s: float
    events_x_raw: float  # events/s as a fraction of the raw pipelined publish rate
    # the events stream alone (task and agent events; the issue facts go to the issues
    # stream, which the server stores in parallel): its rate, and that over the raw rate
    # (raw: one stream as well, but no headers and no consumers)
    events_stream_per_s: float
    events_stream_x_raw: float
    # the null agents' appends to their own aggregates (each waits for the one before):
    # round trip, and how many messages the events stream stored while one was in flight
    # (the queue it waited in; see probes.appends_in_queue)
    agent_append_p50_ms: float
    agent_append_p99_ms: float
    stored_meanwhile_p50: int
    stored_meanwhile_p90: int
    merges_resent: int  # merges the reviewer published again: not completed within MERGE_RESEND
    reports_paced: bool  # null agents waited for the coordinator's reaction between reports
    ok: bool
    hops: list[Hop]
    coordinator: dict
    cpu: CpuUse  # first publish -> last completion


class DispatchSide(msgspec.Struct, kw_only=True):
    """One server's measurements: security off or on, raw floors included (the floors of
    the secure side are raw nats-py on the secure server, as its admin user)."""

    security: str = "off"  # "off" | "on"
    security_detail: str = ""  # what that means (transport, users, store encryption)
    users: int = 0  # nkey users on the server: admin, 4 service users per namespace, one per agent
    raw_rtt_p50_ms: float
    raw_rtt_p99_ms: float
    raw_hop_p50_ms: float
    raw_hop_p99_ms: float
    raw_publish_per_s: float
    raw_batch4_p50_ms: float = 0.0  # four events as one atomic batch (a multi-event decision)
    raw_seq4_p50_ms: float = 0.0  # the same four as awaited single publishes (the intake's write)
    # a raw round trip while a second connection pipelines into the same stream / another one
    raw_rtt_same_busy_p50_ms: float = 0.0
    raw_rtt_other_busy_p50_ms: float = 0.0
    latency: list[LatencyRun]
    throughput: ThroughputRun | None
    targets_met: bool  # this side's figures met every target


class OnOff(msgspec.Struct, kw_only=True):
    """One figure with security off and on, measured in the same run."""

    metric: str
    unit: str
    off: float
    on: float
    ratio: float  # on / off: > 1 for a latency means security costs time, < 1 for a rate


class DispatchBench(DispatchSide, kw_only=True):
    """The run. Its own measurement fields are the first side measured: security off
    (the reference of the ratios), or on when only that was asked for (``security``
    says which); ``secure`` holds the same measurements with security on when both
    were run, ``on_vs_off`` the ratios."""

    sync_interval: str
    coordinator_process: bool
    cpus: int
    loadavg: list[float]  # 1-minute load average before and after: other work on the machine
    targets: dict
    profiles: list[str] = []
    secure: DispatchSide | None = None
    on_vs_off: list[OnOff] = []

    def sides(self) -> list[DispatchSide]:
        return [self] if self.secure is None else [self, self.secure]


def compare(off: DispatchSide, on: DispatchSide) -> list[OnOff]:
    """Every figure measured on both sides, with on/off."""
    pairs: list[tuple[str, str, float, float]] = [
        ("raw round trip p50", "ms", off.raw_rtt_p50_ms, on.raw_rtt_p50_ms),
        ("raw round trip p99", "ms", off.raw_rtt_p99_ms, on.raw_rtt_p99_ms),
        ("raw hop p50", "ms", off.raw_hop_p50_ms, on.raw_hop_p50_ms),
        ("raw pipelined publish", "msgs/s", off.raw_publish_per_s, on.raw_publish_per_s),
    ]
    on_latency = {r.agents: r for r in on.latency}
    for a in off.latency:
        b = on_latency.get(a.agents)
        if b is not None:
            pairs += [(f"dispatch p50, {a.agents} agents", "ms", a.p50_ms, b.p50_ms),
                      (f"dispatch p99, {a.agents} agents", "ms", a.p99_ms, b.p99_ms)]
    if off.throughput is not None and on.throughput is not None:
        t, u = off.throughput, on.throughput
        pairs += [(f"throughput, {t.agents} null agents", "tasks/s", t.tasks_per_s, u.tasks_per_s),
                  ("throughput, events", "events/s", t.events_per_s, u.events_per_s)]
    return [OnOff(metric=m, unit=unit, off=x, on=y, ratio=round(y / x, 3) if x else 0.0)
            for m, unit, x, y in pairs]


def title(side: DispatchSide) -> str:
    users = f" ({side.users:,} nkey users)" if side.users else ""
    return f"security {side.security}: {side.security_detail}{users}"


def comparison_rows(result: DispatchBench) -> list[tuple[str, str, str, str]]:
    """The on-vs-off table: metric, off, on, on/off."""
    def fmt(v: float, unit: str) -> str:
        return f"{v:.2f} {unit}" if unit == "ms" else f"{v:,.0f} {unit}"

    return [(c.metric, fmt(c.off, c.unit), fmt(c.on, c.unit), f"{c.ratio:.2f}x") for c in result.on_vs_off]


def rows(result: DispatchSide) -> list[tuple[str, str, str, str, str, str]]:
    """One side's table: metric, value, baseline (the same side's raw floor), ratio,
    target, ok."""
    out = []
    rtt50, rtt99 = result.raw_rtt_p50_ms, result.raw_rtt_p99_ms
    for r in result.latency:
        out.append((f"dispatch p50, {r.agents} agents", f"{r.p50_ms:.2f} ms", f"{rtt50:.2f} ms raw rtt p50",
                    f"{r.p50_x_raw:.1f}x", f"<= {P50_TARGET_MS:g} ms", "ok" if r.p50_ok else "MISSED"))
        out.append((f"dispatch p99, {r.agents} agents", f"{r.p99_ms:.2f} ms", f"{rtt99:.2f} ms raw rtt p99",
                    f"{r.p99_x_raw:.1f}x", f"<= {P99_TARGET_MS:g} ms", "ok" if r.p99_ok else "MISSED"))
    t = result.throughput
    if t is not None:
        out.append((f"throughput, {t.agents} null agents", f"{t.tasks_per_s:,.0f} tasks/s", "-", "-",
                    f">= {TASKS_PER_S_TARGET:,.0f}/s", "ok" if t.ok else "MISSED"))
        out.append(("throughput, events", f"{t.events_per_s:,.0f} ev/s",
                    f"{result.raw_publish_per_s:,.0f}/s raw pipelined", f"{t.events_x_raw:.3f}", "-", "-"))
    return out


def run_footer(result: DispatchBench) -> list[str]:
    """What holds for the whole run (every side)."""
    lines = [f"sync_interval {result.sync_interval}; coordinator in its own process; {result.cpus} cpus "
             f"(load {result.loadavg[0]:.1f} -> {result.loadavg[1]:.1f})"]
    if result.secure is not None:
        lines.append("security off and on measured in the same run, alternating step by step "
                     "(raw, each latency run, throughput), each on its own server; on/off > 1 for a "
                     "latency, < 1 for a rate, is what security costs")
    if result.profiles:
        lines.append("coordinator profiles (figures inflated by profiling): " + " ".join(result.profiles))
    return lines


def footer(result: DispatchSide) -> list[str]:
    """One side's details: its raw floors, where the time goes, CPU."""
    lines = [
        (f"raw round trip p50 {result.raw_rtt_p50_ms:.3f} / p99 {result.raw_rtt_p99_ms:.3f} ms, "
         f"raw hop (publish->delivery) p50 {result.raw_hop_p50_ms:.3f} / p99 {result.raw_hop_p99_ms:.3f} ms"),
        (f"raw write of 4 events p50: one atomic batch {result.raw_batch4_p50_ms:.3f} ms, "
         f"4 awaited publishes {result.raw_seq4_p50_ms:.3f} ms (the intake writes its chain one by one: "
         "2 events with the rules, 4 with an analyser that takes time)"),
        (f"raw round trip p50 while another connection pipelines 100 at a time into the same stream "
         f"{result.raw_rtt_same_busy_p50_ms:.3f} ms, into another stream {result.raw_rtt_other_busy_p50_ms:.3f} ms "
         "(a stream stores one message at a time; every task and agent event is on the events stream)"),
    ]
    for r in result.latency:
        hops = ", ".join(f"{h.name} {h.p50_ms:.2f}" for h in r.hops)
        lines.append(f"hops p50 ms, {r.agents} agents ({r.tasks} tasks): {hops}")
        c, n = r.cpu, max(1, r.tasks)
        lines.append(f"  cpu ms per dispatch: coordinator {c.coordinator * 1000 / n:.2f}, "
                     f"nats-server {c.nats_server * 1000 / n:.2f}, driver {c.driver * 1000 / n:.2f}; "
                     f"machine busy {c.cores(c.machine):.2f} cores, cpu pressure {c.pressure:.0%}")
    t = result.throughput
    if t is not None:
        lines.append(f"throughput: {t.tasks} tasks, {t.events} events ({t.events_per_task}/task) in "
                     f"{t.seconds:.2f} s (issues published in {t.publish_seconds:.2f} s)")
        if t.events_per_task:
            lines.append(f"  ceiling at the raw pipelined publish rate: {result.raw_publish_per_s:,.0f} / "
                         f"{t.events_per_task} events = {result.raw_publish_per_s / t.events_per_task:,.0f} tasks/s")
        hops = ", ".join(f"{h.name} {h.p50_ms:.1f}" for h in t.hops)
        lines.append(f"throughput hops p50 ms: {hops}")
        c = t.cpu
        lines.append(f"  cores busy: coordinator {c.cores(c.coordinator):.2f}, nats-server "
                     f"{c.cores(c.nats_server):.2f}, driver+null agents {c.cores(c.driver):.2f}, whole machine "
                     f"{c.cores(c.machine):.2f}; cpu pressure {c.pressure:.0%}")
        lines.append(f"  events stream alone: {t.events_stream_per_s:,.0f} ev/s = {t.events_stream_x_raw:.3f} of raw; "
                     f"null agents' appends: round trip p50 {t.agent_append_p50_ms:.2f} / p99 "
                     f"{t.agent_append_p99_ms:.2f} ms (raw unloaded {result.raw_rtt_p50_ms:.2f}), while one was in "
                     f"flight the stream stored p50 {t.stored_meanwhile_p50} / p90 {t.stored_meanwhile_p90} others")
        lines.append(f"  merges resent {t.merges_resent}; "
                     f"null agents' reports {'paced by the coordinator' if t.reports_paced else 'back to back'}")
    return lines
