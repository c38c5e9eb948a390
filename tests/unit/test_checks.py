"""Why a pull request's checks failed (events/checks.py), pure: each classification,
the boundaries between them, and what a fix attempt is shown of the failing logs.

The classification decides what the task does next (test_pr_to_green.py): a fix round
(change), a re-run (flaky, infrastructure) or a human (base, action_required)."""

from __future__ import annotations

import msgspec
import pytest

from events.checks import (
    CLASSIFICATIONS, LOG_TAIL_CHARS, MAX_FLAKY_RERUNS, CheckRun, Verdict, classify, failing, guidance_for,
    names_a_changed_file,
)

OK = CheckRun(name="lint", conclusion="success")
CHANGED = ("src/shop/calc.py", "README.md")


def red(log: str = "", name: str = "test", conclusion: str = "failure", **kw) -> CheckRun:
    return CheckRun(name=name, conclusion=conclusion, log_tail=log, **kw)


def kind(*checks: CheckRun, **kw) -> str:
    kw.setdefault("files_changed", CHANGED)
    return classify(checks, **kw).classification


# -- one case per classification ------------------------------------------------------
def test_every_classification_has_a_case_and_a_reason():
    cases = {
        "change": classify([OK, red("FAILED tests/test_calc.py::test_add")], files_changed=CHANGED),
        "flaky": classify([OK, red("ReadTimeout in test_fetch")], base={"test": "success"},
                          files_changed=CHANGED),
        "infrastructure": classify([OK, red(conclusion="cancelled")], files_changed=CHANGED),
        "base": classify([OK, red("assert 1 == 2")], base={"test": "failure"}, files_changed=CHANGED),
        "action_required": classify([OK, red(conclusion="action_required", started=False)]),
    }
    assert set(cases) == set(CLASSIFICATIONS)
    for classification, verdict in cases.items():
        assert verdict.classification == classification and verdict.reason


def test_no_failing_check_is_not_a_failure_to_classify():
    passing = [OK, CheckRun(name="docs", conclusion="skipped"), CheckRun(name="cov", conclusion="neutral")]
    assert failing(passing) == [] and all(c.passed for c in passing)
    with pytest.raises(ValueError, match="no failing check"):
        classify(passing)
    with pytest.raises(ValueError, match="no failing check"):
        classify([])


# -- change: the log names what the change touched --------------------------------------
@pytest.mark.parametrize("log", [
    "FAILED src/shop/calc.py::add - TypeError",  # the path
    'File "/work/repo/src/shop/calc.py", line 3, in add',  # inside a longer path
    "calc.py:3: AssertionError",  # the file's name
    "FAILED tests/test_calc.py::test_add - assert 3 == 4",  # its test, named after it
    "ImportError: cannot import name 'add' from 'calc'",  # the module's name (longer than 3)
    "see README.md for the layout",  # any changed file, not only code
])
def test_a_log_naming_a_changed_file_is_the_change(log):
    verdict = classify([OK, red(log)], files_changed=CHANGED)
    assert verdict.classification == "change"
    assert "its log names" in verdict.reason and "which the change touches" in verdict.reason


@pytest.mark.parametrize(("log", "files"), [
    ("FAILED tests/test_data.py - data.py:9: KeyError", ("a.py",)),  # a.py inside data.py
    ("error in calculator.py", ("calc.py",)),  # the name inside a longer name
    ("the app crashed", ("app.py",)),  # a module name of 3 letters is too common a word
    ("FAILED tests/test_x.py", ("docs/",)),  # a directory names nothing by itself
    ("FAILED tests/test_x.py", ("",)),
])
def test_a_log_merely_containing_the_letters_names_nothing(log, files):
    assert names_a_changed_file(red(log), files) == ""
    assert kind(OK, red(log), files_changed=files, base={"test": "success"}) == "flaky"


def test_the_first_changed_file_named_is_reported():
    assert names_a_changed_file(red("README.md and calc.py"), CHANGED) == "src/shop/calc.py"
    assert "names README.md" in classify([red("see README.md")], files_changed=CHANGED).reason


