"""The coder's tools: what the model may do in a workspace, and their JSON schemas.

Every path goes through :meth:`Workspace.confine`; every failure (an escape, a missing
file, an ambiguous edit, bad arguments) becomes a :class:`ToolResult` with
``is_error=True`` that the model reads and can react to, never an exception out of the
agent loop. Outputs are bounded (``max_output`` characters) because every byte is sent
back to the model on every later turn.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
from pathlib import Path
from typing import Any

import msgspec

from events.errors import CccError

from infra.adapters.git.workspace import Workspace, WorkspaceEscape

MAX_READ_LINES = 2_000
MAX_LINE_CHARS = 2_000
MAX_FILE_BYTES = 5_000_000  # larger files are not read or searched
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".tox"}


class ToolError(CccError):
    """A tool failed in a way the model should see (and may fix): it becomes the tool's
    result, never an exception out of :func:`run_tool`."""


class ToolResult(msgspec.Struct, frozen=True, kw_only=True):
    content: str
    is_error: bool = False
    finished: bool = False  # the finish tool was called; content is the summary


# -- arguments -----------------------------------------------------------------------
class ListFiles(msgspec.Struct, kw_only=True):
    dir: str = "."
    glob: str | None = None
    limit: int = 500


class ReadFile(msgspec.Struct, kw_only=True):
    path: str
    start_line: int = 1
    end_line: int | None = None


class Search(msgspec.Struct, kw_only=True):
    pattern: str
    path: str = "."
    glob: str | None = None
    literal: bool = False
    ignore_case: bool = False
    limit: int = 100


class EditFile(msgspec.Struct, kw_only=True):
    path: str
    old_string: str
    new_string: str


class WriteFile(msgspec.Struct, kw_only=True):
    path: str
    content: str


class RunCommand(msgspec.Struct, kw_only=True):
    command: str
    timeout: float | None = None


class Finish(msgspec.Struct, kw_only=True):
    summary: str


ARGS: dict[str, type[msgspec.Struct]] = {
    "list_files": ListFiles, "read_file": ReadFile, "search": Search, "edit_file": EditFile,
    "write_file": WriteFile, "run_command": RunCommand, "finish": Finish,
}

_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


TOOL_SPECS: list[dict[str, Any]] = [
    {"name": "list_files",
     "description": "List files under a directory of the repository (recursive, sorted; .git and "
                    "dependency/cache directories skipped). Paths are relative to the repository root.",
     "input_schema": _schema({"dir": {**_STR, "description": "directory, default '.'"},
                              "glob": {**_STR, "description": "e.g. '*.py' (matches the file name) or "
                                                               "'src/**/*.ts' (matches the path)"},
                              "limit": {**_INT, "description": "max entries, default 500"}}, [])},
    {"name": "read_file",
     "description": f"Read a text file with numbered lines (at most {MAX_READ_LINES} lines per call; "
                    "use start_line/end_line to page through long files).",
     "input_schema": _schema({"path": _STR, "start_line": {**_INT, "description": "1-based, default 1"},
                              "end_line": {**_INT, "description": "inclusive"}}, ["path"])},
    {"name": "search",
     "description": "Search file contents like ripgrep: prints path:line:text for each match. The "
                    "pattern is a Python regular expression unless literal is true.",
     "input_schema": _schema({"pattern": _STR, "path": {**_STR, "description": "file or directory, default '.'"},
                              "glob": {**_STR, "description": "only files matching this glob"},
                              "literal": _BOOL, "ignore_case": _BOOL,
                              "limit": {**_INT, "description": "max matches, default 100"}}, ["pattern"])},
    {"name": "edit_file",
     "description": "Replace old_string by new_string in a file. old_string must match the file's text "
                    "exactly (whitespace included) and occur exactly once: add surrounding lines to make "
                    "it unique. Read the file first.",
     "input_schema": _schema({"path": _STR, "old_string": _STR, "new_string": _STR},
                             ["path", "old_string", "new_string"])},
    {"name": "write_file",
     "description": "Create or overwrite a file with the given content (parent directories are created).",
     "input_schema": _schema({"path": _STR, "content": _STR}, ["path", "content"])},
    {"name": "run_command",
     "description": "Run a shell command (sh -c) in the repository root, e.g. the test suite. No network "
                    "credentials, no interactive input; long output is truncated in the middle.",
     "input_schema": _schema({"command": _STR, "timeout": {"type": "number", "description": "seconds"}},
                             ["command"])},
    {"name": "finish",
     "description": "Call once the issue is resolved and the tests pass: a short summary of the change "
                    "for the pull request. Nothing runs after this.",
     "input_schema": _schema({"summary": _STR}, ["summary"])},
]


# -- helpers -------------------------------------------------------------------------
def clip(text: str, limit: int) -> str:
    """Keep head and tail of a long text, with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters truncated ({len(text)} total) ...]\n{text[-tail:] if tail else ''}"


