from datetime import datetime, timezone

import pytest

from events.errors import ConcurrencyConflict
from events.task import Analysis, IssueRef
from events.task_state import CreateTask, RecordAnalysis, StartAnalysis, decide, evolve

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


async def test_append_load_conflict(store):
    issue = IssueRef(source="local", repo="a/b", number=1, title="t")
    ev = decide(None, CreateTask(at=NOW, actor="c", task_id="a_b-1", issue=issue))
    seqs = await store.append(ev, expected_last_seq=0)
    state, last = await store.load_task("a_b-1")
    assert state.status == "pending" and last == seqs[0]
    with pytest.raises(ConcurrencyConflict):
        await store.append(ev, expected_last_seq=0)
    for cmd in (StartAnalysis(at=NOW, actor="c"),
                RecordAnalysis(at=NOW, actor="c", analysis=Analysis(specialty="backend"))):
        evs = decide(state, cmd)
        await store.append(evs, expected_last_seq=last)
        state, last = await store.load_task("a_b-1")
    assert state.status == "queued"
    stale = decide(evolve(None, ev[0]), StartAnalysis(at=NOW, actor="c2"))
    with pytest.raises(ConcurrencyConflict):
        await store.append(stale, expected_last_seq=seqs[0])
    items = [x async for x in store.read()]
    assert [s for s, _ in items] == [1, 2, 3]
