"""Dead letters: messages an actor could not process, parked with the reason.

A poison message (not JSON, unknown type, wrong fields, oversize, a subject that does
not match its payload), one that failed every redelivery, or one a policy refused (an
untrusted author, a repository not served) is copied here, with its
original stream, sequence and subject, and then terminated on the consumer, so
processing of everything else continues. Nothing is lost: the original stays in its
stream too (the event log denies deletes), and the dead letter says why it was skipped.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    seq: int
    subject: str
    consumer: str
    reason: str  # "poison" | "gave_up" | "refused" (by policy: events.errors.Refused)
    error: str
    deliveries: int = 1
    at: datetime
    size: int = 0
    preview: str = ""  # the first bytes, as text

    @property
    def dedup_id(self) -> str:
        return f"dlq:{self.stream}:{self.seq}:{self.consumer}"


dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
