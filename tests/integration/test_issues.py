"""Issue intake from the CLI: number allocation on the log, idempotent publishes."""

from __future__ import annotations

import asyncio

import pytest

from events.codec import decode_issue
from events.issue import IssueOpened
from infra.adapters.nats.issue_publisher import (
    allocate_number,
    new_issue,
    open_issue,
    opened_scope,
    publish_issue,
)
from infra.adapters.nats.provisioning import provision

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def issues_ns(nc, ns):
    await provision(nc, ns)
    return ns


async def test_numbers_are_allocated_in_order(nc, issues_ns):
    ns = issues_ns
    got = [await open_issue(nc, ns, repo="acme/web", title=f"bug {i}") for i in range(3)]
    assert [p.event.number for p in got] == [1, 2, 3]
    assert [p.duplicate for p in got] == [False, False, False]
    assert got[0].subject == f"{ns.prefix}.issue.local.acme_web.1.opened"
    assert got[2].task_id == "acme_web-3"
    assert got[0].stream == ns.issues_stream
    assert got[0].seq < got[1].seq < got[2].seq
    # another repository counts on its own
    other = await open_issue(nc, ns, repo="acme/api", title="x")
    assert other.event.number == 1


async def test_published_event_is_readable_from_the_stream(nc, issues_ns):
    ns = issues_ns
    p = await open_issue(nc, ns, repo="solo", title="  Crash on start ", labels=("bug", "backend"))
    msg = await nc.jetstream().get_msg(ns.issues_stream, p.seq)
    assert msg.headers["Nats-Msg-Id"] == "local:solo#1:opened"
    event = decode_issue(ns.rel(msg.subject), msg.data)
    assert isinstance(event, IssueOpened)
    assert (event.repo, event.number, event.title) == ("solo", 1, "Crash on start")
    assert event.labels == ("bug", "backend")
    assert p.task_id == "local_solo-1"


async def test_concurrent_publishers_never_share_a_number(nc, issues_ns):
    ns = issues_ns
    results = await asyncio.gather(*(open_issue(nc, ns, repo="acme/race", title=f"t{i}") for i in range(10)))
    numbers = sorted(p.event.number for p in results)
    assert numbers == list(range(1, 11))
    assert len({p.seq for p in results}) == 10
    scope = opened_scope(ns, "local", "acme/race")
    info = await nc.jetstream().stream_info(ns.issues_stream, subjects_filter=scope)
    assert info.state.messages == 10


async def test_repeated_number_is_a_duplicate(nc, issues_ns):
    ns = issues_ns
    first = await open_issue(nc, ns, repo="acme/web", title="t", number=7)
    again = await open_issue(nc, ns, repo="acme/web", title="t (edited)", number=7)
    assert not first.duplicate and again.duplicate
    assert again.seq == first.seq
    # allocation continues after the highest number, even one given explicitly
    nxt = await open_issue(nc, ns, repo="acme/web", title="next")
    assert nxt.event.number == 8


async def test_allocation_respects_out_of_order_explicit_numbers(nc, issues_ns):
    ns = issues_ns
    await open_issue(nc, ns, repo="o/r", title="a", number=100)
    await open_issue(nc, ns, repo="o/r", title="b", number=5)  # last message, not the max
    assert (await open_issue(nc, ns, repo="o/r", title="c")).event.number == 101


async def test_allocate_number_and_stale_expectation(nc, issues_ns):
    ns = issues_ns
    js = nc.jetstream()
    alloc = await allocate_number(js, ns, "local", "x/y")
    assert (alloc.number, alloc.expected_last_seq) == (1, 0)
    assert alloc.scope == f"{ns.prefix}.issue.local.x_y.*.opened"
    await open_issue(nc, ns, repo="x/y", title="someone else")
    from events.errors import ConcurrencyConflict

    with pytest.raises(ConcurrencyConflict):  # the scope moved on since we allocated
        await publish_issue(nc, ns, new_issue(repo="x/y", title="mine", number=2), expect=alloc)
    fresh = await allocate_number(js, ns, "local", "x/y")
    assert fresh.number == 2 and fresh.expected_last_seq > 0
    seq, dup = await publish_issue(nc, ns, new_issue(repo="x/y", title="mine", number=2), expect=fresh)
    assert seq > fresh.expected_last_seq and not dup
