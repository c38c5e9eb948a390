"""A pull-request policy: refuse a change that touches a protected path (CI workflows by
default — an agent that makes CI pass by editing CI is the classic way around it).

Option: ``CCC_PLUGIN_EXAMPLE_PROTECTED_PATHS_PATHS``, comma-separated globs (``**`` any
depth, ``*`` within one directory), default ``.github/workflows/**``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from actors.plugins import ALLOW, Allow, Veto
from events.task_state import TaskState


def glob_re(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


class ProtectedPaths:
    def __init__(self, options: Mapping[str, str]) -> None:
        self.patterns = [p.strip().lstrip("/") for p in options.get("paths", ".github/workflows/**").split(",")
                         if p.strip()]
        if not self.patterns:
            raise ValueError("CCC_PLUGIN_EXAMPLE_PROTECTED_PATHS_PATHS names no path")
        self._res = [glob_re(p) for p in self.patterns]

    def pull_request(self, task: TaskState, files: tuple[str, ...], draft: bool) -> Allow | Veto:
        touched = [f for f in files if any(r.match(f) for r in self._res)]
        if touched:
            shown = ", ".join(touched[:5]) + (f" +{len(touched) - 5} more" if len(touched) > 5 else "")
            return Veto(f"touches protected paths ({', '.join(self.patterns)}): {shown}")
        return ALLOW
