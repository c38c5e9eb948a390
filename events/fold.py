"""Folding a history into a state: the one loop behind every state machine's ``fold``.

A state machine is ``evolve(state, event) -> state``, starting from ``None`` (nothing
happened yet); a view of an aggregate is its events folded through ``evolve``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

S = TypeVar("S")
E = TypeVar("E")


def fold(
    evolve: Callable[[S | None, E], S],
    events: Iterable[E],
    state: S | None = None,
    *,
    skip: type[Exception] | tuple[type[Exception], ...] = (),
) -> S | None:
    """``state`` after ``events``, applied in order; ``state`` itself if there are none.

    ``skip``: an event whose ``evolve`` raises one of these is passed over, as the read
    model passes over what its state machine rejects (a forged or misplaced event on an
    aggregate's subject must not make the aggregate unreadable)."""
    for event in events:
        try:
            state = evolve(state, event)
        except skip:
            continue
    return state
