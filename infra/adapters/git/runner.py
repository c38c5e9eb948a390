"""Running one workspace command: :class:`CommandResult` (what it did), the
subprocess protocol that collects its output (a bounded head and tail in memory, up
to a limit in the log file) and the kill of its process group.
:meth:`infra.workspace.Workspace.run` drives them."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import msgspec


class CommandResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a command did. ``output`` is stdout+stderr interleaved, truncated in the
    middle (the head shows what started, the tail holds the summary a test runner
    prints last); the full output is in ``log_path``."""

    command: str
    exit_code: int
    output: str
    duration: float
    timed_out: bool = False
    log_path: str | None = None
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class ExitWatch(asyncio.SubprocessProtocol):
    """A subprocess protocol that tells the child's exit (``exited``) apart from its
    pipes closing (``closed``). A protocol rather than ``Process``: in Python 3.11
    ``Process.wait()`` also waits for every holder of the pipe, e.g. a background
    grandchild, which is exactly the process we want to kill, not wait for."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Collector(ExitWatch):
    """Receives the child's output: keeps a bounded head and tail in memory and writes
    up to ``log_limit`` bytes to the log file."""

    def __init__(self, head_limit: int, tail_limit: int, log_file: Any, log_limit: int) -> None:
        super().__init__()
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self._head_limit, self._tail_limit = head_limit, tail_limit
        self._log, self._log_limit, self._logged = log_file, log_limit, 0

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.total += len(data)
        if self._log is not None and self._logged < self._log_limit:
            chunk = data[: self._log_limit - self._logged]
            self._log.write(chunk)
            self._logged += len(chunk)
        room = self._head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self._tail_limit > 0:
            self.tail += data
            if len(self.tail) > self._tail_limit:
                del self.tail[: len(self.tail) - self._tail_limit]

    def text(self) -> str:
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        marker = f"\n[... {cut} bytes of output truncated ({self.total} total) ...]\n"
        return self.head.decode("utf-8", "replace") + marker + self.tail.decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
