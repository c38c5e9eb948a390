"""``ccc bench dispatch``: how fast the coordinator turns issues into assignments, and
how many tasks per second go through the whole state machine, beside raw JetStream
baselines measured in the same run on the same throwaway server.

* raw round trip:   ``await js.publish`` one at a time (p50/p99)
* raw hop:          core publish to a stream subject -> delivery to an ordered push
                    consumer (the floor of one actor-to-actor hop)
* raw publish rate: nats-py ``publish_async``, pipelined; measured with the other baselines
                    and again right before and right after the throughput run, the median
                    of the three taken (the ratio's two sides then see the same machine)
* queue:            the raw round trip while a second connection pipelines into the same
                    stream, and into another (one stream stores one message at a time)
* dispatch latency: ``IssueOpened`` published -> ``TaskAssigned`` seen by an ordered
                    consumer, one issue at a time, with N registered idle agents
* throughput:       M issues published pipelined -> the last ``TaskCompleted``, with
                    "null agents" that do no work and a "reviewer" that merges at once

What is real and what is not: the coordinator is the project's own
:class:`~actors.coordinator.Coordinator`, run in its own process (as deployed: it
shares the machine, not an event loop, with the agents), logging at the CLI's default
level (warning). Agents are null agents: registered through real agent events, each
writing exactly what a real agent writes to its own aggregate (start, implementation
produced, PR opened, release; sequential, with the concurrency check), but without
cloning or running anything and without the per-assignment ``load_task`` a real agent
does. By default each report waits until the log shows the coordinator's reaction to
the previous one (see :class:`NullAgent`). They heartbeat once; the coordinator is
given a heartbeat timeout of an hour so none is declared lost. A "reviewer" publishes
the merge as soon as a task is in review, and publishes it again if the coordinator
dropped it (see ``MERGE_RESEND``).

Security off beside on (``security="both"``, the default): the whole set of
measurements runs on two throwaway servers in the same run, one plain and one secured as
``ccc up`` secures it (see :mod:`infra.shell.bench.bus`: mutual TLS, one nkey user per
process with its role's permissions, the store encrypted), alternating step by step
(raw floors off, raw floors on, latency off, latency on, ...) so that a change in the
machine's load hits both sides alike. Each side's figures are read against its own raw
floors (on the secure side: raw nats-py as its admin user, over TLS, into the encrypted
store), and ``on_vs_off`` gives every figure's ratio on/off.

Every figure is wall time on one machine where nats-server, the coordinator and the
driver compete for the cores (and, on a shared machine, other work too: each run
reports the CPU its processes and the whole machine used, and the CPU pressure, the
share of time some runnable task waited for a core). Read the ratios.

Where the time goes is measured, not guessed: after each run the log is replayed with
the server's store timestamps, and every hop of every task (issue stored -> created ->
... -> completed) is reported as a median/p99, with the events stream's own rate and each
null agent's append beside what that stream stored while it was in flight. ``profile_dir``
also runs the coordinator process under cProfile (that inflates the figures: diagnosis
only).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nats.js import api

from events.codec import decode_event, encode
from events.issue import IssuePullRequestMerged
from events.subjects import Namespace, task_id_for

from infra.shell.bench.baselines import queue_probe, raw_baselines
from infra.shell.bench.bus import BenchBus, sides_of
from infra.shell.bench.cast import CoordinatorProcess, NullAgent, RegisteredAgent, Signals, register_agents
from infra.shell.bench.probes import (
    CpuMeter,
    appends_in_queue,
    hop_percentiles,
    loadavg,
    ms,
    opened,
    ordered_subscription,
    pct,
    stage_stamps,
    stamps_of,
    stored_run,
    stream_last_seq,
    utcnow,
    where_stuck,
)
from infra.shell.bench.report import (
    LATENCY_TARGET_AGENTS,
    MERGE_ATTEMPTS,
    MERGE_RESEND,
    P50_TARGET_MS,
    P99_TARGET_MS,
    REPO,
    STALL,
    TASKS_PER_S_TARGET,
    WAIT_ASSIGNED,
    DispatchBench,
    DispatchSide,
    LatencyRun,
    ThroughputRun,
    compare,
)
from infra.adapters.nats.provisioning import provision

# -- the runs --------------------------------------------------------------------------
# (from stage, to stage, label): stages are issue facts (issue.<action>), task events
# (task.<event>), agent reports (agent.<event>) and the driver's own "published" and
# "observed" times. Hops are pairs, not a chain: agents do not wait for the coordinator.
LATENCY_HOPS = (
    ("published", "issue.opened", "publish -> issue stored"),
    ("issue.opened", "task.created", "intake: issue -> task.created (analysed, queued)"),
    ("task.created", "task.assigned", "scheduling: queued -> assigned"),
    ("task.assigned", "observed", "assigned -> observed"),
)
THROUGHPUT_HOPS = (
    ("published", "issue.opened", "publish -> issue stored"),
    ("issue.opened", "task.created", "intake: issue -> task.created (analysed, queued)"),
    ("task.created", "task.assigned", "scheduling: queued -> assigned"),
    ("task.assigned", "agent.task_started", "null agent: assigned -> agent started"),
    ("agent.task_started", "task.started", "reports: agent started -> task.started"),
    ("agent.implementation_produced", "task.testing", "reports: implementation -> task.testing"),
    ("agent.pr_opened", "task.pr_opened", "reports: agent pr_opened -> task.pr_opened"),
    ("task.pr_opened", "issue.pr_merged", "reviewer: task.pr_opened -> merge stored"),
    ("issue.pr_merged", "task.completed", "intake: merge -> task.completed"),
    ("published", "task.completed", "end to end: publish -> task.completed"),
)


def _agent_ids(n: int) -> list[str]:
    return [f"null-{i}" for i in range(n)]


def _latency_ns(n_agents: int) -> Namespace:
    return Namespace(f"lat{n_agents}")


THROUGHPUT_NS = Namespace("thr")


async def _latency_run(bus: BenchBus, admin, n_agents: int, tasks: int, warmup: int, raw: dict,
                       profile_dir: Path | None) -> LatencyRun:
    ns = _latency_ns(n_agents)
    await provision(admin, ns)
    total = warmup + tasks
    # the driver publishes the issues as the namespace's CLI user (``ccc issue``), and
    # watches the assignments with the read access that user has
    nc = await bus.connect("cli", ns, name="ccc-bench-driver")
    js = nc.jetstream(timeout=30)
    coordinator: CoordinatorProcess | None = None
    sub = None
    try:
        await register_agents(bus, ns, _agent_ids(n_agents), capacity=total, keep=False)
        profile = profile_dir / f"coordinator-latency-{n_agents}-{bus.security}.prof" if profile_dir else None
        coordinator = CoordinatorProcess(bus.url, ns, bus.workdir / f"coordinator-{ns.prefix}.log", profile,
                                         bus.kit_path("coordinator", ns))
        await coordinator.start()
        waiting: dict[str, asyncio.Future] = {}

        async def on_assigned(msg) -> None:
            fut = waiting.pop(msg.subject.split(".")[2], None)
            if fut is not None and not fut.done():
                fut.set_result((time.perf_counter_ns(), time.time_ns()))

        sub = await js.subscribe(f"{ns.prefix}.task.*.assigned.*", stream=ns.events_stream, cb=on_assigned,
                                 ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW)
        loop = asyncio.get_running_loop()
        lat: list[int] = []
        stamps: dict[str, dict[str, int]] = {}
        cpu = CpuMeter(coordinator.pid, bus.server_pid)
        for i in range(1, total + 1):
            if i == warmup + 1:
                cpu.start()
            issue = opened(i, ns.prefix)
            tid = task_id_for(issue.repo, issue.number)
            fut = waiting[tid] = loop.create_future()
            subject, data = ns.subject(issue.rel_subject), encode(issue)
            w0, t0 = time.time_ns(), time.perf_counter_ns()
            await js.publish(subject, data, headers={"Nats-Msg-Id": issue.event_id})
            try:
                t1, w1 = await asyncio.wait_for(fut, WAIT_ASSIGNED)
            except TimeoutError:
                raise RuntimeError(f"{tid} was not assigned within {WAIT_ASSIGNED}s ({n_agents} agents, "
                                   f"security {bus.security}); coordinator: {coordinator.log_tail()}") from None
            if i > warmup:
                lat.append(t1 - t0)
                stamps[tid] = {"published": w0, "observed": w1}
        used = cpu.stop()
        stats = await coordinator.stop()
        await sub.unsubscribe()
        sub = None
        for tid, s in (await stage_stamps(js, ns)).items():
            if tid in stamps:
                stamps[tid].update(s)
    finally:
        if sub is not None:
            await sub.unsubscribe()
        if coordinator is not None:
            await coordinator.kill()
        await nc.close()
    p50, p99 = ms(pct(lat, 50)), ms(pct(lat, 99))
    return LatencyRun(
        agents=n_agents, tasks=tasks, warmup=warmup, assigned=len(lat), p50_ms=p50, p99_ms=p99,
        mean_ms=ms(statistics.fmean(lat)), max_ms=ms(max(lat)),
        p50_x_raw=round(p50 / ms(raw["rtt_p50"]), 2), p99_x_raw=round(p99 / ms(raw["rtt_p99"]), 2),
        p50_ok=p50 <= P50_TARGET_MS, p99_ok=p99 <= P99_TARGET_MS,
        hops=hop_percentiles(stamps, LATENCY_HOPS), coordinator=stats,
        cpu=used,
    )


async def _raw_publish_rate(admin, msgs: int) -> float:
    """Raw pipelined publishes per second now: nats-py ``publish_async`` from one
    connection into a file stream of its own, as the baselines measure it."""
    js = admin.jetstream(timeout=30)
    await js.add_stream(api.StreamConfig(
        name="RAWPUB", subjects=["rawpub.>"], storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, num_replicas=1))
    try:
        payload = encode(opened(1, "raw"))
        t = time.perf_counter()
        futures = [await js.publish_async(f"rawpub.{i % 100}", payload) for i in range(msgs)]
        await asyncio.gather(*futures)
        return msgs / (time.perf_counter() - t)
    finally:
        await js.delete_stream("RAWPUB")


async def _throughput_run(bus: BenchBus, admin, n_agents: int, tasks: int, raw: dict,
                          profile_dir: Path | None, immediate_reports: bool,
                          raw_msgs: int = 5000) -> ThroughputRun:
    """``raw_msgs``: how many raw pipelined publishes measure the rate right before and
    right after the run (``raw['publish_per_s']`` becomes the median of those two and
    the baselines' own)."""
    ns = THROUGHPUT_NS
    await provision(admin, ns)
    nc = await bus.connect("cli", ns, name="ccc-bench-driver")  # issues, merges, observers
    js = nc.jetstream(timeout=30)
    subs: list = []
    work: set[asyncio.Task] = set()
    coordinator: CoordinatorProcess | None = None
    registered: dict[str, RegisteredAgent] = {}
    try:
        # every null agent on its own connection, as its own user, like separate processes
        registered = await register_agents(bus, ns, _agent_ids(n_agents), capacity=tasks, keep=True)
        pacing = None if immediate_reports else Signals()
        agents = {aid: NullAgent(r.store, aid, r.state, r.last_seq, pacing) for aid, r in registered.items()}
        profile = profile_dir / f"coordinator-throughput-{n_agents}-{bus.security}.prof" if profile_dir else None
        coordinator = CoordinatorProcess(bus.url, ns, bus.workdir / f"coordinator-{ns.prefix}.log", profile,
                                         bus.kit_path("coordinator", ns))
        await coordinator.start()
        events_before = await stream_last_seq(js, ns.events_stream) + await stream_last_seq(js, ns.issues_stream)

        failures: list[BaseException] = []
        progress = asyncio.Event()  # a task completed, or something failed
        completed: set[str] = set()
        last_completed = [0]
        reviewed = Signals()
        resent = [0]

        def track(task: asyncio.Task) -> None:
            work.add(task)

            def done(t: asyncio.Task) -> None:
                work.discard(t)
                if not t.cancelled() and t.exception() is not None:
                    failures.append(t.exception())
                    progress.set()
            task.add_done_callback(done)

        cut = len(ns.prefix) + 1

        def assigned_to(agent: NullAgent):
            async def on_assigned(msg) -> None:  # a null agent's own assignments
                event = decode_event(msg.subject[cut:], msg.data)
                track(asyncio.create_task(agent.work(event.task_id, event.attempt)))
            return on_assigned

        async def on_task_step(msg) -> None:  # what paced null agents wait for
            t = msg.subject.split(".")
            pacing.set(t[3], t[2])

        async def merge(tid: str) -> None:
            """Publish the merge; if the task has not completed after MERGE_RESEND seconds,
            publish it again as a new forge delivery (see MERGE_RESEND)."""
            number = int(tid.rsplit("-", 1)[1])
            done = reviewed.get("completed", tid)
            for k in range(MERGE_ATTEMPTS):
                event = IssuePullRequestMerged(event_id=f"merge:{tid}:{k}", repo=REPO, number=number,
                                               occurred_at=utcnow(), branch=f"ccc/task-{tid}", actor="bench")
                await js.publish(ns.subject(event.rel_subject), encode(event), headers={"Nats-Msg-Id": event.event_id})
                try:
                    await asyncio.wait_for(asyncio.shield(done), MERGE_RESEND)
                    return
                except TimeoutError:
                    resent[0] += 1

        async def on_reviewer_step(msg) -> None:  # the reviewer: merge as soon as the task is in review
            t = msg.subject.split(".")
            if t[3] == "pr_opened":
                track(asyncio.create_task(merge(t[2])))
                return
            completed.add(t[2])
            reviewed.set("completed", t[2])
            last_completed[0] = time.perf_counter_ns()
            progress.set()

        p = ns.prefix
        for aid, agent in agents.items():
            # an agent may read only what its user may: its own assignments here
            subs.append(await registered[aid].nc.jetstream(timeout=30).subscribe(
                ns.assignments_filter(aid), stream=ns.events_stream, cb=assigned_to(agent),
                ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW))
        subs.append(await ordered_subscription(js, ns.events_stream, [f"{p}.task.*.pr_opened", f"{p}.task.*.completed"],
                                               on_reviewer_step))
        if pacing is not None:
            # the pacing is the bench's instrument, not agent behaviour: the driver watches
            subs.append(await ordered_subscription(js, ns.events_stream, [f"{p}.task.*.started", f"{p}.task.*.testing"],
                                                   on_task_step))
        issues = [opened(i, ns.prefix) for i in range(1, tasks + 1)]
        payloads = [(ns.subject(e.rel_subject), encode(e), {"Nats-Msg-Id": e.event_id}) for e in issues]
        published: dict[str, int] = {}
        raw_before = await _raw_publish_rate(admin, raw_msgs)
        cpu = CpuMeter(coordinator.pid, bus.server_pid)
        cpu.start()
        w0, t0 = time.time_ns(), time.perf_counter_ns()
        futures = [await js.publish_async(s, d, headers=h) for s, d, h in payloads]
        await asyncio.gather(*futures)
        t_published = time.perf_counter_ns()
        published = {task_id_for(e.repo, e.number): w0 for e in issues}
        while len(completed) < tasks and not failures:
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), STALL)
            except TimeoutError:
                break  # stalled
        used = cpu.stop()
        if len(completed) < tasks:
            stuck = await where_stuck(js, ns, set(published) - completed)
            cause = f"; first failure: {failures[0]}" if failures else f"; no progress for {STALL:g}s"
            raise RuntimeError(f"only {len(completed)}/{tasks} tasks completed (security {bus.security}){cause}; "
                               f"the others' last step: {stuck}; coordinator log: {coordinator.log_tail()}")
        seconds = (last_completed[0] - t0) / 1e9
        stats = await coordinator.stop()
        for s in subs:
            await s.unsubscribe()
        subs.clear()
        events = await stream_last_seq(js, ns.events_stream) + await stream_last_seq(js, ns.issues_stream) \
            - events_before
        issues_stored, events_stored = await stored_run(js, ns)
        stamps = stamps_of(ns, issues_stored, events_stored)
        raw_after = await _raw_publish_rate(admin, raw_msgs)
    finally:
        for s in subs:
            await s.unsubscribe()
        if coordinator is not None:
            await coordinator.kill()
        for t in list(work):
            t.cancel()
        for r in registered.values():
            await r.nc.close()
        await nc.close()
    for tid, s in stamps.items():
        if tid in published:
            s["published"] = published[tid]
    rate = tasks / seconds
    raw["publish_per_s"] = statistics.median([raw["publish_per_s"], raw_before, raw_after])
    store_times = sorted(ts for _, ts, _ in events_stored)
    on_events_stream = sum(1 for ts in store_times if w0 <= ts <= w0 + seconds * 1e9) / seconds
    rtts, ahead = appends_in_queue([a for agent in agents.values() for a in agent.appends], store_times)
    return ThroughputRun(
        agents=n_agents, capacity=tasks, tasks=tasks, completed=len(completed), seconds=round(seconds, 3),
        publish_seconds=round((t_published - t0) / 1e9, 3), tasks_per_s=round(rate, 1), events=events,
        events_per_task=round(events / tasks, 2), events_per_s=round(events / seconds),
        events_x_raw=round(events / seconds / raw["publish_per_s"], 3),
        events_stream_per_s=round(on_events_stream),
        events_stream_x_raw=round(on_events_stream / raw["publish_per_s"], 3),
        agent_append_p50_ms=ms(pct(rtts, 50)), agent_append_p99_ms=ms(pct(rtts, 99)),
        stored_meanwhile_p50=round(pct(ahead, 50)), stored_meanwhile_p90=round(pct(ahead, 90)),
        merges_resent=resent[0],
        reports_paced=not immediate_reports, ok=rate >= TASKS_PER_S_TARGET,
        hops=hop_percentiles(stamps, THROUGHPUT_HOPS), coordinator=stats, cpu=used,
    )


