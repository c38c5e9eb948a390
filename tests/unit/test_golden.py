"""The stored golden log, re-projected with the current code (no NATS needed)."""

from __future__ import annotations

import json

from events.codec import decode_event
from tests.support.make_golden import FIXTURES, POISON, project


def load_lines() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "golden_events.jsonl").read_text().splitlines()]


def test_every_stored_event_still_decodes():
    lines = load_lines()
    for line in lines[: -len(POISON)]:
        subject = line["subject"]
        decode_event(subject.split(".", 1)[1], line["data"].encode())  # raises if not


def contains(actual, expected, path="") -> None:
    """``actual`` has everything ``expected`` has, equal; views may gain fields (schemas
    evolve additively), but nothing recorded may change or disappear."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        for key, value in expected.items():
            assert key in actual, f"{path}.{key} disappeared"
            contains(actual[key], value, f"{path}.{key}")
    else:
        assert actual == expected, f"{path}: {actual!r} != recorded {expected!r}"


def test_reprojection_equals_the_recorded_projection():
    expected = json.loads((FIXTURES / "golden_projection.json").read_text())
    snapshot = json.loads(json.dumps(project(load_lines()).snapshot()))
    contains(snapshot, expected)
    assert snapshot["tasks"].keys() == expected["tasks"].keys()
    assert snapshot["agents"].keys() == expected["agents"].keys()


def test_golden_log_tells_the_demo_story():
    model = project(load_lines())
    assert {t.status for t in model.tasks.values()} == {"completed"}
    assert model.tasks["demo_shop-4"].attempt == 2  # failed tests, then a retry
    assert model.bad_count == len(POISON)
    assert [b.seq for b in model.bad] == [line["seq"] for line in load_lines()[-len(POISON):]]
