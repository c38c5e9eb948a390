"""Plugins as the actors see them: what a hook plugin may implement, the answers its
policy points give, and what each actor does with those answers — declared here, by
the consumers (DESIGN.md §2). Loading, enabling and isolating plugins is the adapter's
business (:mod:`infra.adapters.plugins`); the composition root hands its host to the
actors through :class:`PluginHost`, wrapped in :class:`PluginHooks`.

A hook plugin (entry point group ``ccc.hooks``) is a factory called with its options (a
read-only mapping of ``CCC_PLUGIN_<NAME>_<KEY>`` values, keys lower case) that returns
an object implementing any of the :data:`HOOKS` (sync or ``async def``); see
:class:`HookPlugin`. What it is given is read-only: the events and states are frozen
msgspec structs, the files a tuple.

The points, where they run, and what happens when the plugin cannot answer (it raises,
times out, returns something else, or its circuit is open after repeated failures) —
the cluster never stops for a plugin; each point has one rule:

* ``on_event`` — in the coordinator's process, off the hot path (a bounded queue per
  plugin): nothing to decide, that plugin just does not see the event (a full queue
  drops it); counted.
* ``assignment`` — in the coordinator, before each assignment: **fails open**, the
  assignment goes ahead. Scheduling is the cluster's liveness: a broken policy must not
  starve the queue.
* ``pull_request`` — in the agent, after the tests and before anything is pushed:
  **fails closed**, nothing is pushed and the round fails *retryable* (the next attempt
  asks again). A policy that could not say yes did not; and a push already publishes
  the change (on GitHub it runs the branch's workflows), so the question comes first.
* ``tracking_comment`` — in the forge sync (GitHub): **fails open**, the comment goes
  without that plugin's text.

A :class:`Veto` of an assignment keeps the task queued, asked again after the
coordinator's ``veto_recheck``; a :class:`Delay` keeps it queued for its seconds, after
which it goes to the next free agent without the plugins being asked again (the delay
was their answer; a task that leaves the queue and comes back is asked afresh); either
way the task's wait reason names the plugin (:func:`hold_words`). A veto of a pull
request fails the round, not retryable (it is for a human: the commit stays on the
workspace's branch and the diff in the artifacts), with the plugin's reason.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import msgspec

from events.agent_state import AgentState
from events.task_state import TaskState
from projections.waits import clock

HOOKS = ("on_event", "assignment", "pull_request", "tracking_comment")
MAX_REASON = 300  # characters of a plugin's reason kept (a wait reason, a failure reason)
MAX_NOTE = 2000  # characters of a plugin's text on a tracking comment
MAX_DELAY = 24 * 3600.0  # a Delay longer than a day is refused as a bad answer


# -- the answers a plugin gives -----------------------------------------------------------
class Allow(msgspec.Struct, frozen=True, tag="allow"):
    """Go ahead (``None`` means the same)."""


class Veto(msgspec.Struct, frozen=True, tag="veto"):
    """Not now (an assignment) or not at all (a pull request), because ``reason``."""

    reason: str


class Delay(msgspec.Struct, frozen=True, tag="delay"):
    """Not for ``seconds`` (an assignment only): the task stays queued meanwhile."""

    seconds: float
    reason: str = ""


ALLOW = Allow()
AssignmentDecision = Allow | Veto | Delay
PullRequestDecision = Allow | Veto


class HookPlugin(Protocol):
    """What a ``ccc.hooks`` plugin may implement: any of these methods (the others are
    simply not there), each plain or ``async def``. A plugin's code runs in its own
    thread with its own event loop, never on the cluster's: sync hooks of one plugin run
    one at a time, async ones concurrently. Every call has a timeout."""

    def on_event(self, seq: int, event: Any, state: TaskState | AgentState | None) -> None:
        """Every task and agent event the coordinator applies (``event``: a frozen
        ``events.task``/``events.agent`` struct at stream sequence ``seq``), with the
        aggregate's state after it. At most once, in log order per plugin, while the
        coordinator runs (not the history replayed at its start)."""
        ...

    def assignment(self, task: TaskState, agent: AgentState) -> Allow | Veto | Delay | None:
        """The scheduler is about to give ``task`` to ``agent``."""
        ...

    def pull_request(self, task: TaskState, files: tuple[str, ...], draft: bool) -> Allow | Veto | None:
        """The agent is about to push the change of ``task`` (``task.work``: a first
        implementation, a CI fix or a rebase round) and open (or update) its pull
        request: ``files`` are all the paths the pull request changes."""
        ...

    def tracking_comment(self, task: TaskState) -> str | None:
        """Text (Markdown, no HTML) added to the task's tracking comment on its issue."""
        ...


