"""One encoder and one typed decoder for everything on the event log, reused.

``decode_event`` also checks that the payload was published on the subject its own
fields imply, so an event cannot be smuggled onto another aggregate's subject.
A message that does not decode is never fatal to a reader: :func:`decode_or_bad` turns
it into a :class:`BadMessage` (kept for operators) and reading continues after it.

Old events are *upcast* on read: every typed decode here (and the store's replay, through
:data:`event_decoder`) first brings a payload written in an older format of its type up
to the current one, through the upcasters registered with :func:`register_upcaster`,
keyed by (type tag, format version it upgrades from). A payload names its format version
in ``schema_version``; absent means 1, the first format of every type. (It is not the
envelope's ``version``: that is the event's position in its aggregate.) A type whose
format changes either declares ``schema_version: int = msgspec.field(default_factory=
lambda: N)`` (a factory default is always written, even with ``omit_defaults``), so new
events say they are current, or has upcasters that leave a current payload as it is;
``tests/unit/test_contract.py`` checks which. The rules (add optional fields only, new
meanings get new types, old formats are upcast) are the README's "Event schemas and
evolution"; :mod:`events.contract` turns the types into the committed JSON Schemas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from events.agent import AgentEvent
from events.errors import BadEventError
from events.issue import IssueEvent, issue_decoder
from events.refs import artifact_tags, has_legacy_artifacts, upcast_artifacts
from events.task import TaskEvent

Event = TaskEvent | AgentEvent

encoder = msgspec.json.Encoder()

MAX_EVENT_BYTES = 256 * 1024  # large outputs go to the object store, not into events


def encode(event: msgspec.Struct) -> bytes:
    return encoder.encode(event)


# -- upcasting: old formats brought up to date on read ---------------------------------
SCHEMA_VERSION = "schema_version"
"""The payload field naming the format version of its type; absent means 1."""

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""One step: a payload (a JSON object, decoded but not typed) of format N in, the same
fact in format N + 1 out. Pure; it may raise to say the payload is not a fact of that type."""


class UpcastStep(msgspec.Struct, frozen=True):
    fn: Upcaster
    # a cheap look at the raw bytes: False when this payload needs no step (it is already
    # in the newer format): then the payload is not decoded twice. None: always needed.
    when: Callable[[bytes], bool] | None = None


class _Format(msgspec.Struct):
    type: str = ""
    schema_version: int = 1


_format_decoder = msgspec.json.Decoder(_Format)
_MARKER = f'"{SCHEMA_VERSION}"'.encode()


