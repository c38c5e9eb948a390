"""The spend ledger (issue 14, part 1) on a real nats-server: many agents reserving at
once never pass a cap; a dozen Anthropic coders (the real SDK against the local Messages
API) stop at their next call when the day's cap is spent, and what they spent is what the
server charged; busy scopes wait for calls in flight; caps are followed live; a damaged
entry and an unreachable bus fail closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import msgspec
import pytest

from events.errors import ConfigError
from events.spend import MICRO, Caps, Entry, Refusal, Reservation, Scope, period_of, scopes_for, to_micro
from events.subjects import Namespace, task_id_for
from events.work import Budget, CodeRequest
from infra.adapters.coders import prices
from infra.adapters.coders.anthropic_coder import AnthropicCoder
from infra.adapters.git import gitops
from infra.adapters.git.workspace import Workspace
from infra.adapters.nats.cluster_config import BUDGET, read_setting, update_setting, write_setting
from infra.adapters.nats.connection import connect
from infra.adapters.nats.provisioning import provision, spend_bucket
from infra.adapters.nats.server import EmbeddedServer
from infra.adapters.nats.spend_ledger import KVSpendLedger, LedgerUnavailable, SpendWatch, read_book
from tests.conftest import eventually
from tests.fakes.anthropic_api import FakeAnthropic, fake_anthropic, tool_call, usage  # noqa: F401 - a fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = "claude-sonnet-4-6"


async def set_caps(nc, ns: Namespace, caps: Caps) -> None:
    await write_setting(nc, ns, BUDGET, caps)


async def stored(nc, ns: Namespace, scope: Scope) -> Entry:
    kv = await nc.jetstream().key_value(spend_bucket(ns))
    return msgspec.json.decode((await kv.get(scope.key(period_of(time.time())))).value, type=Entry)


# -- many ledgers, one cap ----------------------------------------------------------------------
async def test_twenty_agents_reserving_at_once_never_pass_the_cap(nats_url, admin_kit, nc, ns) -> None:
    await provision(nc, ns)
    cap = 3.0
    await set_caps(nc, ns, Caps(day=cap, repo=100.0))
    conns = [await connect(nats_url, name=f"test-ledger-{i}", kit=admin_kit) for i in range(20)]
    ledgers = [KVSpendLedger(c, ns, name=f"agent-{i}") for i, c in enumerate(conns)]
    settled: list[int] = []
    refusals: list[Refusal] = []
    rng = random.Random(14)

    async def agent(i: int, ledger: KVSpendLedger) -> None:
        scopes = scopes_for(f"acme_app-{i}", "acme/app", f"author{i % 3}")
        for _ in range(50):
            amount = to_micro(rng.uniform(0.05, 0.30))
            got = await ledger.reserve(scopes, amount, ttl=30)
            if isinstance(got, Refusal):
                if not got.busy:
                    refusals.append(got)
                    return
                continue
            await asyncio.sleep(rng.uniform(0, 0.02))  # the call
            cost = int(amount * rng.uniform(0.2, 1.0))  # never more than the maximum reserved
            await ledger.settle(got, cost)
            settled.append(cost)

    try:
        await asyncio.wait_for(asyncio.gather(*(agent(i, led) for i, led in enumerate(ledgers))), 90)
    finally:
        for led in ledgers:
            await led.close()
        for c in conns:
            await c.close()
    day = await stored(nc, ns, Scope("day"))
    assert day.spent == sum(settled), "every settled cost is in the ledger, once"
    assert day.spent <= to_micro(cap), f"spent {day.spent} > cap"
    assert day.holds == {} and day.calls == len(settled)
    assert refusals and all(r.scope == "day" for r in refusals)  # every agent ended on the cap
    assert len(refusals) == 20
    assert day.spent > to_micro(cap) * 0.8, "the cap was nearly used, not refused early"
    # the scheduler's view: the day is exhausted; a raise frees it
    book = await read_book(nc, ns)
    assert book.wait_reason(scopes_for("x-1", "acme/app"), time.time()).startswith("budget:day — ")
    await set_caps(nc, ns, Caps(day=cap + 5, repo=100.0))
    assert (await read_book(nc, ns)).wait_reason(scopes_for("x-1", "acme/app"), time.time()) == ""


async def test_a_busy_scope_waits_for_the_call_in_flight_then_proceeds(nc, ns) -> None:
    await provision(nc, ns)
    await set_caps(nc, ns, Caps(repo=1.0))
    a, b = KVSpendLedger(nc, ns, name="a"), KVSpendLedger(nc, ns, name="b")
    try:
        scopes = scopes_for("acme_app-1", "acme/app")
        first = await a.reserve(scopes, to_micro(0.8), ttl=30)
        assert isinstance(first, Reservation) and first.held  # the repo scope holds it
        second = asyncio.create_task(b.reserve(scopes_for("acme_app-2", "acme/app"), to_micro(0.5), ttl=30))
        await asyncio.sleep(0.3)
        assert not second.done(), "b must wait while a's maximum is held"
        entry = await stored(nc, ns, Scope("repo", "acme/app"))
        assert len(entry.holds) == 1, "a waiting caller holds nothing"
        await a.settle(first, to_micro(0.1))  # a needed far less than its maximum
        got = await asyncio.wait_for(second, 10)
        assert isinstance(got, Reservation)
        await b.settle(got, to_micro(0.4))
        entry = await stored(nc, ns, Scope("repo", "acme/app"))
        assert entry.spent == to_micro(0.5) and entry.holds == {} and entry.calls == 2
    finally:
        await a.close()
        await b.close()


async def test_caps_are_followed_live_and_uncapped_scopes_are_still_counted(nc, ns) -> None:
    await provision(nc, ns)
    ledger = KVSpendLedger(nc, ns, name="a")
    watch_changes: list[int] = []
    watch = SpendWatch(nc, ns, on_change=lambda: watch_changes.append(1))
    try:
        await ledger.start()
        await watch.start()
        scopes = scopes_for("acme_app-1", "acme/app", "alice")
        # no caps: nothing is held (no I/O before the call), the cost is counted everywhere
        r = await ledger.reserve(scopes, to_micro(1.0), ttl=30)
        assert isinstance(r, Reservation) and r.held == ()
        await ledger.settle(r, to_micro(0.25))
        for scope in scopes:
            assert (await stored(nc, ns, scope)).spent == to_micro(0.25)
        await update_setting(nc, ns, BUDGET, Caps, lambda c: Caps(author=0.2))
        await eventually(lambda: ledger.caps.author == 0.2, timeout=5)
        refusal = await ledger.reserve(scopes, to_micro(0.01), ttl=30)
        assert isinstance(refusal, Refusal) and refusal.scope == "author:alice" and not refusal.busy
        await eventually(lambda: watch.book().holds_back("t-2", "acme/app", "alice", datetime.now(UTC)) != "",
                         timeout=5)
        assert watch_changes, "the scheduler is woken when a scope becomes exhausted"
        await update_setting(nc, ns, BUDGET, Caps, lambda c: Caps(author=1.0))
        await eventually(lambda: ledger.caps.author == 1.0, timeout=5)
        assert isinstance(await ledger.reserve(scopes, to_micro(0.01), ttl=30), Reservation)
        assert await read_setting(nc, ns, BUDGET, Caps) == Caps(author=1.0)
    finally:
        await ledger.close()
        await watch.stop()


async def test_a_damaged_entry_fails_closed_and_says_how_to_repair_it(nc, ns) -> None:
    await provision(nc, ns)
    await set_caps(nc, ns, Caps(day=10.0))
    kv = await nc.jetstream().key_value(spend_bucket(ns))
    key = Scope("day").key(period_of(time.time()))
    await kv.put(key, b"{not json")
    ledger = KVSpendLedger(nc, ns, name="a")
    try:
        with pytest.raises(LedgerUnavailable, match=f"{key}.*damaged.*nats kv del"):
            await ledger.reserve(scopes_for("t-1", "acme/app"), to_micro(0.1), ttl=30)
        # a bad caps value keeps the caps the ledger had (never "no cap")
        assert ledger.caps.day == 10.0
        await (await nc.jetstream().key_value(f"{ns.prefix}_config")).put(BUDGET, b'{"day": "lots"}')
        await asyncio.sleep(0.3)
        assert ledger.caps.day == 10.0
        with pytest.raises(ConfigError, match="budget"):
            await read_book(nc, ns)
    finally:
        await ledger.close()


async def test_an_unreachable_bus_fails_a_reservation_closed_after_a_bounded_wait(tmp_path) -> None:
    server = EmbeddedServer(tmp_path / "nats", name="ledger-down")
    url = await asyncio.to_thread(server.start)
    ns = Namespace("tdown")
    conn = await connect(url, name="test-ledger-down", quiet=True)
    ledger = KVSpendLedger(conn, ns, name="a", unavailable=1.5, timeout=0.5)
    try:
        await provision(conn, ns)
        await write_setting(conn, ns, BUDGET, Caps(day=10.0))
        await ledger.start()
        await asyncio.to_thread(server.stop)
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="unreachable"):
            await ledger.reserve(scopes_for("t-1", "acme/app"), to_micro(0.1), ttl=30)
        assert time.monotonic() - started < 10
    finally:
        await ledger.close()
        with contextlib.suppress(Exception):  # the server is gone: the connection with it
            await conn.close()
        server.stop()


# -- a dozen Anthropic coders against the local Messages API -------------------------------------
def _repo(root: Path) -> Path:
    origin = root / "origin"
    origin.mkdir()
    (origin / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    gitops.run_git(origin, "init", "-q")
    gitops.commit_all(origin, "initial", "t", "t@example.com")
    return origin


class MeteredApi:
    """Answers every request with a tool call and an honest usage: input tokens a third of
    the request's bytes, 600 output tokens (under ``max_tokens``). Keeps the cost of each
    response served, as a bill would."""

    def __init__(self, fake: FakeAnthropic, requests: int) -> None:
        self.billed: list[float] = []
        fake.add(*([self.respond] * requests))

    def respond(self, body: dict):
        n_in = len(json.dumps(body).encode()) // 3
        use = usage(n_in, 600)
        self.billed.append(prices.cost(MODEL, input_tokens=n_in, output_tokens=600))
        return tool_call("list_files", {}, use=use)


async def test_a_dozen_coders_stop_at_the_days_cap_and_the_ledger_matches_the_bill(
        tmp_path, nats_url, admin_kit, nc, ns, fake_anthropic) -> None:  # noqa: F811
    fake, url = fake_anthropic
    await provision(nc, ns)
    cap = 0.60
    await set_caps(nc, ns, Caps(day=cap))
    api = MeteredApi(fake, requests=400)
    origin = _repo(tmp_path)
    conns, coders, runs = [], [], []
    for i in range(12):
        conn = await connect(nats_url, name=f"test-coder-{i}", kit=admin_kit)
        conns.append(conn)
        client = anthropic.AsyncAnthropic(api_key="k-" + uuid.uuid4().hex, base_url=url, max_retries=0)
        coder = AnthropicCoder(default_model=MODEL, client=client, max_tokens=1024,
                               ledger=KVSpendLedger(conn, ns, name=f"agent-{i}"))
        coders.append(coder)
        task_id = task_id_for("acme/calc", i + 1)
        ws = Workspace.create(tmp_path / f"ws{i}", f"agent-{i}", task_id, {})
        gitops.clone(str(origin), ws.repo_dir)
        request = CodeRequest(task_id=task_id, attempt=1, title="add() subtracts", body="fix it",
                              specialty="backend", repo="acme/calc", repo_dir=str(ws.repo_dir),
                              issue_number=i + 1, author="alice",
                              budget=Budget(max_turns=200, max_dollars=100.0))
        runs.append(coder.implement(request, ws))
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*runs), 90)
    finally:
        for coder in coders:
            await coder.close()
        for conn in conns:
            await conn.close()
    assert all(o.status == "budget_exhausted" and o.budget_scope == "day" for o in outcomes), \
        [(o.status, o.reason) for o in outcomes]
    assert all(o.reason.startswith("budget:day exhausted") for o in outcomes)
    billed = sum(api.billed)
    assert billed <= cap, f"the server billed ${billed:.4f} > cap ${cap}"  # not even one call over
    day = await stored(nc, ns, Scope("day"))
    assert day.holds == {} and day.calls == len(api.billed)
    # what the ledger holds is what the server charged (each call rounded up to a micro-dollar)
    assert abs(day.spent - to_micro(billed)) <= len(api.billed)
    assert sum(o.usage.dollars for o in outcomes) == pytest.approx(billed)
    assert billed > cap * 0.5, "the cap was used, not refused early"
    assert len(api.billed) >= 12, "every coder made calls before the cap"