# -- what the actors need from the plugin host ---------------------------------------------
class Answer(Protocol):
    """One guarded call: ``value`` (what the check made of the plugin's return value)
    when ``fault`` is empty; otherwise why there is no answer (an error, a timeout, a bad
    value, the circuit open)."""

    plugin: str
    value: Any
    fault: str


class PluginHost(Protocol):
    """The enabled, loaded hook plugins of this process, each behind its guard (infra:
    ``infra.adapters.plugins.PluginHost``)."""

    def implementing(self, hook: str) -> tuple[str, ...]:
        """The plugins that implement ``hook``, in the order they were enabled."""
        ...

    async def call(self, plugin: str, hook: str, args: tuple, check: Callable[[Any], Any]) -> Answer:
        """Call ``plugin``'s ``hook`` with ``args`` in its own thread, within its policy
        timeout; ``check`` turns the return value into the answer (raising
        ``TypeError``/``ValueError`` for a bad one). Never raises for the plugin's sake."""
        ...

    def post(self, hook: str, args: tuple) -> None:
        """Queue ``hook(*args)`` for every plugin implementing it, without waiting (a
        full queue drops the call, counted)."""
        ...

    def report_holds(self, holds: Sequence[PluginHold]) -> None:
        """The queued tasks plugins hold back now (published with the health)."""
        ...


class Ruling(msgspec.Struct, frozen=True):
    """The plugins' combined answer at one policy point: ``plugin`` decided it (the
    first veto in the order they were enabled, or the longest delay); ``fault`` is set
    when the decision is the point's rule for a plugin that could not answer."""

    decision: Allow | Veto | Delay
    plugin: str = ""
    fault: str = ""


ALLOWED = Ruling(ALLOW)


class PluginHold(msgspec.Struct, frozen=True, kw_only=True):
    """A queued task a plugin's assignment policy holds back until ``until``: the
    words are its wait reason (:func:`hold_words`)."""

    task_id: str
    plugin: str
    kind: Literal["veto", "delay"]
    reason: str
    until: datetime
    words: str


def hold_words(plugin: str, decision: Veto | Delay, until: datetime, now: datetime) -> str:
    """``plugin freeze vetoes it: code freeze until Monday`` or ``plugin slow delays it
    until 12:00:05: quiet hours``."""
    if isinstance(decision, Delay):
        return f"plugin {plugin} delays it until {clock(until, now)}" + (
            f": {decision.reason}" if decision.reason else "")
    return f"plugin {plugin} vetoes it: {decision.reason}"


# -- checking what a plugin returned ---------------------------------------------------------
def _reason(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"reason must be a str, got {type(value).__name__}")
    text = re.sub(r"\s+", " ", value).strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def check_assignment(value: Any) -> Allow | Veto | Delay:
    """An assignment hook's return value, bounded: ``None`` is :data:`ALLOW`."""
    if value is None or isinstance(value, Allow):
        return ALLOW
    if isinstance(value, Veto):
        return Veto(_reason(value.reason) or "no reason given")
    if isinstance(value, Delay):
        seconds = value.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) \
                or not 0 < seconds <= MAX_DELAY:
            raise ValueError(f"Delay.seconds must be in (0, {MAX_DELAY:g}], got {seconds!r}")
        return Delay(float(seconds), _reason(value.reason))
    raise TypeError(f"expected Allow, Veto, Delay or None, got {type(value).__name__}")


def check_pull_request(value: Any) -> Allow | Veto:
    """A pull-request hook's return value: ``None`` is :data:`ALLOW`; a Delay is not an answer here."""
    if value is None or isinstance(value, Allow):
        return ALLOW
    if isinstance(value, Veto):
        return Veto(_reason(value.reason) or "no reason given")
    raise TypeError(f"expected Allow, Veto or None, got {type(value).__name__}")