class Upcasters:
    """A registry of upcaster steps, keyed by (type tag, format version they upgrade
    from), and the typed decode that applies them. The process has one,
    :data:`UPCASTERS` (what every decoder here uses); a test may make its own."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, int], UpcastStep] = {}
        self.tags: set[str] = set()

    def register(self, type_tag: str, from_version: int, fn: Upcaster, *,
                 when: Callable[[bytes], bool] | None = None) -> None:
        """Read payloads of ``type_tag`` in format ``from_version`` through ``fn`` (which
        makes them format ``from_version + 1``). One step per (tag, version), never
        replaced: a format, once written, is read the same way for good."""
        if not type_tag or from_version < 1:
            raise ValueError(f"an upcaster needs a type tag and a format version >= 1, not "
                             f"{type_tag!r}, {from_version!r}")
        if (type_tag, from_version) in self.steps:
            raise ValueError(f"{type_tag} already has an upcaster from format {from_version}")
        self.steps[(type_tag, from_version)] = UpcastStep(fn, when)
        self.tags.add(type_tag)

    def format_version(self, type_tag: str) -> int:
        """The current format of ``type_tag``: 1, plus one per step from 1 on."""
        version = 1
        while (type_tag, version) in self.steps:
            version += 1
        return version

    def upcast(self, payload: dict[str, Any], data: bytes | None = None) -> dict[str, Any]:
        """``payload`` in its type's current format (itself if it is current). With the
        raw ``data`` it was decoded from, a step whose ``when`` finds nothing to do is
        skipped."""
        tag, version = payload.get("type"), payload.get(SCHEMA_VERSION, 1)
        start = version
        while (step := self.steps.get((tag, version))) is not None:
            if data is None or step.when is None or step.when(data):
                payload = step.fn(dict(payload))
            version += 1
        if version != start:
            payload = {**payload, SCHEMA_VERSION: version}
        return payload

    def needs_upcast(self, data: bytes, tag: str | None = None) -> bool:
        """Whether the payload ``data`` (of type ``tag``, if known) is in an older format
        than its type's current."""
        if tag is not None and _MARKER not in data and b"\\u" not in data:
            version = 1  # no marker, not even an escaped one: the first format
        else:
            try:
                f = _format_decoder.decode(data)
            except msgspec.DecodeError:
                return False
            tag, version = f.type, f.schema_version
        step = self.steps.get((tag, version))
        return step is not None and (step.when is None or step.when(data) or (tag, version + 1) in self.steps)

    def decode(self, decoder: msgspec.json.Decoder, data: bytes):
        """``decoder.decode(data)``, with a payload in an older format of its type upcast
        first. Fails as decoding fails (:class:`msgspec.DecodeError`), an upcaster's
        refusal included. With no step registered it is the plain decode."""
        if not self.tags:
            return decoder.decode(data)
        try:
            event = decoder.decode(data)
        except msgspec.DecodeError:
            if not self.needs_upcast(data):
                raise
            return self._decode_upcast(decoder, data)
        tag = event.__struct_config__.tag
        if tag in self.tags and self.needs_upcast(data, tag):
            return self._decode_upcast(decoder, data)
        return event

    def _decode_upcast(self, decoder: msgspec.json.Decoder, data: bytes):
        payload = msgspec.json.decode(data)
        try:
            payload = self.upcast(payload, data)
        except Exception as e:  # noqa: BLE001 - an upcaster's refusal is the payload's fault
            raise msgspec.ValidationError(f"cannot upcast {payload.get('type')!r} from format "
                                          f"{payload.get(SCHEMA_VERSION, 1)}: {e}") from None
        return decoder.decode(encoder.encode(payload))


UPCASTERS = Upcasters()
"""The process's upcasters: register the steps below, at import of this module."""
register_upcaster = UPCASTERS.register
format_version = UPCASTERS.format_version
upcast = UPCASTERS.upcast


def decode_upcast(decoder: msgspec.json.Decoder, data: bytes):
    """:meth:`Upcasters.decode` with the process's upcasters."""
    return UPCASTERS.decode(decoder, data)


class UpcastingDecoder:
    """A typed JSON decoder that upcasts older formats first (:meth:`Upcasters.decode`)."""

    def __init__(self, type_: Any, upcasters: Upcasters = UPCASTERS) -> None:
        self.type = type_
        self.inner = msgspec.json.Decoder(type_)
        self.upcasters = upcasters

    def decode(self, data: bytes):
        return self.upcasters.decode(self.inner, data)


# -- the upcasters of this project's old formats: -------------------------------------
# register_upcaster("<type tag>", <format it upgrades from>, <fn>[, when=<cheap byte check>])

# artifact references and digests (events.refs): "<bucket>/<name>" and "sha256:<hex>" in
# format 1, "<bucket> <name>" (the arguments of `nats object get`) and the object store's
# "SHA-256=<base64url>" since; a current payload is left as it is (and, by the byte check,
# not decoded twice)
for _tag in artifact_tags(Event, IssueEvent):
    register_upcaster(_tag, 1, upcast_artifacts, when=has_legacy_artifacts)


event_decoder = UpcastingDecoder(Event)
"""The decoder of ``<NS>_EVENTS`` (the store's replay uses it directly)."""


def decode_checked(decoder: msgspec.json.Decoder | UpcastingDecoder, rel_subject: str, data: bytes):
    """Decode (older formats upcast first), refusing oversize payloads and payloads whose
    own subject is not the one they were published on; every failure is a
    :class:`BadEventError` with the reason."""
    if len(data) > MAX_EVENT_BYTES:
        raise BadEventError(f"oversize event: {len(data)} bytes > {MAX_EVENT_BYTES}")
    try:
        event = decoder.decode(data) if isinstance(decoder, UpcastingDecoder) else decode_upcast(decoder, data)
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
