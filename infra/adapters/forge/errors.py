"""The forge's errors, one family for every forge (local and GitHub).

They hang off :class:`~events.errors.InfrastructureError`: a forge is part of the world,
not a decision of an aggregate. Whether a retry can help is data (``retryable``), as
everywhere in :mod:`events.errors`: a refusal (bad input, unknown repository, missing
credentials, a merge conflict) is not retryable; a forge that cannot be reached, fails
or rate-limits us (:class:`ForgeUnavailable`) is.
"""

from __future__ import annotations

from events.errors import InfrastructureError


class ForgeError(InfrastructureError):
    """The forge cannot do what was asked (unknown repository or branch, bad input, a
    refused request): retrying will not fix it, unless the raiser says otherwise."""

    retryable = False


class ForgeAuthError(ForgeError):
    """Bad or insufficient credentials (GitHub: 401/403)."""


class ForgeNotFound(ForgeError):
    """The repository, issue or pull request does not exist or is not visible (GitHub: 404)."""


class MergeConflict(ForgeError):
    """The branch does not merge cleanly into the default branch: a human, or another
    attempt on an updated base, has to resolve it."""

    def __init__(self, message: str, files: list[str]) -> None:
        super().__init__(message)
        self.files = files


class ForgeUnavailable(ForgeError):
    """The forge could not be reached, failed (5xx) or rate-limited us: retry later,
    not before ``retry_after`` seconds when the forge said so."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


__all__ = ["ForgeAuthError", "ForgeError", "ForgeNotFound", "ForgeUnavailable", "MergeConflict"]
