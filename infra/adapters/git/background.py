"""What the workbench does off a task's path: one background thread per workbench.

Two chores belong there. Refilling a repository's warm checkouts
(:meth:`~infra.adapters.git.mirrors.Mirror.refill`) right after a task took one, so the
next task finds one ready; and deleting a finished task's checkout, which the agent's
``finally`` asks for on its event loop (a rename there is instant, removing 30,000 files
is not: it would stall the agent's heartbeats).

One thread, because both chores are disk-bound and the agent's tasks need the CPU more;
and a low-priority one (``nice`` :data:`CHORES_NICE`, Linux: niceness is per thread there,
and the git processes it starts, with their checkout workers, inherit it), so that the
refill (30,000 files written by a parallel checkout, a process per CPU) yields to the
running task's own git instead of competing with it: on two cores ``ccc bench task``
measured the overhead of a warm task on a 30,000-file repository at 0.54-0.65 s with it
against 0.82-1.06 s without (push 84-106 against 184-203 ms, commit 154-173 against
214-316 ms; four pairs of alternating runs, same load; nice 10 gave 0.66-0.78 s). A
refill that a busy machine slows down costs only warmth: a task that finds no warm
checkout builds its own. The thread exits after a while without work and starts again on the next chore, so a workbench
that is never used again (a test's) leaves no thread behind. A chore submitted under a
key already waiting is not queued twice (two tasks finishing at once need one refill).
A chore that fails is logged and forgotten: each is an optimisation whose absence the
task path copes with (no warm checkout: the task builds one; trash left behind: the
retention clean-up removes it). Nothing here survives the process, by design: a chore
cut short leaves only what the next clean-up sweeps.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Hashable
from typing import Any

import structlog

log = structlog.get_logger("ccc.workbench")

__all__ = ["Chores"]

_IDLE_EXIT = 30.0  # seconds without a chore before the thread ends
CHORES_NICE = 19  # the chores thread's niceness (and its git's): background only


def _lower_priority() -> None:
    """This thread (and what it starts) at :data:`CHORES_NICE`; Linux only (elsewhere
    ``setpriority`` takes a process, not a thread). Lowering one's priority needs no
    privilege; a failure leaves it as it was."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHORES_NICE)


class Chores:
    def __init__(self, name: str = "ccc-workbench-chores", *, idle_exit: float = _IDLE_EXIT) -> None:
        self.name = name
        self.idle_exit = idle_exit
        self._queue: queue.SimpleQueue[tuple[Hashable, Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._waiting: set[Hashable] = set()  # keys queued, not started yet
        self._busy = 0  # queued or running
        self._thread: threading.Thread | None = None

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` in the background; False when a chore with ``key`` is still
        waiting (it will do the same work)."""
        with self._cond:
            if key in self._waiting:
                return False
            self._waiting.add(key)
            self._busy += 1
            self._queue.put((key, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
        return True

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every chore submitted so far is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    @property
    def busy(self) -> int:
        return self._busy

    def _work(self) -> None:
        _lower_priority()
        while True:
            try:
                key, fn, args = self._queue.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._cond:
                    if self._queue.empty():  # (a submit between get and here started no thread)
                        self._thread = None
                        return
                continue
            with self._cond:
                self._waiting.discard(key)
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - a chore is an optimisation: log it, go on
                log.warning("workbench.chore_failed", chore=str(key), error=f"{type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
