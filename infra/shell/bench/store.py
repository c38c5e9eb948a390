"""``ccc bench store``: the event store and projections against the client ceiling,
measured in one run on one throwaway server (machines are noisy: only ratios to a
baseline measured alongside are meaningful).

* raw publish: nats-py ``publish_async``, pipelined, same payloads and subjects
* append:      the project's ``EventStore.append_many`` (dedup id + concurrency headers)
* raw replay:  nats-py ordered push consumer over the same stream, callback counts
* rebuild:     the project's full projection rebuild (replay + decode + fold)

Each pair is measured in alternating rounds; the figure is the median round.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone

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

from infra.adapters.nats.connection import connect
from infra.adapters.nats.server import EmbeddedServer
from infra.adapters.nats.provisioning import provision

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class StoreBench(msgspec.Struct, kw_only=True):
    events: int
    rounds: int
    raw_publish_per_s: float
    append_per_s: float
    append_ratio: float
    raw_replay_per_s: float
    rebuild_per_s: float
    rebuild_ratio: float
    avg_event_bytes: float
    sync_interval: str


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


async def run_store_bench(
    n_events: int = 20000, rounds: int = 3, sync_interval: str = "always", progress=None
) -> StoreBench:
    with tempfile.TemporaryDirectory(prefix="ccc-bench-") as tmp:
        server = EmbeddedServer(tmp, sync_interval=sync_interval)
        server.start()
        try:
            nc = await connect(server.url, name="ccc-bench")
            js = nc.jetstream(timeout=30)
            raw_pub, app, raw_rep, reb = [], [], [], []
            size = 0.0
            for r in range(rounds):
                ns_raw, ns = Namespace(f"raw{r}"), Namespace(f"proj{r}")
                await provision(nc, ns_raw)
                await provision(nc, ns)
                histories = task_histories(n_events, prefix=f"b{r}")
                flat = [e for h in histories for e in h]
                size = sum(len(encode(e)) for e in flat) / len(flat)
                n = len(flat)
                raw_pub.append(await _raw_publish(js, ns_raw, flat))
                app.append(await _append(EventStore(nc, ns, timeout=30), histories))
                # replay the project's own stream both ways (same bytes, same headers)
                raw_rep.append(await _raw_replay(js, ns, n))
                reb.append(await _rebuild(EventStore(nc, ns, timeout=30), n))
                if progress:
                    progress(r + 1, rounds)
            await nc.close()
        finally:
            server.stop()
    med = statistics.median
    return StoreBench(
        events=n, rounds=rounds,
        raw_publish_per_s=round(med(raw_pub)), append_per_s=round(med(app)),
        append_ratio=round(med(a / b for a, b in zip(app, raw_pub)), 3),
        raw_replay_per_s=round(med(raw_rep)), rebuild_per_s=round(med(reb)),
        rebuild_ratio=round(med(a / b for a, b in zip(reb, raw_rep)), 3),
        avg_event_bytes=round(size, 1), sync_interval=sync_interval,
    )
