"""The spend ledger's rules (events.spend), pure: reservations against caps, busy vs
exhausted, settlement, expired holds, the scheduler's view and the caps' parsing — and,
over random interleavings of many agents' calls, that no cap is ever passed."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.spend import (
    MICRO,
    Book,
    Caps,
    Entry,
    Refusal,
    Scope,
    dollars,
    entry_scope,
    exhausted,
    next_reset,
    parse_caps,
    period_of,
    refused,
    release,
    reserve,
    scopes_for,
    settle,
    to_micro,
)

NOW = datetime(2026, 12, 2, 15, 30, tzinfo=UTC).timestamp()


def fresh(label: str = "day", period: str = "2026-12-02") -> Entry:
    return Entry(scope=label, period=period)


# -- scopes and keys -----------------------------------------------------------------------
def test_a_call_is_charged_to_its_task_repository_author_and_day() -> None:
    assert [s.label for s in scopes_for("acme_app-7", "acme/app", "alice")] == [
        "task:acme_app-7", "repo:acme/app", "author:alice", "day"]
    assert [s.label for s in scopes_for("t-1", "acme/app")] == ["task:t-1", "repo:acme/app", "day"]


def test_keys_are_valid_kv_keys_and_distinct_for_distinct_names() -> None:
    day = "2026-12-02"
    assert Scope("task", "acme_app-7").key(day) == "task.acme_app-7"
    assert Scope("day").key(day) == "2026-12-02.day"
    assert Scope("repo", "acme/app").key(day) == "2026-12-02.repo.acme/app"
    # dots, spaces and unicode cannot make a key invalid or collide
    odd = [Scope("repo", "acme/my.app"), Scope("repo", "acme/my=2Eapp"), Scope("author", "zoë x"),
           Scope("author", "a.b"), Scope("author", "a..b")]
    keys = [s.key(day) for s in odd]
    assert len(set(keys)) == len(keys)
    import re
    for k in keys:
        assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", k) and ".." not in k, k


def test_bad_scopes_are_refused() -> None:
    for kind, name in (("day", "x"), ("repo", ""), ("planet", "x"), ("author", "a\nb"), ("task", "x" * 300)):
        with pytest.raises(ValueError):
            Scope(kind, name)  # type: ignore[arg-type]


def test_the_day_is_utc_and_resets_at_midnight() -> None:
    late = datetime(2026, 12, 2, 23, 59, 59, tzinfo=UTC).timestamp()
    assert period_of(late) == "2026-12-02" and period_of(late + 1) == "2026-12-03"
    assert next_reset(late) == datetime(2026, 12, 3, tzinfo=UTC)


# -- reserve / settle ------------------------------------------------------------------------
def test_a_reservation_holds_its_amount_until_settled_with_the_real_cost() -> None:
    e = reserve(fresh(), cap=10 * MICRO, amount=3 * MICRO, hold_id="h1", now=NOW, ttl=60)
    assert isinstance(e, Entry) and e.reserved(NOW) == 3 * MICRO and e.spent == 0
    e = settle(e, "h1", cost=MICRO // 2, now=NOW + 1)
    assert e.reserved(NOW + 1) == 0 and e.spent == MICRO // 2 and e.calls == 1


def test_exhausted_when_the_call_cannot_fit_in_what_is_left() -> None:
    e = msgspec.structs.replace(fresh(), spent=9 * MICRO)
    r = reserve(e, cap=10 * MICRO, amount=2 * MICRO, hold_id="h", now=NOW, ttl=60)
    assert isinstance(r, Refusal) and not r.busy
    assert r.reason.startswith("budget:day exhausted: $9.00 spent today of $10.00")
    assert not exhausted(e, 10 * MICRO)  # nothing refused yet: a smaller call may fit
    marked = refused(e, r, NOW)
    assert exhausted(marked, 10 * MICRO)  # what the scheduler reads
    assert not exhausted(marked, 12 * MICRO)  # raised: room again for that call
    ok = reserve(marked, cap=12 * MICRO, amount=2 * MICRO, hold_id="h", now=NOW, ttl=60)
    assert isinstance(ok, Entry) and ok.refused == 0  # a reservation that fits clears it


def test_busy_when_other_calls_hold_the_headroom_and_free_again_once_they_settle() -> None:
    e = reserve(fresh(), cap=10 * MICRO, amount=6 * MICRO, hold_id="a", now=NOW, ttl=60)
    r = reserve(e, cap=10 * MICRO, amount=6 * MICRO, hold_id="b", now=NOW, ttl=60)
    assert isinstance(r, Refusal) and r.busy and "busy" in r.reason
    e = settle(e, "a", cost=MICRO, now=NOW)  # the maximum was not needed: most of it comes back
    assert isinstance(reserve(e, cap=10 * MICRO, amount=6 * MICRO, hold_id="b", now=NOW, ttl=60), Entry)


def test_a_dead_agents_hold_expires_and_frees_the_scope() -> None:
    e = reserve(fresh(), cap=10 * MICRO, amount=9 * MICRO, hold_id="dead", now=NOW, ttl=30)
    assert isinstance(reserve(e, cap=10 * MICRO, amount=5 * MICRO, hold_id="x", now=NOW + 10, ttl=30), Refusal)
    later = reserve(e, cap=10 * MICRO, amount=5 * MICRO, hold_id="x", now=NOW + 31, ttl=30)
    assert isinstance(later, Entry) and set(later.holds) == {"x"}
    # the late settlement of an expired hold still counts its cost
    assert settle(later, "dead", cost=2 * MICRO, now=NOW + 40).spent == 2 * MICRO


def test_release_gives_a_hold_back_unused_and_an_uncapped_scope_never_refuses() -> None:
    e = reserve(fresh(), cap=None, amount=10**12, hold_id="h", now=NOW, ttl=5)
    assert isinstance(e, Entry)
    assert release(e, "h", NOW).holds == {}
    assert not exhausted(msgspec.structs.replace(e, spent=10**12), None)


def test_bad_reservations_are_refused() -> None:
    with pytest.raises(ValueError):
        reserve(fresh(), cap=1, amount=-1, hold_id="h", now=NOW, ttl=5)
    with pytest.raises(ValueError):
        reserve(fresh(), cap=1, amount=1, hold_id="h", now=NOW, ttl=0)


# -- no interleaving passes a cap ---------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    cap=st.integers(1, 50 * MICRO),
    calls=st.lists(st.tuples(st.integers(0, 20 * MICRO), st.floats(0, 1)), min_size=1, max_size=40),
    order=st.randoms(use_true_random=False),
)
def test_no_interleaving_of_many_agents_calls_passes_the_cap(cap, calls, order) -> None:
    """Each call: reserve its maximum, then (later, in any order with the others) settle
    a real cost <= that maximum. The sum of what is spent never exceeds the cap, and
    spent + held never exceeds it at any step."""
    entry = fresh()
    pending = list(enumerate(calls))  # not reserved yet
    held: dict[str, int] = {}  # hold id -> real cost it will settle
    steps = 0
    while pending or held:
        steps += 1
        if pending and (not held or order.random() < 0.5):
            i, (maximum, fraction) = pending.pop(order.randrange(len(pending)))
            got = reserve(entry, cap, maximum, f"h{i}", NOW, ttl=1e6)
            if isinstance(got, Entry):
                entry = got
                held[f"h{i}"] = int(maximum * fraction)
            elif got.busy:
                pending.append((i, (maximum, fraction)))  # try again later
            else:
                entry = refused(entry, got, NOW)
        else:
            hid = order.choice(sorted(held))
            entry = settle(entry, hid, held.pop(hid), NOW)
        assert entry.spent + entry.reserved(NOW) <= cap
        assert steps < 10_000
    assert entry.spent <= cap


# -- the scheduler's and `ccc budget`'s view ---------------------------------------------------
def test_the_book_names_the_first_exhausted_scope_with_the_words_of_the_wait() -> None:
    day = period_of(NOW)
    repo = Scope("repo", "acme/app")
    entries = {repo.key(day): Entry(scope=repo.label, period=day, spent=5 * MICRO, calls=12)}
    book = Book(entries, Caps(repo=5.0, day=100.0))
    when = datetime.fromtimestamp(NOW, UTC)
    why = book.holds_back("acme_app-1", "acme/app", "alice", when)
    assert why.startswith("budget:repo:acme/app — $5.00 of $5.00 spent today; resumes at 2026-12-03 00:00 UTC")
    assert book.holds_back("other-1", "acme/other", "alice", when) == ""
    # raised: free; a per-repository override decides over the default
    assert Book(entries, Caps(repo=5.0, repos={"acme/app": 8.0})).holds_back("t", "acme/app", "", when) == ""
    # tomorrow is another day
    tomorrow = datetime.fromtimestamp(NOW + 86_400, UTC)
    assert book.holds_back("acme_app-1", "acme/app", "alice", tomorrow) == ""
    # a task's own cap does not reset
    task = Scope("task", "acme_app-1")
    tb = Book({task.key(day): Entry(scope=task.label, spent=2 * MICRO)}, Caps(task=2.0))
    assert tb.holds_back("acme_app-1", "acme/app", "", tomorrow) == (
        "budget:task:acme_app-1 — $2.00 of $2.00 spent; resumes when the cap is raised")


def test_rows_show_spend_and_headroom_per_scope_today_and_capped_scopes_without_spend() -> None:
    day = period_of(NOW)
    e = reserve(Entry(scope="repo:acme/app", period=day, spent=MICRO), 3 * MICRO, MICRO // 2, "h", NOW, 60)
    assert isinstance(e, Entry)
    entries = {
        Scope("repo", "acme/app").key(day): e,
        Scope("day").key("2026-12-01"): Entry(scope="day", period="2026-12-01", spent=99 * MICRO),  # yesterday
        Scope("task", "t-1").key(day): Entry(scope="task:t-1", spent=MICRO // 4, calls=2),
    }
    rows = Book(entries, Caps(repo=3.0, day=50.0, authors={"bob": 1.0})).rows(NOW)
    by = {r.scope: r for r in rows}
    assert list(by) == ["day", "repo:acme/app", "author:bob", "task:t-1"]
    assert by["day"].spent == 0 and by["day"].cap == 50 * MICRO  # today's, not yesterday's
    assert by["repo:acme/app"].headroom == 3 * MICRO - MICRO - MICRO // 2 and by["repo:acme/app"].reserved
    assert by["task:t-1"].cap is None and by["task:t-1"].headroom is None and by["task:t-1"].calls == 2


def test_entry_scope_reads_keys_back_and_ignores_foreign_ones() -> None:
    day = "2026-12-02"
    for scope in (Scope("day"), Scope("repo", "acme/my.app"), Scope("author", "zoë"), Scope("task", "t-1")):
        assert entry_scope(scope.key(day), Entry(scope=scope.label)) == scope
    assert entry_scope("weird", Entry(scope="day?")) is None


# -- caps -------------------------------------------------------------------------------------
def test_caps_from_flags_merge_over_the_stored_ones() -> None:
    base = Caps(day=100.0, repos={"acme/app": 20.0}, authors={"bob": 3.0})
    caps = parse_caps(task="2.5", repo=["10", "acme/web=$15"], author=["bob=off"], base=base)
    assert caps == Caps(task=2.5, day=100.0, repo=10.0, repos={"acme/app": 20.0, "acme/web": 15.0})
    assert parse_caps(day="off", base=caps).day is None
    assert caps.cap(Scope("repo", "acme/web")) == 15 * MICRO and caps.cap(Scope("repo", "x/y")) == 10 * MICRO
    assert caps.cap(Scope("author", "eve")) is None


@pytest.mark.parametrize("flags", [{"task": "lots"}, {"day": "-1"}, {"repo": ["=5"]}, {"author": ["bob=nan"]},
                                   {"day": "inf"}, {"task": "1e12"}])
def test_bad_caps_are_refused_with_the_flag_named(flags) -> None:
    with pytest.raises(ValueError, match="budget|dollars"):
        parse_caps(**flags)


def test_money_is_counted_in_whole_micro_dollars() -> None:
    assert to_micro(0.1) + to_micro(0.2) == to_micro(0.3)
    assert to_micro(1e-7) == 1  # a fraction of a micro-dollar is never free
    assert dollars(1_234_567) == "$1.23" and dollars(4_200) == "$0.0042" and dollars(0) == "$0.00"
