"""``ccc bench dispatch`` at a small size: it runs end to end against its own
throwaway nats-server, every issued task is assigned (latency) and completed
(throughput), and the result has the documented fields. The figures themselves are
not asserted beyond being positive: this machine is shared and noisy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from infra.shell.bench.dispatch import run_dispatch_bench
from infra.shell.bench.probes import ack_meta, pct
from infra.shell.bench.report import DispatchBench, LatencyRun, ThroughputRun, footer, rows

pytestmark = pytest.mark.timeout(120)
REPO_ROOT = Path(__file__).resolve().parents[2]

TOP_FIELDS = {"sync_interval", "coordinator_process", "cpus", "loadavg", "raw_rtt_p50_ms", "raw_rtt_p99_ms",
              "raw_hop_p50_ms", "raw_hop_p99_ms", "raw_publish_per_s", "raw_batch4_p50_ms", "raw_seq4_p50_ms",
              "latency", "throughput", "targets",
              "targets_met", "profiles"}
LATENCY_FIELDS = set(LatencyRun.__struct_fields__)
THROUGHPUT_FIELDS = set(ThroughputRun.__struct_fields__)


def test_percentile_and_ack_subject_parsing():
    assert pct([5, 1, 4, 2, 3], 50) == 3
    assert pct(list(range(1, 101)), 99) == 99
    assert pct([7], 99) == 7 and pct([], 50) == 0.0
    assert ack_meta("$JS.ACK.S.C.1.42.7.1700000000123456789.0") == (42, 1700000000123456789)
    assert ack_meta("$JS.ACK.dom.hash.S.C.1.42.7.1700000000123456789.0.rnd") == (42, 1700000000123456789)


async def test_small_run_assigns_and_completes_every_task():
    steps = []
    result = await run_dispatch_bench(
        agent_counts=(3,), tasks=20, throughput_tasks=50, progress=lambda d, t: steps.append((d, t)),
        rtt_samples=100, publish_msgs=500,
    )
    assert isinstance(result, DispatchBench)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert result.sync_interval == "always" and result.coordinator_process
    assert result.raw_rtt_p50_ms > 0 and result.raw_rtt_p99_ms >= result.raw_rtt_p50_ms
    assert result.raw_hop_p50_ms > 0 and result.raw_publish_per_s > 0

    [lat] = result.latency
    assert lat.agents == 3 and lat.tasks == 20 and lat.assigned == 20
    assert 0 < lat.p50_ms <= lat.p99_ms <= lat.max_ms
    assert lat.p50_x_raw > 0 and lat.p99_x_raw > 0
    assert lat.coordinator["assignments"] == lat.tasks + lat.warmup
    assert lat.coordinator["intake_failed"] == 0 and lat.coordinator["bad_events"] == 0
    hop_names = [h.name for h in lat.hops]
    assert hop_names[0] == "publish -> issue stored" and hop_names[-1] == "assigned -> observed"
    assert all(h.p50_ms >= 0 for h in lat.hops)
    # the hops partition the way from publish to observation
    assert sum(h.p50_ms for h in lat.hops) == pytest.approx(lat.p50_ms, rel=0.5)

    thr = result.throughput
    assert thr is not None
    assert thr.tasks == thr.completed == 50
    assert thr.tasks_per_s > 0 and thr.events_per_s > 0 and thr.seconds > 0 and thr.events_x_raw > 0
    # per task: issue opened + merge, 8 task events, 4 agent reports (+ registrations, resent merges)
    assert thr.events >= 50 * 14
    assert thr.coordinator["assignments"] == 50 and thr.coordinator["bad_events"] == 0
    assert {h.name for h in thr.hops} >= {"intake: issue -> task.created", "end to end: publish -> task.completed"}

    data = msgspec.to_builtins(result)
    assert set(data) == TOP_FIELDS
    assert set(data["latency"][0]) == LATENCY_FIELDS and set(data["throughput"]) == THROUGHPUT_FIELDS
    assert data["targets"] == {"p50_ms": 3.0, "p99_ms": 10.0, "latency_agents": 100, "tasks_per_s": 1000.0}
    table = rows(result)
    assert [r[0] for r in table][:2] == ["dispatch p50, 3 agents", "dispatch p99, 3 agents"]
    assert all(len(r) == 6 for r in table)
    assert any("sync_interval always" in line for line in footer(result))
    # the floors of the intake's write, measured in the same run
    assert result.raw_batch4_p50_ms > 0 and result.raw_seq4_p50_ms > 0
    assert any("one atomic batch" in line for line in footer(result))
    assert any("ceiling at the raw pipelined publish rate" in line for line in footer(result))


def test_cli_prints_one_json_object():
    proc = subprocess.run(
        [sys.executable, "-m", "infra.shell.cli.main", "bench", "dispatch", "--agents", "3", "--tasks", "10",
         "--throughput-tasks", "20", "--json"],
        check=False, capture_output=True, text=True, timeout=110, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # exactly one object: json.loads rejects trailing data
    assert set(data) == TOP_FIELDS
    assert data["sync_interval"] == "always"
    assert [r["agents"] for r in data["latency"]] == [3]
    assert data["latency"][0]["assigned"] == 10
    assert data["throughput"]["completed"] == 20
