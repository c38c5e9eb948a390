"""A pull request's checks, and what a failing set of them means. Pure.

A *check* is one CI job's result on one commit (GitHub: a check run; the local forge:
the repository's ``.ccc/test-command``). The forge reports a commit's checks when they
have all finished (:class:`events.issue.IssueChecksCompleted`); the task state machine
records them (``task.checks_passed`` / ``task.checks_failed``) and :func:`classify`
says why a failing set failed, which decides what happens next:

``action_required``  a workflow waits for a maintainer's approval (GitHub asks for it
                     on first-time contributors' and bots' pull requests): a human is
                     needed, nothing we run can help.
``infrastructure``   the job never got to run the tests (runner lost, cancelled, a
                     start-up failure, a timeout before the tests began): re-run, a few
                     times at most.
``base``             the same check fails on the base commit too: the base branch is
                     red, not the change; a human is needed.
``flaky``            the check passed on the base commit and nothing in its log points
                     at the change: re-run once; passing on the re-run proves it flaky.
``change``           caused by the change (its log names a file the change touched, or
                     it failed again on the re-run): a fix attempt on the same branch,
                     with the failing log as guidance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

Conclusion = str  # GitHub's words: success, failure, neutral, cancelled, skipped, timed_out,
#                   action_required, startup_failure, stale
PASSING: frozenset[str] = frozenset({"success", "neutral", "skipped"})
NOT_RUN: frozenset[str] = frozenset({"cancelled", "startup_failure", "stale"})
Classification = Literal["change", "flaky", "infrastructure", "base", "action_required"]
CLASSIFICATIONS: tuple[str, ...] = ("change", "flaky", "infrastructure", "base", "action_required")

MAX_INFRA_RERUNS = 2  # per pushed commit
MAX_FLAKY_RERUNS = 1
LOG_TAIL_CHARS = 4000  # what a fix attempt is shown of a failing log

# what a runner says when it, not the tests, failed (GitHub Actions' own messages)
_RUNNER_LOST = re.compile(
    r"runner has received a shutdown signal|lost communication with the server|"
    r"the operation was canceled|no space left on device|"
    r"the hosted runner encountered an error|job was not started|"
    r"could not resolve host|connection reset by peer|ccc-ci: runner lost",
    re.IGNORECASE,
)


# a runner's line for a test that passed (unittest -v, pytest -v, go test -v, cargo test)
_PASSING_LINE = re.compile(r"\.\.\. ok\s*$|\bPASSED\b|^\s*(?:--- PASS|ok)\b|\btest \S+ \.\.\. ok\b")


class CheckRun(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True):
    """One check's result on one commit."""

    name: str
    conclusion: Conclusion
    url: str = ""
    log_ref: str = ""  # a masked tail of the log, in the artifacts store
    log_tail: str = ""  # its last lines, masked, bounded (:data:`LOG_TAIL_CHARS`)
    started: bool = True  # False: the job ended before its tests ran (no test output)
    run_id: int | None = None  # the forge's id of the run/job, to re-run it
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return self.conclusion in PASSING


class Verdict(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    classification: Classification
    reason: str


def failing(checks: Iterable[CheckRun]) -> list[CheckRun]:
    return [c for c in checks if not c.passed]


def infrastructure_failure(check: CheckRun) -> bool:
    return (check.conclusion in NOT_RUN or not check.started
            or bool(_RUNNER_LOST.search(check.log_tail)))


def names_a_changed_file(check: CheckRun, files_changed: Iterable[str]) -> str:
    """The first changed file (or its module name) the check's log mentions, or "".

    The file's name counts where it stands as a name of its own, or ends another one
    after a separator (``test_calc.py`` names ``calc.py``: the test of the changed
    module), but not inside a longer word (``data.py`` does not name ``a.py``). Lines
    that report a *passing* test (``test_x (test_calc.T.test_x) ... ok``, ``PASSED``)
    are not evidence against the change and are left out."""
    log = "\n".join(line for line in check.log_tail.splitlines() if not _PASSING_LINE.search(line))
    for path in files_changed:
        stem = path.rstrip("/").rsplit("/", 1)[-1]
        if not stem:
            continue
        module = stem.rsplit(".", 1)[0]
        if (re.search(rf"(?<![A-Za-z0-9]){re.escape(stem)}(?!\w)", log)  # (the path too)
                or (len(module) > 3 and re.search(rf"\b{re.escape(module)}\b", log))):
            return path
    return ""


def classify(
    checks: Iterable[CheckRun],
    *,
    base: Mapping[str, Conclusion] | None = None,
    files_changed: Iterable[str] = (),
    reruns: int = 0,
) -> Verdict:
    """Why a commit's failing checks failed. ``base``: the same checks' conclusions on
    the base commit, where known; ``reruns``: how often this commit's checks were
    already re-run."""
    failed = failing(checks)
    if not failed:
        raise ValueError("classify: no failing check")
    base = base or {}
    names = ", ".join(sorted(c.name for c in failed))
    waiting = [c.name for c in failed if c.conclusion == "action_required"]
    if waiting:
        return Verdict(classification="action_required",
                       reason=f"{', '.join(sorted(waiting))} waits for a maintainer to approve the "
                              "workflow run (first-time contributors' and bots' runs need approval)")
    if all(infrastructure_failure(c) for c in failed):
        why = "; ".join(f"{c.name}: {c.conclusion}" + ("" if c.started else ", tests never started")
                        for c in sorted(failed, key=lambda c: c.name))
        return Verdict(classification="infrastructure", reason=f"the CI infrastructure failed ({why})")
    real = [c for c in failed if not infrastructure_failure(c)]
    red_base = sorted(c.name for c in real if base.get(c.name, "") and base[c.name] not in PASSING)
    if red_base and len(red_base) == len(real):
        return Verdict(classification="base",
                       reason=f"{', '.join(red_base)} fails on the base commit too: the base branch is red")
    files = tuple(files_changed)
    for c in real:
        if path := names_a_changed_file(c, files):
            return Verdict(classification="change",
                           reason=f"{c.name} failed ({c.conclusion}) and its log names {path}, "
                                  "which the change touches")
    if reruns >= MAX_FLAKY_RERUNS:
        return Verdict(classification="change",
                       reason=f"{names} failed again after a re-run: caused by the change")
    passed_on_base = sorted(c.name for c in real if base.get(c.name, "") in PASSING)
    if passed_on_base:
        return Verdict(classification="flaky",
                       reason=f"{', '.join(passed_on_base)} passed on the base commit and its log names "
                              "nothing the change touches: possibly flaky, re-run once")
    return Verdict(classification="flaky",
                   reason=f"{names} failed and its log names nothing the change touches: re-run once "
                          "to tell a flaky check from a real failure")


def guidance_for(checks: Iterable[CheckRun], verdict: Verdict, fix: int, max_fixes: int) -> str:
    """What a fix attempt is told: which checks failed, why we think so, and the tail of
    each failing log (already masked). Framed as data by the coder's prompt builder."""
    parts = [f"CI fix {fix} of {max_fixes}: the pull request's checks failed ({verdict.reason}).",
             "Fix the code on this branch so that they pass. The failing checks' logs end with:"]
    for c in failing(checks):
        parts.append(f"--- {c.name} ({c.conclusion}) ---\n{c.log_tail[-LOG_TAIL_CHARS:]}")
    return "\n\n".join(parts)
