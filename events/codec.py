"""One encoder and one typed decoder for everything on the event log, reused.

``decode_event`` also checks that the payload was published on the subject its own
fields imply, so an event cannot be smuggled onto another aggregate's subject.
A message that does not decode is never fatal to a reader: :func:`decode_or_bad` turns
it into a :class:`BadMessage` (kept for operators) and reading continues after it.
"""

from __future__ import annotations

import msgspec

from events.agent import AgentEvent
from events.errors import BadEventError
from events.issue import IssueEvent, issue_decoder
from events.task import TaskEvent

Event = TaskEvent | AgentEvent

encoder = msgspec.json.Encoder()
event_decoder = msgspec.json.Decoder(Event)

MAX_EVENT_BYTES = 256 * 1024  # large outputs go to the object store, not into events


def encode(event: msgspec.Struct) -> bytes:
    return encoder.encode(event)


def decode_checked(decoder: msgspec.json.Decoder, rel_subject: str, data: bytes):
    """Decode, refusing oversize payloads and payloads whose own subject is not the one
    they were published on; every failure is a :class:`BadEventError` with the reason."""
    if len(data) > MAX_EVENT_BYTES:
        raise BadEventError(f"oversize event: {len(data)} bytes > {MAX_EVENT_BYTES}")
    try:
        event = decoder.decode(data)
    except msgspec.DecodeError as e:
        raise BadEventError(str(e)) from None
    if event.rel_subject != rel_subject:
        raise BadEventError(f"subject mismatch: payload says {event.rel_subject}")
    return event


def decode_event(rel_subject: str, data: bytes) -> Event:
    """Decode a message of ``<NS>_EVENTS`` (a task or agent event)."""
    return decode_checked(event_decoder, rel_subject, data)


def decode_issue(rel_subject: str, data: bytes) -> IssueEvent:
    """Decode a message of ``<NS>_ISSUES`` (an issue fact)."""
    return decode_checked(issue_decoder, rel_subject, data)


class BadMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message on an event subject that could not be applied; kept for operators."""

    seq: int
    subject: str
    error: str
    preview: str = ""


def bad_message(seq: int, subject: str, error: str, data: bytes) -> BadMessage:
    return BadMessage(seq=seq, subject=subject, error=error,
                      preview=data[:200].decode("utf-8", errors="replace"))


def decode_or_bad(seq: int, subject: str, rel_subject: str, data: bytes) -> Event | BadMessage:
    """The event stored at ``seq`` on ``subject``, or why it is not one."""
    try:
        return decode_event(rel_subject, data)
    except BadEventError as e:
        return bad_message(seq, subject, str(e), data)
