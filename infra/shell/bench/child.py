"""A bench's helper process: ``python -m infra.shell.bench.<module> <args>``, run from
the directory holding this package (so the child imports this very code), its stderr
appended to a log file whose tail every error quotes.

The protocol is lines: the child prints ``ready`` (optionally followed by words, e.g.
the port it serves) once started, then answers each command line on stdin with one JSON
line; ``stop`` makes it answer with its last figures and exit. What a bench measures of
the child (its CPU, its memory) is read through :attr:`Child.pid`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[3]


class Child:
    """One helper process of a bench (see the module docstring)."""

    def __init__(self, module: str, args: list[str], log_path: Path, *, what: str | None = None,
                 start_timeout: float = 120.0, answer_timeout: float = 120.0) -> None:
        self.module, self.args, self.log_path = module, args, log_path
        self.what = what or f"{module.rsplit('.', 1)[-1]} {args[0] if args else ''}".strip()
        self.start_timeout, self.answer_timeout = start_timeout, answer_timeout
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> list[str]:
        """Start the child and wait for its ``ready`` line; returns the words after it."""
        err = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, *self.args, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=err, cwd=PACKAGE_ROOT)
        finally:
            os.close(err)
        line = b""
        with contextlib.suppress(TimeoutError):
            line = await asyncio.wait_for(self.proc.stdout.readline(), self.start_timeout)
        words = line.decode(errors="replace").split()
        if not words or words[0] != "ready":
            await self.kill()
            raise RuntimeError(f"the {self.what} process did not start: {self.log_tail()}")
        return words[1:]

    def log_tail(self, n: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def ask(self, command: str) -> dict:
        """Send one command line; its JSON answer."""
        if self.proc is None:
            raise RuntimeError(f"the {self.what} process is not running")
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), self.answer_timeout)
        try:
            return json.loads(line)
        except ValueError:
            raise RuntimeError(f"the {self.what} process failed: {self.log_tail()}") from None

    async def stop(self) -> dict:
        """Ask the child to stop; its last figures. Killed if it does not stop cleanly."""
        if self.proc is None:
            return {}
        try:
            stats = await self.ask("stop")
            await asyncio.wait_for(self.proc.wait(), 60)
        except (TimeoutError, OSError) as e:
            raise RuntimeError(f"the {self.what} process did not stop cleanly ({type(e).__name__}): "
                               f"{self.log_tail()}") from None
        finally:
            await self.kill()
        return stats

    async def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


__all__ = ["PACKAGE_ROOT", "Child"]
