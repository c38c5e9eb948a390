"""One error tree with one root.

Domain errors are decisions ("this transition is illegal") and are never retried.
Infrastructure errors are about the world (NATS down, a stale write) and carry
``retryable`` as data so the actor loop, not each handler, decides what to do.
The adapters hang their own families off this root (a forge's errors are
infrastructure errors), so a caller catches :class:`CccError` and reads ``retryable``.
"""

from __future__ import annotations


class CccError(Exception):
    """Root of every error this project raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class DomainError(CccError):
    """A command is not allowed in the aggregate's current state."""


class IllegalTransition(DomainError):
    def __init__(self, aggregate: str, state: str, action: str) -> None:
        super().__init__(f"{aggregate}: cannot {action} while {state}")
        self.aggregate = aggregate
        self.state = state
        self.action = action


class VersionMismatch(DomainError):
    """An event does not follow the aggregate's last version (a gap or a replay)."""


class InfrastructureError(CccError):
    retryable = True


class ConcurrencyConflict(InfrastructureError):
    """Someone appended to the aggregate since we loaded it: reload, re-decide."""


class StoreUnavailable(InfrastructureError):
    """NATS could not be reached or did not answer in time."""


class BadEventError(CccError):
    """A message on an event subject could not be decoded into a known event."""


class Refused(CccError):
    """A well-formed message the actor will not act on, by policy (an untrusted author,
    a repository it does not serve). Not an error in the message and not retryable: the
    actor loop parks it as a dead letter with this reason, so a refusal is on record
    and visible (``ccc dead-letters``) rather than silently dropped."""


class ConfigError(CccError):
    """Bad settings or command-line input; shown to the user as one line."""
