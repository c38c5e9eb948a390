"""``ccc bench store``: the event store and projections against the client ceiling,
measured in one run on one throwaway server (machines are noisy: only ratios to a
baseline measured alongside are meaningful).

* raw publish: nats-py ``publish_async``, pipelined, same payloads and subjects
* append:      the project's ``EventStore.append_many`` (dedup id + concurrency headers)
* raw replay:  nats-py ordered push consumer over the same stream, callback counts
* rebuild:     the project's full projection rebuild (replay + decode + fold)

Each pair is measured in alternating rounds; the figure is the median round.

Security off beside on (``security="both"``, the default): each round runs on a plain
server and then on a secured one (mutual TLS, nkey users with their role's permissions,
the store encrypted; see :mod:`infra.shell.bench.bus`): the writes as the namespace's
``coordinator`` (the one role that appends task events), the replays as its read-only
``status`` user, provisioning as ``admin``. ``on_vs_off`` is each rate's on/off, the
median over rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
from nats.js import api

from events.codec import encode
from events.store import EventStore
from events.subjects import Namespace
from events.task import Analysis, IssueRef
from events.task_state import (
    AssignTask,
    CreateTask,
    OpenPullRequest,
    RecordAnalysis,
    StartAnalysis,
    StartTask,
    StartTests,
    decide,
    evolve,
)
from projections.read_model import ReadModel

from infra.adapters.nats.provisioning import provision
from infra.shell.bench.bus import BenchBus, sides_of

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class StoreSide(msgspec.Struct, kw_only=True):
    """One server's figures: security off or on (medians over rounds)."""

    security: str = "off"
    security_detail: str = ""
    raw_publish_per_s: float
    append_per_s: float
    append_ratio: float
    raw_replay_per_s: float
    rebuild_per_s: float
    rebuild_ratio: float


class StoreBench(StoreSide, kw_only=True):
    """The run. Its own figures are the first side measured (security off, the
    reference, or on when only that was asked for); ``secure`` holds the figures with
    security on when both were run, ``on_vs_off`` each rate's on/off."""

    events: int
    rounds: int
    avg_event_bytes: float
    sync_interval: str
    secure: StoreSide | None = None
    on_vs_off: dict[str, float] = {}


