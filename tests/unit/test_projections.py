"""Projection laws, pure (no NATS): incremental folding in any batch sizes with
redelivery equals one rebuild from sequence 0; bad items are skipped, counted and
kept with their sequence."""

from __future__ import annotations

import random
import typing

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import BadMessage, decode_or_bad, encode
from events.task import TaskEvent, TaskFixQueued
from events.task_state import TASK_STATUSES, WITH_AGENT
from projections.read_model import ReadModel
from tests.support.histories import random_history


def numbered(log):
    return [(i + 1, e) for i, e in enumerate(log)]


def rebuild(items) -> ReadModel:
    m = ReadModel()
    for seq, item in items:
        m.apply(seq, item)
    return m


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), batch_seed=st.integers(0, 10_000))
def test_incremental_in_random_batches_with_redelivery_equals_rebuild(seed, batch_seed):
    items = numbered(random_history(seed))
    full = rebuild(items)
    rnd = random.Random(batch_seed)
    inc = ReadModel()
    pos = 0
    while pos < len(items):
        size = rnd.randint(1, 17)
        batch = items[pos:pos + size]
        # redeliver an overlapping window from before this batch, as a consumer does
        # after a reconnect: it must be a no-op
        back = rnd.randint(0, min(pos, 5))
        inc.apply_many(items[pos - back:pos] + batch)
        pos += size
    assert inc.snapshot() == full.snapshot()
    assert inc.last_seq == len(items)
    # the per-agent counts the scheduler reads are kept incrementally: they must match
    # a count over the task view
    expected: dict[str, int] = {}
    for t in full.tasks.values():
        if t.status in WITH_AGENT and t.agent_id:
            expected[t.agent_id] = expected.get(t.agent_id, 0) + 1
    assert inc.held() == full.held() == expected


def test_histories_are_nontrivial():
    """The generator leaves tasks in every status a decision rests in, and writes every
    kind of task event: the pull request's way to green included, fix and rebase rounds
    and the merge queue (guards the property tests)."""
    seen: set[str] = set()
    written: set[type] = set()
    for seed in range(40):
        log = random_history(seed, steps=200)
        m = rebuild(numbered(log))
        seen |= {t.status for t in m.tasks.values()} | {a.status for a in m.agents.values()}
        written |= {type(e) for e in log}
        assert m.bad_count == 0
    # checks_failed and conflicted are only passed through, within one decision; pending
    # and analyzing are left at the next step
    assert set(TASK_STATUSES) - {"pending", "analyzing", "checks_failed", "conflicted"} | {
        "idle", "busy", "offline"} <= seen
    assert set(typing.get_args(TaskEvent)) <= written
    kinds = {e.kind for seed in range(40) for e in random_history(seed, steps=200)
             if isinstance(e, TaskFixQueued)}
    assert kinds == {"ci_fix", "rebase"}


def test_redelivery_is_a_noop():
    items = numbered(random_history(7))
    m = rebuild(items)
    before = m.snapshot()
    assert m.apply_many(items) == 0
    assert m.snapshot() == before


def test_bad_items_are_skipped_counted_and_kept_with_seq():
    log = random_history(3)
    raw = [(e.rel_subject, encode(e)) for e in log]
    raw.insert(5, ("task.acme_app-1.created", b"not json at all"))
    raw.insert(9, ("task.acme_app-1.created", b'{"type":"task.exploded","task_id":"acme_app-1"}'))
    raw.insert(12, ("task.acme_app-1.created", b'{"type":"task.created","task_id":7}'))
    # a valid event on the wrong subject (a forged write onto another aggregate)
    raw.insert(15, ("task.acme_app-2.created", encode(log[0])))
    items = [(i + 1, decode_or_bad(i + 1, "ccc." + s, s, d)) for i, (s, d) in enumerate(raw)]
    m = rebuild(items)
    good = rebuild(numbered(log))
    assert m.bad_count == 4
    assert [b.seq for b in m.bad] == [6, 10, 13, 16]
    assert "subject mismatch" in m.bad[3].error
    assert m.applied_count == len(log)
    # everything after the bad messages is applied: same views as the clean log
    assert msgspec.to_builtins(m.tasks) == msgspec.to_builtins(good.tasks)
    assert msgspec.to_builtins(m.agents) == msgspec.to_builtins(good.agents)


def test_illegal_transition_in_log_is_recorded_not_fatal():
    log = random_history(11)
    first = log[0]
    # the same creation event again at a later position: a version repeat
    items = numbered(log) + [(len(log) + 1, first)]
    m = rebuild(items)
    assert m.bad_count == 1
    assert m.bad[0].seq == len(log) + 1
    assert "VersionMismatch" in m.bad[0].error or "IllegalTransition" in m.bad[0].error


def test_cluster_view_counts():
    m = rebuild(numbered(random_history(5, steps=300)))
    c = m.cluster()
    assert c.tasks_total == len(m.tasks)
    assert sum(c.tasks_by_status.values()) == len(m.tasks)
    assert sum(c.agents_by_status.values()) == len(m.agents)
    online = [a for a in m.agents.values() if a.status != "offline"]
    assert c.capacity == sum(a.capacity for a in online)
    assert c.active == sum(len(a.active_tasks) for a in online)
    assert c.last_seq == m.last_seq


def test_bad_message_struct_roundtrip():
    b = BadMessage(seq=3, subject="ccc.task.x.created", error="boom", preview="{")
    assert msgspec.json.decode(msgspec.json.encode(b), type=BadMessage) == b


def test_the_followed_pull_requests_index_matches_the_task_view():
    """The pull-request pass's work list is kept incrementally; it is what the tasks say."""
    from projections.read_model import FOLLOWED

    for seed in range(25):
        m = rebuild(numbered(random_history(seed, steps=200)))
        assert m.following == {t for t, s in m.tasks.items() if s.status in FOLLOWED}
