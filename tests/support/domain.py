"""given/when/then for the pure state machines, in the style of pyeventsourcing.

    given(history, machine=task_state).when(command).then([expected events])
    given(history, machine=agent_state).when(command).then_raises(IllegalTransition)

``machine`` is a module exposing ``decide``, ``evolve`` and ``fold``. ``then`` also
applies the decided events to the given state (so a decision the log would refuse
fails the test) and returns the new state for further assertions.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

import pytest

AT = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


class Given:
    def __init__(self, history: Sequence[Any], machine: ModuleType) -> None:
        self.history = list(history)
        self.machine = machine
        self.state = machine.fold(self.history)

    def when(self, command: Any) -> When:
        return When(self, command)


class When:
    def __init__(self, given: Given, command: Any) -> None:
        self.given = given
        self.command = command

    def decide(self) -> list[Any]:
        return self.given.machine.decide(self.given.state, self.command)

    def then(self, expected: Sequence[Any]) -> Any:
        """Assert the exact events decided; return the state after applying them."""
        events = self.decide()
        expected = list(expected)
        assert events == expected, f"decided:\n  {events!r}\nexpected:\n  {expected!r}"
        return self.given.machine.fold(events, self.given.state)

    def then_raises(self, error: type[BaseException], match: str | None = None) -> BaseException:
        with pytest.raises(error, match=match) as info:
            self.decide()
        return info.value


def given(history: Sequence[Any], *, machine: ModuleType) -> Given:
    return Given(history, machine)