def task_histories(n_events: int, prefix: str = "bench") -> list[list]:
    """Realistic task histories (created → … → review), 7 events each."""
    histories = []
    for i in range(max(1, n_events // 7)):
        tid = f"{prefix}_repo-{i}"
        at = T0 + timedelta(seconds=i)
        cmds = [
            StartAnalysis(at=at, actor="coordinator"),
            RecordAnalysis(at=at, actor="coordinator", analysis=Analysis(
                specialty="backend", requirements=("python",), reasons=("label backend",))),
            AssignTask(at=at, actor="coordinator", agent_id=f"agent-{i % 10}"),
            StartTask(at=at, actor=f"agent-{i % 10}", agent_id=f"agent-{i % 10}"),
            StartTests(at=at, actor=f"agent-{i % 10}", agent_id=f"agent-{i % 10}",
                       files_changed=("src/app.py",), diff_stat="1 file changed"),
            OpenPullRequest(at=at, actor=f"agent-{i % 10}", agent_id=f"agent-{i % 10}",
                            branch=f"ccc/task-{tid}", tests_passed=12),
        ]
        events = decide(None, CreateTask(
            at=at, actor="coordinator", task_id=tid,
            issue=IssueRef(source="local", repo=f"{prefix}/repo", number=i,
                           title=f"Fix the thing number {i}", labels=("backend",)),
        ))
        state = evolve(None, events[0])
        for c in cmds:
            new = decide(state, c)
            state = evolve(state, new[0])
            events += new
        histories.append(events)
    return histories


async def _raw_publish(js, ns: Namespace, events: list) -> float:
    payloads = [(ns.subject(e.rel_subject), encode(e)) for e in events]
    t = time.perf_counter()
    futures = [await js.publish_async(s, d) for s, d in payloads]
    await asyncio.gather(*futures)
    return len(events) / (time.perf_counter() - t)


async def _append(store: EventStore, histories: list[list]) -> float:
    """Pipelined appends of independent aggregates, each with its concurrency check:
    event k of every task goes in one pipelined batch."""
    n = sum(len(h) for h in histories)
    last = [0] * len(histories)
    t = time.perf_counter()
    for k in range(max(len(h) for h in histories)):
        idx = [i for i, h in enumerate(histories) if k < len(h)]
        results = await store.append_many((histories[i][k], last[i]) for i in idx)
        for i, r in zip(idx, results):
            if isinstance(r, Exception):
                raise r
            last[i] = r
    return n / (time.perf_counter() - t)


async def _raw_replay(js, ns: Namespace, n: int) -> float:
    done = asyncio.Event()
    count = 0

    async def cb(msg) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    t = time.perf_counter()
    sub = await js.subscribe("", stream=ns.events_stream, cb=cb, ordered_consumer=True,
                             config=api.ConsumerConfig(filter_subjects=[ns.task_filter(), ns.agent_filter()]),
                             pending_msgs_limit=512 * 1024, pending_bytes_limit=256 * 1024 * 1024)
    await done.wait()
    rate = n / (time.perf_counter() - t)
    await sub.unsubscribe()
    return rate


async def _rebuild(store: EventStore, n: int) -> float:
    model = ReadModel()
    t = time.perf_counter()
    await store.replay(model.apply)
    rate = n / (time.perf_counter() - t)
    if model.applied_count != n or model.bad_count:
        raise RuntimeError(f"rebuild applied {model.applied_count}/{n}, bad {model.bad_count}")
    return rate


async def _round(bus: BenchBus, admin, r: int, histories: list[list], flat: list) -> dict[str, float]:
    """One round on one server: raw publish and append, raw replay and rebuild."""
    ns_raw, ns = Namespace(f"raw{r}"), Namespace(f"proj{r}")
    await provision(admin, ns_raw)
    await provision(admin, ns)
    writer_raw = await bus.connect("coordinator", ns_raw, name="ccc-bench-raw")
    writer = await bus.connect("coordinator", ns, name="ccc-bench-store")
    reader = await bus.connect("status", ns, name="ccc-bench-reader")
    try:
        n = len(flat)
        out = {"raw_publish": await _raw_publish(writer_raw.jetstream(timeout=30), ns_raw, flat),
               "append": await _append(EventStore(writer, ns, timeout=30), histories)}
        # replay the project's own stream both ways (same bytes, same headers)
        out["raw_replay"] = await _raw_replay(reader.jetstream(timeout=30), ns, n)
        out["rebuild"] = await _rebuild(EventStore(reader, ns, timeout=30), n)
        return out
    finally:
        for nc in (writer_raw, writer, reader):
            await nc.close()


async def run_store_bench(
    n_events: int = 20000, rounds: int = 3, sync_interval: str = "always", progress=None,
    security: str = "both",
) -> StoreBench:
    sides = sides_of(security)
    per_side: list[list[dict[str, float]]] = [[] for _ in sides]
    with tempfile.TemporaryDirectory(prefix="ccc-bench-") as tmp:
        buses = [BenchBus(Path(tmp) / side, side, sync_interval) for side in sides]
        for bus in buses:
            for r in range(rounds):
                bus.register(Namespace(f"raw{r}"))
                bus.register(Namespace(f"proj{r}"))
        admins: list = []
        try:
            for bus in buses:
                bus.start()
                admins.append(await bus.connect("admin", name="ccc-bench-admin"))
            for r in range(rounds):  # a round: the same data on every side, one after the other
                histories = task_histories(n_events, prefix=f"b{r}")
                flat = [e for h in histories for e in h]
                size = sum(len(encode(e)) for e in flat) / len(flat)
                for k, (bus, admin) in enumerate(zip(buses, admins)):
                    per_side[k].append(await _round(bus, admin, r, histories, flat))
                if progress:
                    progress(r + 1, rounds)
        finally:
            for admin in admins:
                await admin.close()
            for bus in buses:
                bus.stop()
    med = statistics.median
    results = [_side(bus, figures) for bus, figures in zip(buses, per_side)]
    first = results[0]
    secure = results[1] if len(results) > 1 else None
    on_vs_off = {}
    if secure is not None:
        for key in ("raw_publish", "append", "raw_replay", "rebuild"):
            on_vs_off[key] = round(med(on[key] / off[key] for off, on in zip(*per_side)), 3)
    return StoreBench(
        **{f: getattr(first, f) for f in StoreSide.__struct_fields__},
        events=len(flat), rounds=rounds, avg_event_bytes=round(size, 1), sync_interval=sync_interval,
        secure=secure, on_vs_off=on_vs_off,
    )


def _side(bus: BenchBus, rounds: list[dict[str, float]]) -> StoreSide:
    med = statistics.median
    return StoreSide(
        security=bus.security, security_detail=bus.description,
        raw_publish_per_s=round(med(f["raw_publish"] for f in rounds)),
        append_per_s=round(med(f["append"] for f in rounds)),
        append_ratio=round(med(f["append"] / f["raw_publish"] for f in rounds), 3),
        raw_replay_per_s=round(med(f["raw_replay"] for f in rounds)),
        rebuild_per_s=round(med(f["rebuild"] for f in rounds)),
        rebuild_ratio=round(med(f["rebuild"] / f["raw_replay"] for f in rounds), 3),
    )
