"""The committed golden log of contract v1, replayed by today's decoder and folds.

``tests/fixtures/golden_events_v1.jsonl`` is the demo's event log as v1 wrote it (bytes as
stored, two poison messages at the end), frozen: later versions may change formats (their
upcasters bring these events up to date on read, ``events.codec``) but never this file.
Every event must still decode, and the folds must reach the committed projection:
``tests/fixtures/golden_projection.json`` (the current code's projection of the golden log,
``python -m tests.support.make_golden --reproject``) while the golden log is this same
recording; once the golden log is recorded anew, the v1 log's own projection, frozen as
``tests/fixtures/golden_projection_v1.json`` (``python -m tests.unit.test_golden_v1``
records it with the code of that day)."""

from __future__ import annotations

import json
from pathlib import Path

from events.codec import decode_event
from tests.support.make_golden import FIXTURES, POISON, project
from tests.unit.test_golden import contains

V1_LOG = FIXTURES / "golden_events_v1.jsonl"
V1_PROJECTION = FIXTURES / "golden_projection_v1.json"


def v1_lines() -> list[dict]:
    return [json.loads(line) for line in V1_LOG.read_text().splitlines()]


def expected_projection() -> tuple[Path, dict]:
    if V1_PROJECTION.is_file():
        return V1_PROJECTION, json.loads(V1_PROJECTION.read_text())
    same = (FIXTURES / "golden_events.jsonl").read_bytes() == V1_LOG.read_bytes()
    assert same, ("the golden log was recorded anew: freeze the v1 log's projection first "
                  "(`python -m tests.unit.test_golden_v1`, then review and commit golden_projection_v1.json)")
    return FIXTURES / "golden_projection.json", json.loads((FIXTURES / "golden_projection.json").read_text())


def test_every_v1_event_still_decodes() -> None:
    lines = v1_lines()
    assert len(lines) > len(POISON) + 50
    types = set()
    for line in lines[: -len(POISON)]:
        event = decode_event(line["subject"].split(".", 1)[1], line["data"].encode())  # raises if not
        types.add(event.__struct_config__.tag)
    assert {"task.created", "task.assigned", "agent.implementation_produced", "task.completed"} <= types


def test_the_v1_log_folds_to_the_committed_projection() -> None:
    source, expected = expected_projection()
    model = project(v1_lines())
    snapshot = json.loads(json.dumps(model.snapshot()))
    contains(snapshot, expected, source.name)
    assert snapshot["tasks"].keys() == expected["tasks"].keys()
    assert snapshot["agents"].keys() == expected["agents"].keys()
    assert {t.status for t in model.tasks.values()} == {"completed"}
    assert [b.seq for b in model.bad] == [line["seq"] for line in v1_lines()[-len(POISON):]]


def record() -> None:
    """Freeze the v1 log's projection by the current code (when the golden log is recorded anew)."""
    snapshot = project(v1_lines()).snapshot()
    V1_PROJECTION.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"wrote {V1_PROJECTION}")


if __name__ == "__main__":
    record()