def _rel(ws: Workspace, path: Path) -> str:
    return path.relative_to(ws.repo_dir.resolve()).as_posix() or "."


def _read_text(path: Path, shown: str) -> str:
    if not path.exists():
        raise ToolError(f"{shown}: no such file")
    if path.is_dir():
        raise ToolError(f"{shown}: is a directory")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ToolError(f"{shown}: file too large ({path.stat().st_size} bytes)")
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise ToolError(f"{shown}: binary file")
    return data.decode("utf-8", "replace")


def _walk(ws: Workspace, root: Path) -> list[Path]:
    """Files under ``root`` (or ``root`` itself), sorted, skipping .git and caches and
    never following a symlink out of the repository."""
    if root.is_file():
        return [root]
    base = ws.repo_dir.resolve()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and not p.resolve().is_relative_to(base):
                continue
            found.append(p)
    return sorted(found)


def _glob_match(rel: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    if "/" not in pattern:
        return fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern.replace("**/", ""))


# -- the tools -----------------------------------------------------------------------
def list_files(ws: Workspace, a: ListFiles, max_output: int) -> str:
    root = ws.confine(a.dir or ".")
    if not root.is_dir():
        raise ToolError(f"{a.dir}: not a directory")
    files = [r for r in (_rel(ws, p) for p in _walk(ws, root)) if _glob_match(r, a.glob)]
    limit = max(1, a.limit)
    shown = files[:limit]
    text = "\n".join(shown) if shown else "(no files)"
    if len(files) > limit:
        text += f"\n[... {len(files) - limit} more files; narrow dir or glob ...]"
    return clip(text, max_output)


def read_file(ws: Workspace, a: ReadFile, max_output: int) -> str:
    path = ws.confine(a.path)
    lines = _read_text(path, a.path).splitlines()
    start = max(1, a.start_line)
    end = len(lines) if a.end_line is None else min(len(lines), a.end_line)
    end = min(end, start + MAX_READ_LINES - 1)
    if not lines:
        return f"({a.path} is empty)"
    if start > len(lines):
        raise ToolError(f"{a.path} has {len(lines)} lines; start_line {start} is past the end")
    if end < start:
        raise ToolError(f"end_line {a.end_line} is before start_line {start}")
    width = len(str(end))
    out = []
    for n in range(start, end + 1):
        line = lines[n - 1]
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + " [... line truncated]"
        out.append(f"{n:>{width}}\t{line}")
    text = "\n".join(out)
    if start > 1 or end < len(lines):
        text += f"\n[lines {start}-{end} of {len(lines)}]"
    return clip(text, max_output)


def search(ws: Workspace, a: Search, max_output: int) -> str:
    flags = re.IGNORECASE if a.ignore_case else 0
    try:
        rx = re.compile(re.escape(a.pattern) if a.literal else a.pattern, flags)
    except re.error as exc:
        raise ToolError(f"invalid regular expression {a.pattern!r}: {exc} (set literal=true to search text)")
    root = ws.confine(a.path or ".")
    if not root.exists():
        raise ToolError(f"{a.path}: no such file or directory")
    limit, hits, out = max(1, a.limit), 0, []
    for path in _walk(ws, root):
        rel = _rel(ws, path)
        if not _glob_match(rel, a.glob):
            continue
        try:
            text = _read_text(path, rel)
        except (ToolError, OSError):
            continue  # binary, huge, unreadable: ripgrep skips these too
        for n, line in enumerate(text.splitlines(), 1):
            if rx.search(line):
                hits += 1
                if hits <= limit:
                    out.append(f"{rel}:{n}:{line[:300]}")
    if not out:
        return "(no matches)"
    text = "\n".join(out)
    if hits > limit:
        text += f"\n[... {hits - limit} more matches; narrow the pattern, path or glob ...]"
    return clip(text, max_output)


