"""Folding a history into a state: the one loop behind every state machine's ``fold``.

A state machine is ``evolve(state, event) -> state``, starting from ``None`` (nothing
happened yet); a view of an aggregate is its events folded through ``evolve``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

S = TypeVar("S")
E = TypeVar("E")


def fold(evolve: Callable[[S | None, E], S], events: Iterable[E], state: S | None = None) -> S | None:
    """``state`` after ``events``, applied in order; ``state`` itself if there are none."""
    for event in events:
        state = evolve(state, event)
    return state