# -- flaky and re-runs ---------------------------------------------------------------------
def test_passed_on_the_base_commit_and_naming_nothing_is_flaky_then_the_change_after_a_rerun():
    checks = [OK, red("ReadTimeout in test_fetch")]
    first = classify(checks, base={"test": "success"}, files_changed=CHANGED, reruns=0)
    assert first.classification == "flaky" and "passed on the base commit" in first.reason
    again = classify(checks, base={"test": "success"}, files_changed=CHANGED, reruns=MAX_FLAKY_RERUNS)
    assert again == Verdict(classification="change",
                            reason="test failed again after a re-run: caused by the change")
    assert kind(*checks, reruns=MAX_FLAKY_RERUNS + 3) == "change"


def test_unknown_base_and_naming_nothing_is_re_run_once_to_tell():
    verdict = classify([OK, red("segfault")], files_changed=CHANGED)  # no base conclusions known
    assert verdict.classification == "flaky" and "to tell a flaky check from a real failure" in verdict.reason
    assert kind(OK, red("segfault"), base={"other": "failure"}) == "flaky"  # other checks' base: unknown


@pytest.mark.parametrize("on_base", ["success", "neutral", "skipped"])
def test_every_passing_conclusion_on_the_base_counts_as_green(on_base):
    assert kind(OK, red("boom"), base={"test": on_base}) == "flaky"


# -- base: red on the base commit too ---------------------------------------------------
@pytest.mark.parametrize("on_base", ["failure", "timed_out", "cancelled"])
def test_failing_on_the_base_commit_too_is_the_base(on_base):
    verdict = classify([OK, red("assert 1 == 2")], base={"test": on_base}, files_changed=CHANGED)
    assert verdict == Verdict(classification="base",
                              reason="test fails on the base commit too: the base branch is red")


def test_the_base_is_red_only_when_every_real_failure_is_red_there():
    both = [red("boom", name="unit"), red("boom", name="e2e")]
    assert kind(*both, base={"unit": "failure", "e2e": "failure"}) == "base"
    assert "e2e, unit fails" in classify(both, base={"unit": "failure", "e2e": "failure"}).reason
    assert kind(*both, base={"unit": "failure", "e2e": "success"}) == "flaky"  # e2e is not the base's
    assert kind(*both, base={"unit": "failure"}) == "flaky"  # e2e's base unknown
    # a red base wins over a log naming a changed file: the change cannot be blamed
    assert kind(red("calc.py:3: AssertionError"), base={"test": "failure"}) == "base"
    # ... but not for a check that is green on the base
    both = [red("boom", name="unit"), red("calc.py:3: AssertionError", name="e2e")]
    assert kind(*both, base={"unit": "failure", "e2e": "success"}) == "change"


# -- infrastructure --------------------------------------------------------------------
@pytest.mark.parametrize("check", [
    red(conclusion="cancelled"), red(conclusion="startup_failure"), red(conclusion="stale"),
    red(conclusion="timed_out", started=False),  # timed out before the tests began
    red(conclusion="failure", started=False),
    red("##[error]The runner has received a shutdown signal. This can happen when the runner service "
        "is stopped"),
    red("The self-hosted runner: r-1 lost communication with the server."),
    red("##[error]The operation was canceled."),
    red("System.IO.IOException: No space left on device"),
    red("The hosted runner encountered an error while running your job."),
    red("fatal: unable to access 'https://github.com/x/y/': Could not resolve host: github.com"),
    red("npm ERR! read ECONNRESET: connection reset by peer"),
    red("ccc-ci: runner lost (killed)"),
], ids=lambda c: c.conclusion + ":" + (c.log_tail[:30] or ("not started" if not c.started else "")))
def test_the_runner_failing_not_the_tests_is_infrastructure(check):
    verdict = classify([OK, check], base={"test": "failure"}, files_changed=CHANGED)  # even on a red base
    assert verdict.classification == "infrastructure" and "the CI infrastructure failed" in verdict.reason
    assert f"test: {check.conclusion}" in verdict.reason
    assert ("tests never started" in verdict.reason) == (not check.started)


def test_a_timeout_after_the_tests_began_is_a_real_failure():
    assert kind(red("calc.py: test_slow", conclusion="timed_out")) == "change"
    assert kind(red("test_slow", conclusion="timed_out"), base={"test": "success"}) == "flaky"