def check_text(value: Any) -> str:
    """A tracking-comment hook's text (``None``: none), bounded."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"expected str or None, got {type(value).__name__}")
    text = value.strip()
    return text if len(text) <= MAX_NOTE else text[: MAX_NOTE - 1] + "…"


# -- the facade the actors hold -----------------------------------------------------------------
class PluginHooks:
    """The policy points as the actors call them, with each point's rule for a plugin
    that cannot answer (module docstring). Without a host (:data:`NO_PLUGINS`) every
    point allows, adds nothing and costs nothing."""

    def __init__(self, host: PluginHost | None = None) -> None:
        self.host = host

    def _names(self, hook: str) -> tuple[str, ...]:
        return self.host.implementing(hook) if self.host is not None else ()

    @property
    def decides_assignments(self) -> bool:
        return bool(self._names("assignment"))

    @property
    def asks_pull_requests(self) -> bool:
        return bool(self._names("pull_request"))

    @property
    def comments(self) -> bool:
        return bool(self._names("tracking_comment"))

    async def _ask(self, hook: str, args: tuple, check: Callable[[Any], Any]) -> list[Answer]:
        names = self._names(hook)
        if not names:
            return []
        assert self.host is not None
        return list(await asyncio.gather(*(self.host.call(n, hook, args, check) for n in names)))

    async def assignment(self, task: TaskState, agent: AgentState) -> Ruling:
        """Any veto wins (the first, in the order the plugins were enabled), then the
        longest delay; a plugin that cannot answer is left out (fails open)."""
        answers = await self._ask("assignment", (task, agent), check_assignment)
        for a in answers:
            if not a.fault and isinstance(a.value, Veto):
                return Ruling(a.value, a.plugin)
        delays = [a for a in answers if not a.fault and isinstance(a.value, Delay)]
        if delays:
            longest = max(delays, key=lambda a: a.value.seconds)
            return Ruling(longest.value, longest.plugin)
        return ALLOWED

    async def pull_request(self, task: TaskState, files: tuple[str, ...], draft: bool) -> Ruling:
        """A veto wins (not retryable); else a plugin that could not answer refuses in
        its stead (fails closed, retryable: ``fault`` is set)."""
        answers = await self._ask("pull_request", (task, tuple(files), draft), check_pull_request)
        for a in answers:
            if not a.fault and isinstance(a.value, Veto):
                return Ruling(a.value, a.plugin)
        for a in answers:
            if a.fault:
                return Ruling(Veto(f"could not be asked ({a.fault}); pull-request policies fail closed"),
                              a.plugin, a.fault)
        return ALLOWED

    async def tracking_comment(self, task: TaskState) -> tuple[tuple[str, str], ...]:
        """``(plugin, text)`` of each plugin that has something to add (fails open)."""
        answers = await self._ask("tracking_comment", (task,), check_text)
        return tuple((a.plugin, a.value) for a in answers if not a.fault and a.value)

    def observe(self, seq: int, event: Any, state: TaskState | AgentState | None) -> None:
        """Hand an applied event to the event hooks' queues (never waits)."""
        if self.host is not None and self._names("on_event"):
            self.host.post("on_event", (seq, event, state))

    def report_holds(self, holds: Sequence[PluginHold]) -> None:
        if self.host is not None:
            self.host.report_holds(holds)


NO_PLUGINS = PluginHooks()


def hold_for(task_id: str, ruling: Ruling, now: datetime, veto_recheck: float) -> PluginHold | None:
    """The hold an assignment ruling puts on a queued task (None: it may go)."""
    decision = ruling.decision
    if isinstance(decision, Delay):
        until, kind = now + timedelta(seconds=decision.seconds), "delay"
    elif isinstance(decision, Veto):
        until, kind = now + timedelta(seconds=veto_recheck), "veto"
    else:
        return None
    return PluginHold(task_id=task_id, plugin=ruling.plugin, kind=kind, reason=decision.reason, until=until,
                      words=hold_words(ruling.plugin, decision, until, now))