async def run_dispatch_bench(
    agent_counts: Sequence[int] = (10, 100, 1000),
    tasks: int = 200,
    throughput_tasks: int = 1000,
    sync_interval: str = "always",
    progress: Callable[[int, int], None] | None = None,
    *,
    throughput_agents: int = 10,
    warmup: int | None = None,
    rtt_samples: int = 1000,
    publish_msgs: int = 10000,
    profile_dir: str | Path | None = None,
    immediate_reports: bool = False,
    security: str = "both",
) -> DispatchBench:
    """Throwaway embedded servers, one per side of ``security`` (``both``: off and on);
    on each, baselines, then a latency run per agent count (each with a fresh namespace
    and coordinator), then the throughput run (skipped when ``throughput_tasks`` is 0),
    the sides alternating step by step."""
    sides = sides_of(security)
    warmup = min(10, max(1, tasks // 10)) if warmup is None else warmup
    steps = len(sides) * (1 + len(agent_counts) + (1 if throughput_tasks else 0))
    step = 0

    def advance() -> None:
        nonlocal step
        step += 1
        if progress:
            progress(step, steps)

    pdir = Path(profile_dir).resolve() if profile_dir else None
    if pdir is not None:
        pdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ccc-bench-dispatch-") as tmp:
        buses = [BenchBus(Path(tmp) / side, side, sync_interval) for side in sides]
        for bus in buses:  # every user, before the server starts (outside every measurement)
            for n in agent_counts:
                bus.register(_latency_ns(n), _agent_ids(n))
            if throughput_tasks:
                bus.register(THROUGHPUT_NS, _agent_ids(throughput_agents))
        load_before = loadavg()
        admins: list = []
        try:
            for bus in buses:
                bus.start()
                admins.append(await bus.connect("admin", name="ccc-bench-admin"))
            raw, latency = [], [[] for _ in buses]
            throughput: list[ThroughputRun | None] = [None for _ in buses]
            for bus, admin in zip(buses, admins):
                raw.append(await raw_baselines(admin, admin.jetstream(timeout=30), rtt_samples, publish_msgs))
                other = await bus.connect("admin", name="ccc-bench-admin-2")
                try:
                    raw[-1].update(await queue_probe(admin, other, max(20, rtt_samples // 20)))
                finally:
                    await other.close()
                advance()
            for n in agent_counts:
                for k, (bus, admin) in enumerate(zip(buses, admins)):
                    latency[k].append(await _latency_run(bus, admin, n, tasks, warmup, raw[k], pdir))
                    advance()
            if throughput_tasks:
                for k, (bus, admin) in enumerate(zip(buses, admins)):
                    throughput[k] = await _throughput_run(bus, admin, throughput_agents, throughput_tasks, raw[k],
                                                          pdir, immediate_reports,
                                                          raw_msgs=max(100, publish_msgs // 2))
                    advance()
        finally:
            for admin in admins:
                await admin.close()
            for bus in buses:
                bus.stop()
    results = [_side(bus, r, lat, thr) for bus, r, lat, thr in zip(buses, raw, latency, throughput)]
    first = results[0]
    secure = results[1] if len(results) > 1 else None
    profiles = sorted(str(p) for p in pdir.glob("coordinator-*.prof")) if pdir else []
    return DispatchBench(
        **{f: getattr(first, f) for f in DispatchSide.__struct_fields__},
        sync_interval=sync_interval, coordinator_process=True, cpus=os.cpu_count() or 0,
        loadavg=[load_before, loadavg()],
        targets={"p50_ms": P50_TARGET_MS, "p99_ms": P99_TARGET_MS, "latency_agents": LATENCY_TARGET_AGENTS,
                 "tasks_per_s": TASKS_PER_S_TARGET},
        profiles=profiles, secure=secure, on_vs_off=compare(first, secure) if secure is not None else [],
    )


def _side(bus: BenchBus, raw: dict, latency: list[LatencyRun], throughput: ThroughputRun | None) -> DispatchSide:
    met = all(r.p50_ok and r.p99_ok for r in latency) and (throughput is None or throughput.ok)
    return DispatchSide(
        security=bus.security, security_detail=bus.description, users=bus.users,
        raw_rtt_p50_ms=ms(raw["rtt_p50"]), raw_rtt_p99_ms=ms(raw["rtt_p99"]),
        raw_hop_p50_ms=ms(raw["hop_p50"]), raw_hop_p99_ms=ms(raw["hop_p99"]),
        raw_publish_per_s=round(raw["publish_per_s"]), raw_batch4_p50_ms=ms(raw["batch4_p50"]),
        raw_seq4_p50_ms=ms(raw["seq4_p50"]), raw_rtt_same_busy_p50_ms=ms(raw["rtt_same_busy_p50"]),
        raw_rtt_other_busy_p50_ms=ms(raw["rtt_other_busy_p50"]), latency=latency, throughput=throughput,
        targets_met=met,
    )