def edit_file(ws: Workspace, a: EditFile) -> str:
    path = ws.confine(a.path)
    if not a.old_string:
        raise ToolError("old_string is empty: use write_file to create a file")
    if a.old_string == a.new_string:
        raise ToolError("old_string and new_string are identical: nothing to change")
    text = _read_text(path, a.path)
    count = text.count(a.old_string)
    if count == 0:
        raise ToolError(f"old_string not found in {a.path}: it must match exactly, whitespace included "
                        "(read the file again)")
    if count > 1:
        raise ToolError(f"old_string occurs {count} times in {a.path}: it must occur exactly once; "
                        "include more surrounding lines")
    path.write_text(text.replace(a.old_string, a.new_string, 1), encoding="utf-8")
    line = text[: text.index(a.old_string)].count("\n") + 1
    return (f"edited {a.path} at line {line}: replaced {a.old_string.count(chr(10)) + 1} line(s) "
            f"with {a.new_string.count(chr(10)) + 1}")


def write_file(ws: Workspace, a: WriteFile) -> str:
    path = ws.confine(a.path)
    if path.is_dir():
        raise ToolError(f"{a.path}: is a directory")
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(a.content, encoding="utf-8")
    return f"{'overwrote' if existed else 'created'} {a.path} ({len(a.content.encode())} bytes)"


async def run_command(ws: Workspace, a: RunCommand, *, timeout: float, max_output: int, log_name: str) -> str:
    if not a.command.strip():
        raise ToolError("empty command")
    limit = timeout if a.timeout is None else max(1.0, min(a.timeout, timeout))
    result = await ws.run(a.command, timeout=limit, max_output=max_output, log_name=log_name)
    head = f"timed out after {limit:.0f}s (process killed)" if result.timed_out else f"exit code {result.exit_code}"
    return f"$ {a.command}\n{head} ({result.duration:.1f}s)\n{result.output}"


def _file_tool(ws: Workspace, args: msgspec.Struct, max_output: int) -> str:
    if isinstance(args, ListFiles):
        return list_files(ws, args, max_output)
    if isinstance(args, ReadFile):
        return read_file(ws, args, max_output)
    if isinstance(args, Search):
        return search(ws, args, max_output)
    if isinstance(args, EditFile):
        return edit_file(ws, args)
    assert isinstance(args, WriteFile)
    return write_file(ws, args)


async def run_tool(
    ws: Workspace, name: str, raw: Any, *, command_timeout: float, max_output: int, log_name: str
) -> ToolResult:
    """Run one tool call. Never raises for anything the model did wrong."""
    kind = ARGS.get(name)
    if kind is None:
        return ToolResult(content=f"unknown tool {name!r}; available: {', '.join(ARGS)}", is_error=True)
    try:
        args = msgspec.convert(raw if isinstance(raw, dict) else {}, kind)
    except msgspec.ValidationError as exc:
        return ToolResult(content=f"invalid arguments for {name}: {exc}", is_error=True)
    try:
        if isinstance(args, Finish):
            return ToolResult(content=args.summary, finished=True)
        if isinstance(args, RunCommand):
            text = await run_command(ws, args, timeout=command_timeout, max_output=max_output, log_name=log_name)
        else:
            # file tools block (a search walks the whole tree): keep the event loop, and
            # with it the agent's heartbeats, running
            text = await asyncio.to_thread(_file_tool, ws, args, max_output)
    except WorkspaceEscape as exc:
        return ToolResult(content=f"refused: {exc}", is_error=True)
    except ToolError as exc:
        return ToolResult(content=str(exc), is_error=True)
    except OSError as exc:
        return ToolResult(content=f"{name} failed: {exc.strerror or exc}", is_error=True)
    return ToolResult(content=text)
