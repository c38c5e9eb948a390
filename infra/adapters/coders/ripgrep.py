"""The ``search`` tool's engine: ripgrep in a subprocess, bounded in time and output.

Why not Python's ``re`` in a thread: the pattern comes from the model, and a catastrophic
one (``(a+)+$`` over a long line of ``a``) backtracks for hours inside one C call that
holds the GIL. The event loop stops with it, heartbeats stop, and the coordinator
declares the agent offline and re-queues every task it holds. ripgrep's regex engine
runs in linear time (no backtracking: no look-around, no backreferences), and in another
process even a pathological search costs only that process, which is killed at the
deadline while the agent's loop keeps running.

What keeps it inside the workspace and bounded:

- ``--no-config`` (``RIPGREP_CONFIG_PATH`` could add ``--pre``, which runs a program per
  file), the pattern as ``--regexp=...`` and the path after ``--`` (neither can be read
  as an option), and the workspace's scrubbed environment;
- ``--no-follow`` and ``--one-file-system``: a symlink or a mount never leads out of the
  repository; ``--glob=!.git`` (and dependency/cache directories) while ``--hidden``
  still searches ``.github/`` and other dotfiles;
- ``--max-filesize``, ``--max-count`` per file, ``--max-columns`` per line (with a
  preview), regex and DFA size limits (a pattern like ``a{1000}{1000}`` is refused rather
  than compiled into gigabytes), and here: at most ``max_lines`` lines kept, counting
  stops at ``max_bytes`` read, and the process group is SIGKILLed at the deadline.

ripgrep is not run in the command sandbox: it only reads the repository, with the flags
above, and takes no program to run from the model. ``.gitignore`` is honoured as ripgrep
does, but not ignore files above the repository or the user's global one.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from events.errors import ConfigError

from infra.adapters.git.processes import die_with_parent, kill_group
from infra.adapters.git.runner import ExitWatch

EXECUTABLE = "rg"
MAX_COLUMNS = 300  # characters of a matching line shown (the rest is cut with a marker)
REGEX_SIZE_LIMIT = "10M"
_STDERR_KEEP = 4_000
_CHUNK = 65_536


class RipgrepMissing(ConfigError):
    """``rg`` is not on the agent's PATH: search refuses rather than fall back to ``re``
    (which is what could freeze the agent)."""


def find_ripgrep() -> str:
    """The ``rg`` executable on the agent's own PATH (looked up per call: an operator
    may install it while the agent runs)."""
    exe = shutil.which(EXECUTABLE)
    if exe is None:
        raise RipgrepMissing("search needs ripgrep ('rg') on the agent's PATH: install the 'ripgrep' "
                             "package (Debian/Ubuntu: apt-get install ripgrep; the setup script does)")
    return exe


def ripgrep_argv(
    exe: str, pattern: str, path: str = ".", *, glob: str | None = None, literal: bool = False,
    ignore_case: bool = False, max_count: int = 100, max_filesize: int = 5_000_000,
    exclude_dirs: Sequence[str] = (),
) -> list[str]:
    """The command line for one search, ``path`` relative to the repository (the cwd).
    With ``path`` ``"."`` no path is given, so results read ``src/x.py:3:...`` rather
    than ``./src/x.py:3:...``."""
    argv = [exe, "--no-config", "--no-messages", "--color=never", "--no-heading", "--with-filename",
            "--line-number", "--sort=path", "--hidden", "--no-follow", "--one-file-system",
            "--no-ignore-parent", "--no-ignore-global",
            f"--max-filesize={max_filesize}", f"--max-count={max(1, max_count)}",
            f"--max-columns={MAX_COLUMNS}", "--max-columns-preview",
            f"--regex-size-limit={REGEX_SIZE_LIMIT}", f"--dfa-size-limit={REGEX_SIZE_LIMIT}",
            "--ignore-case" if ignore_case else "--case-sensitive"]
    if literal:
        argv.append("--fixed-strings")
    if glob:
        argv.append(f"--glob={glob}")
    # after the model's glob: later globs win, so these exclusions cannot be undone by it
    argv += ["--glob=!.git", *(f"--glob=!{d}" for d in exclude_dirs)]
    argv.append(f"--regexp={pattern}")
    if path not in ("", "."):
        argv += ["--", path]
    return argv


@dataclass
class BoundedRun:
    """What a bounded run printed and how it ended."""

    lines: list[str] = field(default_factory=list)  # the first ``max_lines`` lines of stdout
    more_lines: int = 0  # further lines seen (a lower bound when not ``complete``)
    complete: bool = False  # stdout was read to its end
    timed_out: bool = False  # the deadline passed: the process group was killed
    exit_code: int | None = None
    stderr: str = ""  # its tail


class _Reader(ExitWatch):
    """Splits stdout into lines as it arrives (the first ``max_lines`` kept, the rest
    counted) until ``max_bytes``, then ignores it; keeps the tail of stderr. A protocol,
    not ``Process``: in Python 3.11 ``Process.wait()`` waits for the pipes to close too,
    which a reader that stopped reading at its cap never sees."""

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        super().__init__()
        self.run = BoundedRun()
        self.full: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._max_lines, self._max_bytes = max_lines, max_bytes
        self._partial = bytearray()
        self._total = 0
        self._stderr = bytearray()
        self._stopped = False

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._stderr += data
            del self._stderr[:-_STDERR_KEEP]
            return
        if self.full.done():
            return  # past the cap: read (so the child is not blocked) and dropped
        self._total += len(data)
        self._partial += data
        end = self._partial.rfind(b"\n")
        if end >= 0:
            for line in bytes(self._partial[:end]).split(b"\n"):
                self._keep(line)
            del self._partial[: end + 1]
        if self._total >= self._max_bytes:
            self.full.set_result(None)

    def stop(self) -> None:
        """Output from now on does not count: the child is about to be killed."""
        self._stopped = True

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1 and not self.full.done() and not self._stopped:
            if self._partial:
                self._keep(bytes(self._partial))
                self._partial.clear()
            self.run.complete = True

    def _keep(self, line: bytes) -> None:
        if len(self.run.lines) < self._max_lines:
            self.run.lines.append(line.decode("utf-8", "replace").rstrip("\r"))
        else:
            self.run.more_lines += 1

    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")


async def run_bounded(
    argv: Sequence[str], *, cwd: Path | str, env: Mapping[str, str], timeout: float,
    max_lines: int, max_bytes: int,
) -> BoundedRun:
    """Run ``argv`` in its own process group and read its stdout line by line: keep the
    first ``max_lines``, count the next ones, and stop (killing the group) once
    ``max_bytes`` have been read or ``timeout`` seconds have passed. Never waits for the
    process much longer than ``timeout``; on cancellation the group is killed too."""
    loop = asyncio.get_running_loop()
    transport, reader = await loop.subprocess_exec(
        lambda: _Reader(max_lines, max_bytes), *argv, cwd=str(cwd), env=dict(env),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=die_with_parent)
    pgid = transport.get_pid()  # session leader: pid == pgid
    try:
        done, _ = await asyncio.wait([reader.exited, reader.full], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        reader.run.timed_out = not done
        if reader.run.timed_out:
            reader.stop()  # a pipe closed by the kill is not the end of the output
        kill_group(pgid)  # at the deadline or the cap: everything; after an exit: leftovers
        await asyncio.wait([reader.exited], timeout=5.0)
        # output still in the pipe when the child exited arrives with the pipes' closing
        # (bounded: a process that left the group may hold them open)
        await asyncio.wait([reader.closed], timeout=1.0)
    except BaseException:
        kill_group(pgid)
        raise
    finally:
        transport.close()
    reader.run.exit_code = None if reader.run.timed_out or reader.full.done() else transport.get_returncode()
    reader.run.stderr = reader.stderr()
    return reader.run


__all__ = ["BoundedRun", "EXECUTABLE", "MAX_COLUMNS", "RipgrepMissing", "find_ripgrep", "ripgrep_argv",
           "run_bounded"]
