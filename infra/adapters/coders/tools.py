"""The coder's tools: what the model may do in a workspace, and their JSON schemas.

Every path goes through :meth:`Workspace.confine`; every failure (an escape, a missing
file, an ambiguous edit, bad arguments) becomes a :class:`ToolResult` with
``is_error=True`` that the model reads and can react to, never an exception out of the
agent loop. Outputs are bounded (``max_output`` characters) because every byte is sent
back to the model on every later turn.

No tool call can freeze the agent: its event loop also sends the heartbeats, and an
agent that misses them is declared offline and loses every task it holds. So every call
is bounded in time as well as output. ``search`` runs ripgrep in a subprocess killed at
its deadline (:mod:`.ripgrep`; never Python ``re`` on the model's pattern, which holds
the GIL while it backtracks); ``run_command`` goes through the workspace runner with a
timeout and an output cap; the file tools run in a thread, touch regular files only (a
FIFO would block a read or a write forever), read at most ``MAX_FILE_BYTES``, stop
listing after ``MAX_LIST_VISITS`` files, and are abandoned after ``tool_timeout``.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgspec

from events.errors import CccError

from infra.adapters.coders import ripgrep
from infra.adapters.git.workspace import Workspace, WorkspaceEscape

MAX_READ_LINES = 2_000
MAX_LINE_CHARS = 2_000
MAX_FILE_BYTES = 5_000_000  # larger files are not read or searched
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".tox"}
TOOL_TIMEOUT = 60.0  # seconds for one file tool or search (run_command has its own timeout)
MAX_LIST_VISITS = 200_000  # files list_files looks at before it stops and says so
MAX_LIST_LIMIT = 5_000  # entries list_files shows at most, whatever ``limit`` asks
MAX_SEARCH_LIMIT = 1_000  # matches search shows at most, whatever ``limit`` asks
MAX_PATTERN = 2_000  # characters of a search pattern or glob
SEARCH_MAX_BYTES = 4_000_000  # ripgrep output read before counting stops (it is killed then)
RUNNER_GRACE = 30.0  # seconds past a command's own timeout before run_command gives up on the runner


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
     "description": "Search file contents with ripgrep: prints path:line:text for each matching line "
                    "(sorted by path; files ignored by .gitignore, binary files and files over 5 MB are "
                    "skipped). The pattern is a ripgrep (Rust) regular expression, without look-around or "
                    "backreferences, unless literal is true.",
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


def _open_regular(path: Path, shown: str, flags: int) -> int:
    """A descriptor of ``path``, refused unless it is a regular file. ``O_NONBLOCK``: opening
    a FIFO (``mkfifo`` in a command) would otherwise block until someone opens the other
    end, i.e. forever; ``O_NOFOLLOW``: a symlink swapped in after :meth:`confine` is not
    followed."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        raise ToolError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise ToolError(f"{shown}: is a directory") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO nobody reads
            raise ToolError(f"{shown}: not a regular file") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ToolError(f"{shown}: {'is a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
    os.set_blocking(fd, True)
    return fd


def _read_text(path: Path, shown: str) -> str:
    fd = _open_regular(path, shown, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > MAX_FILE_BYTES:
            raise ToolError(f"{shown}: file too large ({size} bytes; the limit is {MAX_FILE_BYTES}): "
                            "use search, or run_command with head/tail/sed")
        data = f.read(MAX_FILE_BYTES + 1)  # the file may grow between fstat and read
    if len(data) > MAX_FILE_BYTES:
        raise ToolError(f"{shown}: file too large (over {MAX_FILE_BYTES} bytes)")
    if b"\0" in data[:8192]:
        raise ToolError(f"{shown}: binary file")
    return data.decode("utf-8", "replace")


def _write_text(path: Path, shown: str, text: str) -> None:
    fd = _open_regular(path, shown, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8"))


def _walk(ws: Workspace, root: Path, *, max_visits: int, deadline: float) -> tuple[list[Path], str]:
    """Files under ``root`` (or ``root`` itself), sorted, skipping .git and caches and
    never following a symlink out of the repository; and why the walk stopped early
    ("" when it did not): after ``max_visits`` files or at ``deadline`` (monotonic)."""
    if root.is_file():
        return [root], ""
    base = ws.repo_dir.resolve()
    found: list[Path] = []
    stopped = ""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                try:
                    inside = p.resolve().is_relative_to(base)
                except (RuntimeError, OSError):  # a symlink loop
                    inside = False
                if not inside:
                    continue
            found.append(p)
        if len(found) >= max_visits:
            stopped = f"stopped after {len(found)} files"
        elif time.monotonic() > deadline:
            stopped = f"stopped after {len(found)} files (time limit)"
        if stopped:
            break
    return sorted(found), stopped


def _glob_match(rel: str, pattern: str | None) -> bool:
    if not pattern:
        return True
    if "/" not in pattern:
        return fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern.replace("**/", ""))


# -- the tools -----------------------------------------------------------------------
def list_files(ws: Workspace, a: ListFiles, max_output: int, *, max_visits: int = MAX_LIST_VISITS,
               timeout: float = TOOL_TIMEOUT) -> str:
    root = ws.confine(a.dir or ".")
    if not root.is_dir():
        raise ToolError(f"{a.dir}: not a directory")
    if a.glob and len(a.glob) > MAX_PATTERN:
        raise ToolError(f"glob too long ({len(a.glob)} characters; the limit is {MAX_PATTERN})")
    # stop the walk a little before the caller gives up on this thread, so the model
    # gets the partial listing rather than a timeout
    walked, stopped = _walk(ws, root, max_visits=max_visits, deadline=time.monotonic() + timeout * 0.8)
    files = [r for r in (_rel(ws, p) for p in walked) if _glob_match(r, a.glob)]
    limit = min(max(1, a.limit), MAX_LIST_LIMIT)
    shown = files[:limit]
    text = "\n".join(shown) if shown else "(no files)"
    if len(files) > limit:
        text += f"\n[... {len(files) - limit} more files; narrow dir or glob ...]"
    if stopped:
        text += f"\n[listing {stopped}: the tree is too large to list whole; narrow dir or glob ...]"
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


async def search(ws: Workspace, a: Search, max_output: int, *, timeout: float = TOOL_TIMEOUT) -> str:
    if not a.pattern:
        raise ToolError("empty pattern")
    for what, value in (("pattern", a.pattern), ("glob", a.glob or "")):
        if len(value) > MAX_PATTERN:
            raise ToolError(f"{what} too long ({len(value)} characters; the limit is {MAX_PATTERN})")
    if "\n" in a.pattern or "\0" in a.pattern:
        raise ToolError("the pattern must be on one line (search matches line by line)")
    try:
        exe = ripgrep.find_ripgrep()
    except ripgrep.RipgrepMissing as exc:
        raise ToolError(str(exc)) from None
    root = ws.confine(a.path or ".")
    if not root.exists():
        raise ToolError(f"{a.path}: no such file or directory")
    if not (root.is_dir() or root.is_file()):  # a FIFO would block ripgrep until the deadline
        raise ToolError(f"{a.path}: not a regular file or directory")
    limit = min(max(1, a.limit), MAX_SEARCH_LIMIT)
    argv = ripgrep.ripgrep_argv(exe, a.pattern, _rel(ws, root), glob=a.glob, literal=a.literal,
                                ignore_case=a.ignore_case, max_count=limit + 1, max_filesize=MAX_FILE_BYTES,
                                exclude_dirs=sorted(SKIP_DIRS - {".git"}))
    run = await ripgrep.run_bounded(argv, cwd=ws.repo_dir.resolve(), env=ws.environment(), timeout=timeout,
                                    max_lines=limit, max_bytes=SEARCH_MAX_BYTES)
    if run.exit_code == 2 and not run.lines:  # ripgrep's "error" (exit 1 is "no match")
        if not run.stderr.strip():  # --no-messages leaves only "no file was searched" silent
            return "(no matches: no file was searched; check the path and the glob)"
        why = run.stderr.strip()[-2_000:].split("\nConsider enabling PCRE2")[0].strip()  # not an option here
        what = f"invalid regular expression {a.pattern!r}" if "regex parse error" in why else "search failed"
        raise ToolError(f"{what}: {why}\n(the pattern is a ripgrep/Rust regular expression: no "
                        "look-around, no backreferences; set literal=true to search plain text)")
    if run.timed_out and not run.lines:
        raise ToolError(f"search timed out after {timeout:.0f}s (ripgrep was stopped); narrow the path "
                        "or glob, or simplify the pattern")
    text = "\n".join(run.lines) if run.lines else "(no matches)"
    if run.more_lines or not run.complete:
        more = f"at least {run.more_lines} more" if run.more_lines else "more"
        text += f"\n[... {more} matches; narrow the pattern, path or glob ...]"
    if run.timed_out:
        text += f"\n[search stopped after {timeout:.0f}s: the results above are partial]"
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
    _write_text(path, a.path, text.replace(a.old_string, a.new_string, 1))
    line = text[: text.index(a.old_string)].count("\n") + 1
    return (f"edited {a.path} at line {line}: replaced {a.old_string.count(chr(10)) + 1} line(s) "
            f"with {a.new_string.count(chr(10)) + 1}")


def write_file(ws: Workspace, a: WriteFile) -> str:
    path = ws.confine(a.path)
    if path.is_dir():
        raise ToolError(f"{a.path}: is a directory")
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, a.path, a.content)
    return f"{'overwrote' if existed else 'created'} {a.path} ({len(a.content.encode())} bytes)"


async def run_command(ws: Workspace, a: RunCommand, *, timeout: float, max_output: int, log_name: str) -> str:
    if not a.command.strip():
        raise ToolError("empty command")
    limit = timeout if a.timeout is None else max(1.0, min(a.timeout, timeout))
    # the runner enforces both bounds (it kills the process group at the timeout); the
    # outer deadline only guards against a runner that cannot start or stop its child
    try:
        result = await asyncio.wait_for(
            ws.run(a.command, timeout=limit, max_output=max_output, log_name=log_name),
            limit + RUNNER_GRACE)
    except TimeoutError:
        raise ToolError(f"$ {a.command}\nnot finished {limit + RUNNER_GRACE:.0f}s after it started: "
                        "abandoned (process killed)") from None
    head = f"timed out after {limit:.0f}s (process killed)" if result.timed_out else f"exit code {result.exit_code}"
    return f"$ {a.command}\n{head} ({result.duration:.1f}s)\n{result.output}"


def _file_tool(ws: Workspace, args: msgspec.Struct, max_output: int, timeout: float) -> str:
    if isinstance(args, ListFiles):
        return list_files(ws, args, max_output, timeout=timeout)
    if isinstance(args, ReadFile):
        return read_file(ws, args, max_output)
    if isinstance(args, EditFile):
        return edit_file(ws, args)
    assert isinstance(args, WriteFile)
    return write_file(ws, args)


async def run_tool(
    ws: Workspace, name: str, raw: Any, *, command_timeout: float, max_output: int, log_name: str,
    tool_timeout: float = TOOL_TIMEOUT,
) -> ToolResult:
    """Run one tool call. Never raises for anything the model did wrong. ``run_command``
    is bounded by ``command_timeout``, every other tool by ``tool_timeout``."""
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
        elif isinstance(args, Search):
            text = await search(ws, args, max_output, timeout=tool_timeout)
        else:
            # file tools block on the filesystem: in a thread, so the event loop (and with
            # it the heartbeats) keeps running. They are bounded themselves; the deadline
            # is for a filesystem that stops answering (the thread is then left behind:
            # threads cannot be killed, but the agent goes on)
            text = await asyncio.wait_for(asyncio.to_thread(_file_tool, ws, args, max_output, tool_timeout),
                                          tool_timeout)
    except WorkspaceEscape as exc:
        return ToolResult(content=f"refused: {exc}", is_error=True)
    except ToolError as exc:
        return ToolResult(content=clip(str(exc), max_output), is_error=True)
    except TimeoutError:
        return ToolResult(content=f"{name} did not finish within {tool_timeout:.0f}s: abandoned", is_error=True)
    except OSError as exc:
        return ToolResult(content=f"{name} failed: {exc.strerror or exc}", is_error=True)
    except RuntimeError as exc:  # pathlib's "Symlink loop from ..." (a loop the model's commands made)
        return ToolResult(content=f"{name} failed: {exc}", is_error=True)
    return ToolResult(content=text)
