"""The one backoff formula, for every retry in the project (task retries, redeliveries,
store appends across a leader election, artifact uploads): exponential and capped, so a
retry storm backs off and a long outage is still retried at a steady pace."""

from __future__ import annotations


def backoff(attempt: int, base: float, cap: float) -> float:
    """Delay after ``attempt`` tries (1 = after the first): base, 2*base, 4*base, …
    capped at ``cap``. Attempt 0 and below count as 1."""
    return min(cap, base * (2 ** max(0, attempt - 1)))
