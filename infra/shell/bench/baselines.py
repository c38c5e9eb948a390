"""The dispatch bench's raw baselines: what plain nats-py achieves against the same
throwaway server in the same run, so the project's figures can be read as ratios."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.js import api

from events.codec import encode
from events.store import BATCH_COMMIT, BATCH_ID, BATCH_SEQ

from infra.shell.bench.probes import opened, pct


async def raw_baselines(nc, js, rtt_samples: int, publish_msgs: int) -> dict:
    """Raw nats-py on the bench's server, in the same run: a publish round trip, one
    hop to an ordered push consumer, four events as one atomic batch and as four
    awaited publishes, and pipelined publishes per second (latencies in ns)."""
    await js.add_stream(api.StreamConfig(
        name="RAWBENCH", subjects=["rawbench.>"], storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, num_replicas=1, allow_atomic=True))
    payload = encode(opened(1, "raw"))
    # round trip: one publish at a time, waiting for the ack
    for i in range(min(50, rtt_samples)):
        await js.publish(f"rawbench.warm.{i % 50}", payload)
    rtt = []
    for i in range(rtt_samples):
        t = time.perf_counter_ns()
        await js.publish(f"rawbench.rtt.{i % 100}", payload)
        rtt.append(time.perf_counter_ns() - t)
    # one hop: publish -> stored -> delivered to an ordered push consumer
    waiting: list[asyncio.Future] = []

    async def cb(msg) -> None:
        if waiting:
            waiting.pop().set_result(time.perf_counter_ns())

    sub = await js.subscribe("rawbench.hop.>", stream="RAWBENCH", cb=cb, ordered_consumer=True,
                             deliver_policy=api.DeliverPolicy.NEW)
    loop = asyncio.get_running_loop()
    hop = []
    for i in range(rtt_samples // 2 + 10):
        fut = loop.create_future()
        waiting.append(fut)
        t = time.perf_counter_ns()
        await nc.publish(f"rawbench.hop.{i % 100}", payload)
        done = await asyncio.wait_for(fut, 10)
        if i >= 10:
            hop.append(done - t)
    await sub.unsubscribe()
    # four events as one atomic batch (a multi-event decision) and as four awaited
    # publishes (the intake's write): raw, to show the floor of each
    batch4, seq4 = [], []
    for i in range(rtt_samples // 2):
        t = time.perf_counter_ns()
        await _atomic_batch(nc, [f"rawbench.batch.{i % 100}.{k}" for k in range(4)], payload)
        batch4.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        for k in range(4):
            await js.publish(f"rawbench.seq.{i % 100}.{k}", payload)
        seq4.append(time.perf_counter_ns() - t)
    # pipelined publishes
    t = time.perf_counter()
    futures = [await js.publish_async(f"rawbench.pub.{i % 100}", payload) for i in range(publish_msgs)]
    await asyncio.gather(*futures)
    rate = publish_msgs / (time.perf_counter() - t)
    await js.delete_stream("RAWBENCH")
    return {"rtt_p50": pct(rtt, 50), "rtt_p99": pct(rtt, 99), "hop_p50": pct(hop, 50),
            "hop_p99": pct(hop, 99), "publish_per_s": rate, "batch4_p50": pct(batch4, 50),
            "seq4_p50": pct(seq4, 50)}


async def _atomic_batch(nc, subjects: list[str], payload: bytes) -> None:
    """One JetStream atomic batch, as the event store writes a multi-event decision."""
    batch = uuid.uuid4().hex[:16]
    for i, subject in enumerate(subjects, 1):
        headers = {BATCH_ID: batch, BATCH_SEQ: str(i)}
        if i < len(subjects):
            await nc.publish(subject, payload, headers=headers)
        else:
            headers[BATCH_COMMIT] = "1"
            reply = await nc.request(subject, payload, headers=headers, timeout=10)
            if b'"error"' in reply.data:
                raise RuntimeError(f"atomic batch refused: {reply.data[:200]!r}")


async def queue_probe(nc, other, samples: int, window: int = 100) -> dict:
    """Raw round trips (one publish at a time) while ``other``, a second connection,
    keeps ``window`` publishes in flight into the same stream, then into another one: a
    stream stores one message at a time, in arrival order, and other streams beside it
    (latencies in ns). Every task and agent event shares the one events stream."""
    js, ojs = nc.jetstream(timeout=30), other.jetstream(timeout=30)
    for name in ("RAWQA", "RAWQB"):
        await js.add_stream(api.StreamConfig(
            name=name, subjects=[f"{name.lower()}.>"], storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS, num_replicas=1))
    payload = encode(opened(1, "raw"))
    out = {}
    try:
        for key, busy in (("rtt_same_busy_p50", "rawqa"), ("rtt_other_busy_p50", "rawqb")):
            stop, first = asyncio.Event(), asyncio.Event()
            pumping = asyncio.create_task(_pump(ojs, busy, payload, window, stop, first))
            try:
                await asyncio.wait_for(first.wait(), 30)  # the other writer is under way
                rtt = []
                for i in range(samples):
                    t = time.perf_counter_ns()
                    await js.publish(f"rawqa.probe.{i % 100}", payload)
                    rtt.append(time.perf_counter_ns() - t)
            finally:
                stop.set()
                await pumping
            out[key] = pct(rtt, 50)
    finally:
        for name in ("RAWQA", "RAWQB"):
            await js.delete_stream(name)
    return out


async def _pump(js, subject: str, payload: bytes, window: int, stop: asyncio.Event, first: asyncio.Event) -> None:
    """Keep ``window`` publishes in flight into ``subject``'s stream until ``stop``;
    ``first`` once the first window is acknowledged."""
    while not stop.is_set():
        futures = [await js.publish_async(f"{subject}.{i % 100}", payload) for i in range(window)]
        await asyncio.gather(*futures)
        first.set()
