"""``ccc bench dispatch`` (and ``ccc bench store``) at a small size, security off beside on:
each runs end to end against its own throwaway nats-servers, every issued task is
assigned (latency) and completed (throughput) on both sides, and the result has the
documented fields and the on/off ratios. The figures themselves are not asserted beyond
being positive: this machine is shared and noisy.

That the secure side really is secure is asserted on its server directly (the bench's
:class:`BenchBus`): TLS required, a client without credentials refused, each null agent
confined to its own subjects, the store encrypted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner

from events.codec import encode
from events.errors import ConfigError, StoreUnavailable
from events.subjects import Namespace
from infra.adapters.nats.connection import connect
from infra.adapters.nats.provisioning import provision
from infra.adapters.nats.secure import SecureDir
from infra.shell.bench.bus import BenchBus, sides_of
from infra.shell.bench.cast import register_agents
from infra.shell.bench.dispatch import run_dispatch_bench
from infra.shell.bench.probes import ack_meta, appends_in_queue, opened, pct
from infra.shell.bench.report import (
    DispatchBench,
    DispatchSide,
    LatencyRun,
    OnOff,
    ThroughputRun,
    comparison_rows,
    footer,
    rows,
    run_footer,
    title,
)
from infra.shell.bench.store import StoreSide, run_store_bench
from infra.shell.cli.main import cli

pytestmark = pytest.mark.timeout(120)
REPO_ROOT = Path(__file__).resolve().parents[2]
DENIED = (TimeoutError, nats.errors.TimeoutError, nats.js.errors.Error, nats.errors.Error)

SIDE_FIELDS = set(DispatchSide.__struct_fields__)
TOP_FIELDS = SIDE_FIELDS | {"sync_interval", "coordinator_process", "cpus", "loadavg", "targets", "profiles",
                            "secure", "on_vs_off"}
LATENCY_FIELDS = set(LatencyRun.__struct_fields__)
THROUGHPUT_FIELDS = set(ThroughputRun.__struct_fields__)


def test_percentile_and_ack_subject_parsing():
    assert pct([5, 1, 4, 2, 3], 50) == 3
    assert pct(list(range(1, 101)), 99) == 99
    assert pct([7], 99) == 7 and pct([], 50) == 0.0
    assert ack_meta("$JS.ACK.S.C.1.42.7.1700000000123456789.0") == (42, 1700000000123456789)
    assert ack_meta("$JS.ACK.dom.hash.S.C.1.42.7.1700000000123456789.0.rnd") == (42, 1700000000123456789)


def test_appends_in_queue_counts_what_the_stream_stored_while_each_append_was_in_flight():
    stored = [100, 110, 120, 130, 140, 200, 300]  # the stream's store timestamps
    # (sent, acknowledged): the append at 125..145 was stored at 130 or 140, one other
    # meanwhile; 95..205 waited behind five others; 250..310 alone; an append whose own
    # message falls outside the window (clocks a little apart) never counts below 0
    rtts, ahead = appends_in_queue([(125, 145), (95, 205), (250, 310), (150, 160)], stored)
    assert rtts == [20, 110, 60, 10]
    assert ahead == [1, 5, 0, 0]
    assert appends_in_queue([], stored) == ([], [])


def test_security_choices():
    assert sides_of("both") == ("off", "on") and sides_of("on") == ("on",) and sides_of("off") == ("off",)
    with pytest.raises(ValueError, match="security must be one of both, off, on"):
        sides_of("maybe")
    r = CliRunner().invoke(cli, ["bench", "dispatch", "--security", "maybe"])
    assert r.exit_code == 2 and "'maybe' is not one of 'both', 'off', 'on'" in r.output


# What a loaded machine may make the coordinator log and recover from by itself (a pull,
# an ack or a health poll that timed out is retried): not a refusal, not a lost message.
TRANSIENT = ("actor.pull_failed", "actor.ack_failed", "health.check_failed")


def _refusals(coordinator: dict) -> list[str]:
    """The coordinator's warnings that are not transient (with security on, a permission
    it lacks shows up here: nats.error ... Permissions Violation). All of them, or the
    count if there were more than the bench keeps."""
    lines = coordinator["warning_lines"]
    if coordinator["warnings"] > len(lines):
        return [f"{coordinator['warnings']} warnings, the first: {lines}"]
    return [ln for ln in lines if not any(t in ln for t in TRANSIENT)]


def _check_side(side: DispatchSide, security: str, throughput_tasks: int) -> None:
    assert side.security == security
    assert side.raw_rtt_p50_ms > 0 and side.raw_rtt_p99_ms >= side.raw_rtt_p50_ms
    assert side.raw_hop_p50_ms > 0 and side.raw_publish_per_s > 0
    # the floors of the intake's write, measured in the same run on the same server
    assert side.raw_batch4_p50_ms > 0 and side.raw_seq4_p50_ms > 0
    # a stream stores one message at a time: a publish waits behind another connection's
    # pipeline into the same stream (~100 fsyncs), not behind one into another stream
    assert side.raw_rtt_same_busy_p50_ms > side.raw_rtt_other_busy_p50_ms > 0

    [lat] = side.latency
    assert lat.agents == 3 and lat.tasks == 20 and lat.assigned == 20
    assert 0 < lat.p50_ms <= lat.p99_ms <= lat.max_ms
    assert lat.p50_x_raw > 0 and lat.p99_x_raw > 0
    # the log is the truth (every measured task assigned, above); the coordinator's counter
    # misses an assignment whose write landed but whose ack was lost on a loaded machine
    # (the redelivered issue then finds the task assigned), so it is a bound, not a count
    assert lat.tasks <= lat.coordinator["assignments"] <= lat.tasks + lat.warmup
    assert lat.coordinator["bad_events"] == 0
    # nothing the coordinator did was refused (with security on, a permission it lacks
    # would show up here as a warning in its log)
    assert _refusals(lat.coordinator) == [], security
    hop_names = [h.name for h in lat.hops]
    assert hop_names[0] == "publish -> issue stored" and hop_names[-1] == "assigned -> observed"
    assert all(h.p50_ms >= 0 for h in lat.hops)
    # the hops partition the way from publish to observation
    assert sum(h.p50_ms for h in lat.hops) == pytest.approx(lat.p50_ms, rel=0.5)

    thr = side.throughput
    assert thr is not None
    assert thr.tasks == thr.completed == throughput_tasks
    assert thr.tasks_per_s > 0 and thr.events_per_s > 0 and thr.seconds > 0 and thr.events_x_raw > 0
    # the events stream holds all but the issue facts; every null agent's append was timed
    assert 0 < thr.events_stream_per_s < thr.events_per_s and 0 < thr.events_stream_x_raw < thr.events_x_raw
    assert 0 < thr.agent_append_p50_ms <= thr.agent_append_p99_ms
    assert 0 <= thr.stored_meanwhile_p50 <= thr.stored_meanwhile_p90
    # per task: issue opened + merge, 6 task events (created with its analysis), 4 agent reports (+ registrations, resent merges)
    assert thr.events >= throughput_tasks * 12
    assert thr.coordinator["assignments"] <= throughput_tasks and thr.coordinator["bad_events"] == 0
    assert _refusals(thr.coordinator) == [], security
    assert {h.name for h in thr.hops} >= {"intake: issue -> task.created (analysed, queued)",
                                          "end to end: publish -> task.completed"}

    table = rows(side)
    assert [r[0] for r in table][:2] == ["dispatch p50, 3 agents", "dispatch p99, 3 agents"]
    assert all(len(r) == 6 for r in table)
    assert any("one atomic batch" in line for line in footer(side))
    assert any("events stream alone" in line and "while one was in flight" in line for line in footer(side))
    assert any("ceiling at the raw pipelined publish rate" in line for line in footer(side))


async def test_small_run_security_off_beside_on():
    steps = []
    result = await run_dispatch_bench(
        agent_counts=(3,), tasks=20, throughput_tasks=50, progress=lambda d, t: steps.append((d, t)),
        rtt_samples=100, publish_msgs=500, throughput_agents=4,
    )
    assert isinstance(result, DispatchBench)
    # both sides, alternating: raw off/on, latency off/on, throughput off/on
    assert steps == [(k, 6) for k in range(1, 7)]
    assert result.sync_interval == "always" and result.coordinator_process
    # the top level is the reference (security off), `secure` the same with security on
    _check_side(result, "off", 50)
    assert result.secure is not None
    _check_side(result.secure, "on", 50)
    assert result.users == 0
    assert "mutual TLS" in result.secure.security_detail and "encrypted" in result.secure.security_detail
    # admin + coordinator/webhook/cli/status/ci of the two namespaces + one user per null agent
    assert result.secure.users == 1 + 5 * 2 + 3 + 4
    assert result.sides() == [result, result.secure]

    by_metric = {c.metric: c for c in result.on_vs_off}
    assert list(by_metric) == ["raw round trip p50", "raw round trip p99", "raw hop p50", "raw pipelined publish",
                               "dispatch p50, 3 agents", "dispatch p99, 3 agents",
                               "throughput, 4 null agents", "throughput, events"]
    p50 = by_metric["dispatch p50, 3 agents"]
    assert (p50.off, p50.on) == (result.latency[0].p50_ms, result.secure.latency[0].p50_ms)
    assert p50.ratio == pytest.approx(p50.on / p50.off, abs=0.001)
    tps = by_metric["throughput, 4 null agents"]
    assert (tps.off, tps.on) == (result.throughput.tasks_per_s, result.secure.throughput.tasks_per_s)
    assert all(c.ratio > 0 for c in result.on_vs_off)

    data = msgspec.to_builtins(result)
    assert set(data) == TOP_FIELDS
    assert set(data["secure"]) == SIDE_FIELDS
    assert set(data["latency"][0]) == LATENCY_FIELDS and set(data["throughput"]) == THROUGHPUT_FIELDS
    assert set(data["secure"]["latency"][0]) == LATENCY_FIELDS
    assert set(data["on_vs_off"][0]) == set(OnOff.__struct_fields__)
    assert data["targets"] == {"p50_ms": 3.0, "p99_ms": 10.0, "latency_agents": 100, "tasks_per_s": 1000.0}
    assert [r[0] for r in comparison_rows(result)] == list(by_metric)
    assert title(result.secure).startswith("security on: mutual TLS") and "(18 nkey users)" in title(result.secure)
    assert any("sync_interval always" in line for line in run_footer(result))
    assert any("alternating step by step" in line for line in run_footer(result))


def test_cli_prints_one_json_object():
    proc = subprocess.run(
        [sys.executable, "-m", "infra.shell.cli.main", "bench", "dispatch", "--agents", "3", "--tasks", "10",
         "--throughput-tasks", "20", "--throughput-agents", "2", "--security", "on", "--json"],
        check=False, capture_output=True, text=True, timeout=110, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # exactly one object: json.loads rejects trailing data
    assert set(data) == TOP_FIELDS
    # only security on was asked for: it is the top level, and there is nothing to compare
    assert data["security"] == "on" and data["secure"] is None and data["on_vs_off"] == []
    assert data["sync_interval"] == "always"
    assert [r["agents"] for r in data["latency"]] == [3]
    assert data["latency"][0]["assigned"] == 10
    assert data["throughput"]["completed"] == 20
    assert "round 3/3" in proc.stderr
    assert "eof_received" not in proc.stderr  # asyncio's TLS-close noise is filtered


async def test_store_bench_security_off_beside_on():
    steps = []
    result = await run_store_bench(n_events=700, rounds=1, progress=lambda d, t: steps.append((d, t)))
    assert steps == [(1, 1)]  # a round measures both sides
    assert result.security == "off" and result.events == 700
    assert result.secure is not None and result.secure.security == "on"
    assert set(msgspec.to_builtins(result.secure)) == set(StoreSide.__struct_fields__)
    for side in (result, result.secure):
        assert side.append_per_s > 0 and side.rebuild_per_s > 0
        assert side.append_ratio > 0 and side.rebuild_ratio > 0
    assert set(result.on_vs_off) == {"raw_publish", "append", "raw_replay", "rebuild"}
    assert result.on_vs_off["append"] == pytest.approx(result.secure.append_per_s / result.append_per_s, rel=0.01)
    assert all(v > 0 for v in result.on_vs_off.values())


def test_store_cli_security_off_only():
    r = CliRunner().invoke(cli, ["bench", "store", "--events", "700", "--rounds", "1", "--security", "off",
                                 "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["security"] == "off" and data["secure"] is None and data["on_vs_off"] == {}
    assert data["append_per_s"] > 0


async def test_secure_bench_server_is_what_ccc_up_runs(tmp_path):
    """The bench's secure side: TLS and a credential required, each null agent its own
    user confined to its own subjects, the coordinator its role, the store encrypted."""
    ns = Namespace("lat2")
    bus = BenchBus(tmp_path / "on", "on", "always")
    bus.register(ns, ["null-0", "null-1"])
    url = bus.start()
    try:
        assert url.startswith("tls://") and bus.users == 1 + 5 + 2
        with pytest.raises(StoreUnavailable):  # no client certificate, no nkey
            await connect(url.replace("tls://", "nats://"), name="anonymous", reconnect=False, connect_timeout=2)
        admin = await bus.connect("admin", name="admin")
        await provision(admin, ns)
        registered = await register_agents(bus, ns, ["null-0", "null-1"], capacity=5, keep=True)
        try:
            agent = registered["null-0"].nc
            assert registered["null-0"].last_seq > 0
            js = agent.jetstream(timeout=0.5)
            for subject in (f"{ns.prefix}.agent.null-1.registered",  # another agent's aggregate
                            f"{ns.prefix}.task.bench_app-1.created",  # task events: the coordinator's
                            f"{ns.prefix}.issue.local.bench_app.1.opened"):  # issue facts
                with pytest.raises(DENIED):
                    await js.publish(subject, b"{}")
        finally:
            for r in registered.values():
                await r.nc.close()
        assert bus.kit("coordinator", ns).kit.role == "coordinator"
        assert bus.kit_path("coordinator", ns).name == f"{ns.prefix}.coordinator"
        cli_nc = await bus.connect("cli", ns, name="driver")  # the driver publishes issues as the CLI
        issue = opened(1, "secret")
        await cli_nc.jetstream(timeout=5).publish(ns.subject(issue.rel_subject), encode(issue))
        await cli_nc.close()
        await admin.close()
    finally:
        bus.stop()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "on" / "nats").rglob("*") if p.is_file())
    assert issue.title.encode() not in stored  # encrypted at rest


async def test_plain_bench_server_needs_no_credentials(tmp_path):
    bus = BenchBus(tmp_path / "off", "off", "always")
    bus.register(Namespace("lat2"), ["null-0"])  # nothing to generate
    url = bus.start()
    try:
        assert url.startswith("nats://") and bus.users == 0 and bus.kit("admin") is None
        nc = await connect(url, name="anyone", reconnect=False)
        await nc.close()
    finally:
        bus.stop()
    assert not (tmp_path / "off" / "secure").exists()


def test_add_agents_registers_many_with_one_render(tmp_path):
    """What the secure side's thousand agent users rely on (``SecureDir.add_agents``):
    new ones only, each a kit of its own, all in the server's user list; a bad id
    anywhere adds nobody."""
    ns = Namespace("lat3")
    secure = SecureDir(tmp_path / "secure")
    secure.init(ns)
    assert secure.add_agents(ns, ["a", "b", "a"]) == ["lat3.agent.a", "lat3.agent.b"]
    assert secure.add_agents(ns, ["b", "c"]) == ["lat3.agent.c"]
    kits = {k.agent_id: k for k in secure.agents()}
    assert sorted(kits) == ["a", "b", "c"] and len({k.public_key for k in kits.values()}) == 3
    conf = secure.auth_conf.read_text()
    assert all(k.public_key in conf for k in kits.values())
    with pytest.raises(ConfigError, match="invalid agent id 'no.dots'"):
        secure.add_agents(ns, ["d", "no.dots"])
    assert sorted(k.agent_id for k in secure.agents()) == ["a", "b", "c"]
