"""``ccc bench api``: the open loop measures from when each request was due (a late
generator's lateness counts; a stalled server does not stop the sending), and the
CI-sized run goes end to end (its own nats-server, the board, the API in its own
process, every endpoint beside hello). The figures themselves are not asserted beyond
their shape: this machine is shared and noisy; the README has the measured ones."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from click.testing import CliRunner

from infra.shell.bench.api import ENDPOINTS, P99_TARGETED, ApiBench, Pool, open_loop, task_histories
from infra.shell.cli.main import cli

pytestmark = pytest.mark.timeout(180)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class StallingServer:
    """A tiny HTTP/1.1 server in a thread of its own (its own event loop), which blocks
    that loop for ``stall`` seconds at its ``at``-th request: a server that stops
    answering for a while, as a long collection or a busy machine makes it."""

    def __init__(self, at: int, stall: float) -> None:
        self.at, self.stall, self.count = at, stall, 0
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    self.count += 1
                    if self.count == self.at:
                        time.sleep(self.stall)  # noqa: ASYNC251 - the point: the whole server stops
                    writer.write(OK)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = self.loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> StallingServer:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_late_generator_counts_its_own_lateness():
    """The generator's loop blocks for 300 ms at request 50 (as a GC pause in the client
    would): every request due meanwhile goes out late, and its latency counts from when
    it was due — at least its lateness, the lateness in the percentiles."""
    def request(i: int) -> bytes:
        if i == 50:
            time.sleep(0.3)  # the point: the generator's own loop stalls
        return REQUEST

    with StallingServer(at=0, stall=0) as server:
        pool = Pool("127.0.0.1", server.port)
        await pool.fill(4)
        phase = await open_loop(pool, request, rate=200, seconds=1.0)
        pool.close()
    assert phase.requests == 200 and phase.errors == {}
    late = [i for i, lag in enumerate(phase.lag_ns) if lag > 100e6]
    assert len(late) >= 35, len(late)  # ~40 were due in the first 200 ms of the block
    assert all(lat >= lag for lat, lag in zip(phase.latency_ns, phase.lag_ns))
    assert sorted(phase.latency_ns)[int(0.9 * 200)] > 50e6  # it shows in the tail, not only in the lag


async def test_a_stalled_server_does_not_stop_the_sending():
    """Open, not closed, loop: while the server stalls for 300 ms the requests due go
    out on time (new connections), and each one's latency includes its wait."""
    with StallingServer(at=40, stall=0.3) as server:
        pool = Pool("127.0.0.1", server.port)
        await pool.fill(4)
        phase = await open_loop(pool, lambda i: REQUEST, rate=200, seconds=1.0)
        pool.close()
    assert phase.requests == 200 and phase.errors == {}
    assert max(phase.lag_ns) < 50e6  # the generator kept its schedule
    assert pool.opened > 40  # ... so the requests due during the stall needed connections of their own
    assert sum(1 for lat in phase.latency_ns if lat > 100e6) >= 30


def test_the_board_spans_every_state():
    histories = task_histories(40, 4)
    from events.task_state import fold

    states = {fold(h).status for h in histories}
    assert {"pending", "analyzing", "queued", "assigned", "in_progress", "testing", "cancelled", "failed",
            "completed"} <= states


def test_quick_run_end_to_end():
    result = CliRunner().invoke(cli, ["bench", "api", "--quick", "--json"], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    body = json.loads(result.output.splitlines()[-1])
    bench = ApiBench(**{k: v for k, v in body.items() if k != "endpoints"}, endpoints=[])
    assert (bench.tasks, bench.agents, bench.rounds, bench.rate) == (1000, 20, 2, 500.0)
    assert result.exit_code == (0 if bench.targets_met else 1)
    by = {e["endpoint"]: e for e in body["endpoints"]}
    assert list(by) == list(ENDPOINTS)
    for name, e in by.items():
        assert e["requests"] == 500 and e["errors"] == {}, e  # 2 rounds x 0.5 s x 500/s
        assert 0 < e["p50_ms"] <= e["p99_pooled_ms"] <= e["max_ms"] and 0 < e["p99_ms"] <= e["max_ms"]
        assert e["api_cpu_ms"] > 0 and e["bytes_per_response"] > 0
        assert (e["target"] != "") == (name in P99_TARGETED or name == "health")
    assert by["hello"]["p99_x_hello"] == 1.0 and by["hello"]["ok"] is None
    assert by["tasks"]["bytes_per_response"] > by["task"]["bytes_per_response"] > by["hello"]["bytes_per_response"]
    assert by["task"]["example"].startswith("/api/v1/tasks/bench_api-")
    assert set(body["api_gc"]) == {"0", "1", "2"} and body["connections"] >= 16
