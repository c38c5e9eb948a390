"""Test counts from a test runner's output.

The pass/fail verdict is the exit code; the counts are what a human reads on the task
board ("3 passed, 1 failed") and what the events carry. Recognised summaries: pytest
(also the bare ``N passed, N failed`` line), unittest, jest, mocha, ``go test`` and
``cargo test``. Anything else yields zero counts with ``framework="unknown"``.

Convention for the unknown case: ``total == 0`` and ``failed == 1`` when the exit code
says the run failed, so ``failed > 0`` is always a reliable failure signal.
"""

from __future__ import annotations

import re

from events.work import TestCounts


def _counts(
    framework: str, passed: int = 0, failed: int = 0, errors: int = 0, skipped: int = 0
) -> TestCounts:
    return TestCounts(passed=passed, failed=failed, errors=errors, skipped=skipped,
                      total=passed + failed + errors + skipped, framework=framework)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PAIR = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)\b")
_PYTEST_LINE = re.compile(r"^=*\s*(?:\d+ \w+(?:, )?)+.* in [\d.]+s(?: \([^)]*\))?\s*=*$")
_PLAIN_LINE = re.compile(r"^=*\s*\d+ (?:passed|failed|errors?|skipped)\b[\d\w ,;]*?=*$")
_NO_TESTS = re.compile(r"^=*\s*no tests ran in [\d.]+s\s*=*$")
_JEST = re.compile(r"^Tests:\s+(.*\d+ total)")
_CARGO = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored")
_GO_OK = re.compile(r"^ok\s+\S+\s+(?:[\d.]+s|\(cached\))")
_GO_FAIL_PKG = re.compile(r"^FAIL\s+\S+\s+(?:[\d.]+s|\[(?:build|setup) failed\])")
_MOCHA = re.compile(r"^\s*(\d+) (passing|failing|pending)\b")
_UNITTEST_RAN = re.compile(r"^Ran (\d+) tests? in [\d.]+s")
_UNITTEST_TAIL = re.compile(r"^(OK|FAILED)\b(?: \((.*)\))?")


def _word_counts(text: str, pattern: re.Pattern[str] = _PAIR) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, word in pattern.findall(text):
        out[word] = out.get(word, 0) + int(n)
    return out


def _pytest(lines: list[str]) -> TestCounts | None:
    for line in reversed(lines):
        s = line.strip()
        if _NO_TESTS.match(s):
            return _counts("pytest")
        if _PYTEST_LINE.match(s) or _PLAIN_LINE.match(s):
            w = _word_counts(s)
            if not w.keys() & {"passed", "failed", "error", "errors", "skipped", "xfailed", "xpassed"}:
                continue
            return _counts("pytest", passed=w.get("passed", 0) + w.get("xpassed", 0),
                           failed=w.get("failed", 0), errors=w.get("error", 0) + w.get("errors", 0),
                           skipped=w.get("skipped", 0) + w.get("xfailed", 0))
    return None


def _jest(lines: list[str]) -> TestCounts | None:
    for line in reversed(lines):
        m = _JEST.match(line.strip())
        if m:
            w = _word_counts(m.group(1), re.compile(r"(\d+) (passed|failed|skipped|todo|pending|total)"))
            return _counts("jest", passed=w.get("passed", 0), failed=w.get("failed", 0),
                           skipped=w.get("skipped", 0) + w.get("todo", 0) + w.get("pending", 0))
    return None


def _cargo(lines: list[str]) -> TestCounts | None:
    found = [m for m in (_CARGO.match(line.strip()) for line in lines) if m]
    if not found:
        return None
    return _counts("cargo", passed=sum(int(m[1]) for m in found), failed=sum(int(m[2]) for m in found),
                   skipped=sum(int(m[3]) for m in found))


def _go(lines: list[str]) -> TestCounts | None:
    # top-level results only: an indented "--- FAIL" is a subtest, already counted by its parent
    passes = sum(line.startswith("--- PASS") for line in lines)
    fails = sum(line.startswith("--- FAIL") for line in lines)
    skips = sum(line.startswith("--- SKIP") for line in lines)
    ok_pkgs = sum(bool(_GO_OK.match(line)) for line in lines)
    broken = [line for line in lines if _GO_FAIL_PKG.match(line)]
    if not (passes or fails or skips or ok_pkgs or broken):
        return None
    build_errors = sum("failed]" in line for line in broken)
    # without -v go prints one "ok" per passing package rather than per test
    return _counts("go", passed=passes or ok_pkgs, failed=fails, errors=build_errors, skipped=skips)


def _mocha(lines: list[str]) -> TestCounts | None:
    w: dict[str, int] = {}
    for line in lines:
        m = _MOCHA.match(line)
        if m:
            w[m[2]] = int(m[1])
    if "passing" not in w and "failing" not in w:
        return None
    return _counts("mocha", passed=w.get("passing", 0), failed=w.get("failing", 0),
                   skipped=w.get("pending", 0))


def _unittest(lines: list[str]) -> TestCounts | None:
    for i in range(len(lines) - 1, -1, -1):
        ran = _UNITTEST_RAN.match(lines[i].strip())
        if not ran:
            continue
        for tail in lines[i + 1:i + 4]:
            m = _UNITTEST_TAIL.match(tail.strip())
            if m:
                detail = dict((k.strip(), int(v)) for k, v in re.findall(r"([a-z ]+)=(\d+)", m[2] or ""))
                failed, errors = detail.get("failures", 0), detail.get("errors", 0)
                skipped = detail.get("skipped", 0) + detail.get("expected failures", 0)
                return _counts("unittest", passed=max(0, int(ran[1]) - failed - errors - skipped),
                               failed=failed, errors=errors, skipped=skipped)
    return None


def parse_test_counts(output: str, exit_code: int | None = None) -> TestCounts:
    """Counts from the last summary the runner printed (outputs may be truncated in the
    middle, never at the end, so the summary is there)."""
    lines = _ANSI.sub("", output).splitlines()
    for parser in (_cargo, _jest, _pytest, _unittest, _mocha, _go):
        counts = parser(lines)
        if counts is not None:
            return counts
    return TestCounts(failed=1 if exit_code not in (None, 0) else 0)