def test_infrastructure_mixed_with_real_failures_is_decided_by_the_real_ones():
    lost = red("The runner has received a shutdown signal.", name="build")
    assert kind(lost, red(conclusion="cancelled", name="docs")) == "infrastructure"  # all of them infra
    assert kind(lost, red("FAILED tests/test_calc.py")) == "change"
    assert kind(lost, red("boom"), base={"test": "success"}) == "flaky"
    assert kind(lost, red("boom"), base={"test": "failure"}) == "base"  # (the build's base is not asked)
    assert kind(lost, red("boom"), reruns=1) == "change"


# -- action_required beats everything ----------------------------------------------------
def test_a_workflow_waiting_for_approval_beats_every_other_failure():
    waiting = red(conclusion="action_required", name="ci", started=False)
    others = [red("calc.py:3: AssertionError", name="unit"), red(conclusion="cancelled", name="docs"),
              red("boom", name="e2e")]
    verdict = classify([OK, *others, waiting], base={"e2e": "failure"}, files_changed=CHANGED, reruns=5)
    assert verdict.classification == "action_required"
    assert verdict.reason.startswith("ci waits for a maintainer to approve the workflow run")
    two = classify([waiting, red(conclusion="action_required", name="build")])
    assert two.reason.startswith("build, ci waits")


# -- guidance for a fix attempt ---------------------------------------------------------
def test_guidance_names_the_failing_checks_the_reason_and_their_log_tails():
    checks = [OK, red("FAILED tests/test_calc.py::test_add\nassert 3 == 4", name="unit", url="https://ci/1"),
              red("Error: lint found 2 problems", name="style", conclusion="timed_out")]
    verdict = classify(checks, files_changed=CHANGED)
    text = guidance_for(checks, verdict, 1, 2)
    assert text.startswith(f"CI fix 1 of 2: the pull request's checks failed ({verdict.reason}).")
    assert "--- unit (failure) ---\nFAILED tests/test_calc.py::test_add\nassert 3 == 4" in text
    assert "--- style (timed_out) ---\nError: lint found 2 problems" in text
    assert "lint (success)" not in text  # passing checks are not shown


def test_guidance_is_bounded_per_log_to_its_last_characters():
    long_log = "x" * (3 * LOG_TAIL_CHARS) + "THE END"
    checks = [red(long_log, name="a"), red(long_log, name="b")]
    text = guidance_for(checks, classify(checks), 2, 2)
    tail = long_log[-LOG_TAIL_CHARS:]
    assert text.count(tail) == 2 and "x" * (LOG_TAIL_CHARS + 1) not in text
    assert len(text) < 2 * LOG_TAIL_CHARS + 500


def test_guidance_masks_nothing_itself():
    """The log tail is masked where the forge fetches it (before it is ever recorded);
    guidance passes it on as it is, so masking has one place, not two that could differ."""
    token = "ghp" + "_" + "0123456789abcdefghij" * 2  # token-shaped, made at run time: no literal to leak
    log = f"token={token} *** [masked] \x1b[31mred\x1b[0m"
    checks = [red(log)]
    assert log in guidance_for(checks, classify(checks), 1, 1)


def test_a_check_run_round_trips_and_omits_its_defaults():
    check = CheckRun(name="unit", conclusion="failure", url="https://ci/1", log_ref="obj:7", log_tail="boom",
                     started=False, run_id=42, duration=12.5)
    assert msgspec.json.decode(msgspec.json.encode(check), type=CheckRun) == check
    assert msgspec.json.decode(msgspec.json.encode(OK)) == {"name": "lint", "conclusion": "success"}
    assert not check.passed and OK.passed


def test_a_passing_test_line_does_not_name_the_change():
    """unittest -v lists passing tests by module: a changed test module that *passed*
    is no evidence that the change broke anything."""
    log = ("test_add (test_calc.AddTest.test_add) ... ok\n"
           "tests/test_calc.py::test_sub PASSED\n"
           "FAIL: test_upload (test_net.NetTest.test_upload)\nConnectionError: reset")
    check = CheckRun(name="ci", conclusion="failure", log_tail=log)
    assert names_a_changed_file(check, ["tests/test_calc.py"]) == ""
    failing_line = CheckRun(name="ci", conclusion="failure", log_tail="FAIL: test_add (test_calc.AddTest.test_add)")
    assert names_a_changed_file(failing_line, ["tests/test_calc.py"]) == "tests/test_calc.py"
