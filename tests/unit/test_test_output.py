"""Parsing test-runner output (pytest, jest, go, cargo, unittest, mocha) into test counts."""

from __future__ import annotations

import pytest

from events.work import TestCounts
from infra.adapters.git.test_output import parse_test_counts


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("..F.s\n5 passed, 1 failed, 2 skipped in 0.1s\n", (5, 1, 0, 2, 8, "pytest")),
        ("=========== 1 error in 0.05s ===========", (0, 0, 1, 0, 1, "pytest")),
        ("==== 3 passed, 2 errors, 1 warning in 1.20s ====", (3, 0, 2, 0, 5, "pytest")),
        ("1 failed, 1 xfailed, 2 xpassed in 75.32s (0:01:15)", (2, 1, 0, 1, 4, "pytest")),
        ("no tests ran in 0.01s", (0, 0, 0, 0, 0, "pytest")),
        ("custom runner\n4 passed, 2 failed\n", (4, 2, 0, 0, 6, "pytest")),
        ("Test Suites: 1 failed, 1 passed, 2 total\nTests:       1 failed, 3 passed, 4 total\n",
         (3, 1, 0, 0, 4, "jest")),
        ("Tests:  1 skipped, 2 todo, 5 passed, 8 total", (5, 0, 0, 3, 8, "jest")),
        ("--- FAIL: TestA (0.00s)\n    --- FAIL: TestA/sub (0.00s)\nFAIL\n"
         "FAIL\texample.com/a\t0.003s\nok  \texample.com/b\t0.002s\n", (1, 1, 0, 0, 2, "go")),
        ("ok  \texample.com/a\t0.1s\nok  \texample.com/b\t(cached)\n?   \texample.com/c\t[no test files]\n",
         (2, 0, 0, 0, 2, "go")),
        ("FAIL\texample.com/a [build failed]\n", (0, 0, 1, 0, 1, "go")),
        ("running 3 tests\ntest result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n"
         "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n",
         (4, 2, 0, 1, 7, "cargo")),
        ("Ran 6 tests in 0.002s\n\nFAILED (failures=1, errors=1, skipped=1)\n", (3, 1, 1, 1, 6, "unittest")),
        ("Ran 2 tests in 0.000s\n\nOK\n", (2, 0, 0, 0, 2, "unittest")),
        ("  3 passing (12ms)\n  1 failing\n", (3, 1, 0, 0, 4, "mocha")),
        ("\x1b[32m2 passed\x1b[0m in 0.01s", (2, 0, 0, 0, 2, "pytest")),
    ],
)
def test_parse_test_counts(output: str, expected: tuple) -> None:
    c = parse_test_counts(output)
    assert (c.passed, c.failed, c.errors, c.skipped, c.total, c.framework) == expected


def test_unknown_output_uses_the_exit_code() -> None:
    assert parse_test_counts("all good", exit_code=0) == TestCounts()
    failed = parse_test_counts("Segmentation fault", exit_code=139)
    assert failed.failed == 1 and failed.total == 0 and failed.framework == "unknown" and not failed.ok
    assert parse_test_counts("5 passed, 1 failed in 0.2s").summary() == "5 passed, 1 failed"
