"""Measuring tools for the dispatch bench: percentiles, per-hop timestamps read back from
the stored messages, CPU use of each process."""

from __future__ import annotations

import asyncio
import bisect
import math
import os
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from nats.js import api

from events.agent import AgentEventBase
from events.codec import decode_event
from events.issue import IssueOpened
from events.subjects import Namespace
from events.trust import OPERATOR

from infra.shell.bench.report import (
    REPO,
    CpuUse,
    Hop,
)


# -- small helpers ---------------------------------------------------------------------
def utcnow() -> datetime:
    return datetime.now(UTC)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def ack_meta(reply: str) -> tuple[int, int]:
    """(stream sequence, server store timestamp in ns) from a JetStream ack subject:
    ``$JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ts>.<pending>`` (or with domain
    and account hash, two tokens more in front)."""
    t = reply.split(".")
    return (int(t[5]), int(t[7])) if len(t) == 9 else (int(t[7]), int(t[9]))


def opened(i: int, tag: str) -> IssueOpened:
    return IssueOpened(
        event_id=f"bench-{tag}:{REPO}#{i}", repo=REPO, number=i, occurred_at=utcnow(),
        title=f"Fix the API endpoint returning 500 for user {i}",
        body="The handler crashes when the user has no profile.", labels=("backend",),
        author="bench", author_association=OPERATOR,  # the bench runs as the operator
    )


def hop_percentiles(stamps: dict[str, dict[str, int]], hops: Sequence[tuple[str, str, str]]) -> list[Hop]:
    """Per-hop p50/p99 over tasks, from per-task stage timestamps (ns)."""
    out = []
    for a, b, label in hops:
        d = [s[b] - s[a] for s in stamps.values() if a in s and b in s]
        if d:
            out.append(Hop(name=label, p50_ms=ms(pct(d, 50)), p99_ms=ms(pct(d, 99))))
    return out


async def ordered_subscription(js, stream: str, filters: list[str], cb):
    return await js.subscribe(
        "", stream=stream, cb=cb, ordered_consumer=True,
        config=api.ConsumerConfig(filter_subjects=filters, deliver_policy=api.DeliverPolicy.ALL),
        pending_msgs_limit=512 * 1024, pending_bytes_limit=256 * 1024 * 1024,
    )


Stored = list[tuple[str, int, bytes]]  # (subject, store timestamp ns, data), as stored_messages gives them


async def stored_messages(js, stream: str, filters: list[str], timeout: float = 120.0) -> Stored:
    """Every message of ``stream`` matching ``filters``, after a run, as stored:
    (subject, store timestamp ns, data). Read with an ordered consumer until the last
    matching message (none pending); an empty stream gives an empty list at once."""
    out: Stored = []
    if not (await js.stream_info(stream)).state.last_seq:
        return out
    done = asyncio.Event()

    async def cb(msg) -> None:
        _, ts = ack_meta(msg.reply)
        out.append((msg.subject, ts, msg.data))
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await ordered_subscription(js, stream, filters, cb)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return out


async def stored_run(js, ns: Namespace) -> tuple[Stored, Stored]:
    """A run's issue facts and its task and agent events, as stored."""
    return (await stored_messages(js, ns.issues_stream, [f"{ns.prefix}.issue.>"]),
            await stored_messages(js, ns.events_stream, [ns.task_filter(), ns.agent_filter()]))


async def stage_stamps(js, ns: Namespace) -> dict[str, dict[str, int]]:
    """:func:`stamps_of` the run as stored now."""
    return stamps_of(ns, *await stored_run(js, ns))


def stamps_of(ns: Namespace, issues: Stored, events: Stored) -> dict[str, dict[str, int]]:
    """task id -> {stage: store timestamp}: issue facts (``issue.<action>``), task events
    (``task.<event>``) and agent reports about the task (``agent.<event>``). The first
    occurrence of a stage counts."""
    stamps: dict[str, dict[str, int]] = {}
    cut = len(ns.prefix) + 1
    for subject, ts, _ in issues:
        t = subject.split(".")  # <ns>.issue.<source>.<repo>.<number>.<action>
        stamps.setdefault(f"{t[3]}-{t[4]}", {}).setdefault(f"issue.{t[5]}", ts)
    for subject, ts, data in events:
        t = subject.split(".")
        if t[1] == "task":
            stamps.setdefault(t[2], {}).setdefault(f"task.{t[3]}", ts)
        else:
            event = decode_event(subject[cut:], data)
            tid = getattr(event, "task_id", None)
            if tid is not None:
                assert isinstance(event, AgentEventBase)
                stamps.setdefault(tid, {}).setdefault(event.__struct_config__.tag, ts)
    return stamps


def appends_in_queue(appends: Iterable[tuple[int, int]], store_times: Sequence[int]) -> tuple[list[int], list[int]]:
    """For each append, given as (sent, acknowledged) wall-clock ns: its round trip (ns),
    and how many other messages its stream stored while it was in flight (``store_times``:
    the stream's store timestamps, ascending). A stream stores one message at a time, in
    the order they arrive, so that count is the queue the append waited in: when it grows
    with the writers in flight while the rate stays put, the stream is the bottleneck."""
    rtts, ahead = [], []
    for sent, acked in appends:
        rtts.append(acked - sent)
        ahead.append(max(0, bisect.bisect_left(store_times, acked) - bisect.bisect_left(store_times, sent) - 1))
    return rtts, ahead


async def where_stuck(js, ns: Namespace, task_ids: set[str]) -> dict[str, int]:
    """How many of ``task_ids`` stopped after which step (their latest stage)."""
    out: dict[str, int] = {}
    for tid, s in (await stage_stamps(js, ns)).items():
        if tid in task_ids:
            last = max(s, key=s.__getitem__)
            out[last] = out.get(last, 0) + 1
    return out


def loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux ``/proc``; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_seconds() -> float | None:
    """CPU time all processes of the machine used so far (busy, not idle or iowait)."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_stall_seconds() -> float | None:
    """PSI: total time some runnable task waited for a CPU (``/proc/pressure/cpu``)."""
    try:
        with open("/proc/pressure/cpu", "rb") as f:
            some = f.readline().split()
        return int(some[-1].split(b"=")[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """What each of our processes, and the whole machine, spent in a window (10 ms
    ticks): a shared machine's other load shows up as machine - ours, and as pressure."""

    def __init__(self, coordinator: int | None, nats_server: int | None) -> None:
        self.pids = {"coordinator": coordinator, "driver": os.getpid(), "nats_server": nats_server}
        self.before: dict[str, float | None] = {}

    def _read(self) -> dict[str, float | None]:
        out = {k: cpu_seconds(p) if p else None for k, p in self.pids.items()}
        out["machine"] = machine_cpu_seconds()
        out["stall"] = cpu_stall_seconds()
        out["wall"] = time.perf_counter()
        return out

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> CpuUse:
        now = self._read()

        def d(k: str) -> float:
            a, b = self.before.get(k), now.get(k)
            return round(b - a, 3) if a is not None and b is not None else -1.0

        wall = d("wall")
        stall = d("stall")
        return CpuUse(seconds=wall, coordinator=d("coordinator"), driver=d("driver"),
                      nats_server=d("nats_server"), machine=d("machine"),
                      pressure=round(stall / wall, 3) if stall >= 0 and wall > 0 else -1.0)


async def stream_last_seq(js, stream: str) -> int:
    return (await js.stream_info(stream)).state.last_seq


