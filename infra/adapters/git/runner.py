"""Running one command in its own process group: :func:`run_command` starts it, collects
its output (a bounded head and tail in memory, up to a limit in the log file), kills
the group on timeout, on cancellation and after the command exits, and returns a
:class:`CommandResult`. :meth:`~infra.adapters.git.workspace.Workspace.run` decides
*what* may run and where (confined directory, scrubbed environment); this module
only runs it. :class:`ExitWatch` is shared with the Claude Code CLI coder."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from events.work import CommandResult

from infra.adapters.git.processes import die_with_parent, kill_group


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


async def run_command(
    argv: list[str],
    *,
    shown: str,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    log_path: Path | None = None,
    max_output: int = 200_000,
    log_limit: int = 50_000_000,
    preexec: Callable[[], None] = die_with_parent,
) -> CommandResult:
    """Run ``argv`` in ``cwd`` with exactly ``env``, in a new session (its own process
    group). On timeout the whole group is killed and ``timed_out`` is set; on
    cancellation the group is killed and ``CancelledError`` propagates. Never raises
    for a failing command, nor for one that cannot be started (exit code 127).
    ``preexec`` runs in the child before exec: it must include :func:`die_with_parent`
    (the sandbox's adds entering a cgroup)."""
    head = max_output // 2
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    log_file = open(log_path, "wb") if log_path else None  # noqa: SIM115 (closed below)
    try:
        try:
            transport, proto = await loop.subprocess_exec(
                lambda: _Collector(head, max_output - head, log_file, log_limit),
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
                preexec_fn=preexec,  # die_with_parent: a SIGKILLed agent must not leave commands running
            )
        except OSError as exc:  # not found, not executable: a result, not a crash
            message = f"cannot start {argv[0]!r}: {exc}"
            if log_file:
                log_file.write(message.encode())
            return CommandResult(command=shown, exit_code=127, output=message,
                                 duration=time.monotonic() - started,
                                 log_path=str(log_path) if log_path else None)
        pgid = transport.get_pid()  # session leader: pid == pgid
        try:
            done, _ = await asyncio.wait([proto.exited], timeout=timeout)
            timed_out = not done
            # On timeout: everything. After a normal exit: leftovers (background
            # jobs) that would otherwise outlive the command and hold the pipe.
            kill_group(pgid)
            await asyncio.wait([proto.exited], timeout=5.0)
            # Drain what is still buffered; a grandchild that escaped the group with
            # setsid() may keep the pipe open, so this wait is bounded.
            await asyncio.wait([proto.closed], timeout=2.0)
        except BaseException:
            kill_group(pgid)
            transport.close()
            raise
        transport.close()
        code = transport.get_returncode()
        if log_file:
            log_file.flush()
        return CommandResult(
            command=shown,
            exit_code=code if code is not None else -signal.SIGKILL,
            output=proto.text(),
            duration=round(time.monotonic() - started, 3),
            timed_out=timed_out,
            log_path=str(log_path) if log_path else None,
            output_bytes=proto.total,
        )
    finally:
        if log_file:
            log_file.close()
