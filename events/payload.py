"""Events whose payload is declared once, by a payload Struct, and laid out flat.

Some payloads have a life outside their event: the task's :class:`~events.task.Analysis`
(returned by the analyser, carried by the command, kept in the state) and the bodies of
the agent's work reports (:mod:`events.work_reports`, built by the pipeline). Their event
must carry the same fields, flat beside the envelope's, as its JSON always has. msgspec
has no "flatten", and a Struct cannot inherit fields from two bases that both declare
fields ("multiple bases have instance lay-out conflict"), so :func:`flat` makes the
event's base from the envelope base plus the payload's own field declarations: the fields
are written once, and the bytes on the wire are unchanged (``tests/unit/test_codec.py``
re-encodes the golden log).
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

E = TypeVar("E", bound=msgspec.Struct)


def flat(base: type[E], payload: type[msgspec.Struct]) -> type[E]:
    """``base`` extended by ``payload``'s fields (names, types, defaults), in its order."""
    fields = [
        (f.name, f.type, msgspec.field(default=f.default, default_factory=f.default_factory))
        for f in msgspec.structs.fields(payload)
    ]
    return msgspec.defstruct(f"{base.__name__}With{payload.__name__}", fields, bases=(base,),
                             module=base.__module__)


def payload_of(event: msgspec.Struct, payload: type[E]) -> E:
    """The payload value an event made by :func:`flat` carries."""
    return payload(**{name: getattr(event, name) for name in payload.__struct_fields__})
