"""The stored golden log, re-projected with the current code (no NATS needed)."""

from __future__ import annotations

import json

from events.codec import decode_event
from tests.make_golden import FIXTURES, POISON, project


def load_lines() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "golden_events.jsonl").read_text().splitlines()]


def test_every_stored_event_still_decodes():
    lines = load_lines()
    for line in lines[: -len(POISON)]:
        subject = line["subject"]
        decode_event(subject.split(".", 1)[1], line["data"].encode())  # raises if not


def test_reprojection_equals_the_recorded_projection():
    expected = json.loads((FIXTURES / "golden_projection.json").read_text())
    snapshot = json.loads(json.dumps(project(load_lines()).snapshot()))
    assert snapshot == expected


def test_golden_log_tells_the_demo_story():
    model = project(load_lines())
    assert {t.status for t in model.tasks.values()} == {"completed"}
    assert model.tasks["demo_shop-4"].attempt == 2  # failed tests, then a retry
    assert model.bad_count == len(POISON)
    assert [b.seq for b in model.bad] == [line["seq"] for line in load_lines()[-len(POISON):]]
