"""The wire format: what was stored is what the current code writes, byte for byte.

``test_golden`` checks that the stored log still decodes and projects the same; this
checks the other direction, which a refactoring of the event classes (field order, a
derived field list, omitted defaults) could silently break."""

from __future__ import annotations

import json

from events.codec import BadMessage, decode_event, decode_or_bad, encode
from tests.support.make_golden import FIXTURES, POISON


def stored() -> list[dict]:
    lines = (FIXTURES / "golden_events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][: -len(POISON)]


def test_every_stored_event_encodes_to_the_bytes_stored() -> None:
    lines = stored()
    assert {json.loads(line["data"])["type"] for line in lines} >= {"task.analyzed", "task.created"}
    for line in lines:
        data = line["data"].encode()
        assert encode(decode_event(line["subject"].split(".", 1)[1], data)) == data


def test_a_message_that_does_not_decode_becomes_a_bad_message() -> None:
    bad = decode_or_bad(9, "ccc.task.x-1.created", "task.x-1.created", b"\xffnot json")
    assert isinstance(bad, BadMessage) and (bad.seq, bad.subject) == (9, "ccc.task.x-1.created")
    assert bad.error and bad.preview == "\ufffdnot json"
