"""A pull request's way to green, end to end on the local forge.

Everything is real: a :class:`LocalCluster` in this process on the test session's
nats-server (coordinator, agents with the scripted coder, the local forge's CI running
each pushed commit's ``.ccc/test-command`` in the agents' sandbox with ``CI=true``),
real git on bare repositories. The test plays the people and the forge's buttons
(approve, merge) and checks what the log and the forge say:

1. red CI -> a CI fix round -> green;
2. a flaky check -> one re-run -> green, without a fix;
3. the base moves -> conflict -> a rebase round -> green -> it merges;
4. two tasks naming the same file are serialised by the file lease (no conflict at all);
5. the merge queue with three approved PRs whose combination breaks main: the breaking
   one is ejected, main stays green at every step;
6. bounded CI fix attempts end in Failed with the reason.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from events.task import (
    TaskChecksFailed,
    TaskChecksPassed,
    TaskChecksRerun,
    TaskConflicted,
    TaskFixQueued,
    TaskMerged,
    TaskMergeDequeued,
    TaskMergeTesting,
    TaskPullRequestOpened,
)
from projections.waits import why_waiting
from tests.support.pr_repo import TEST_COMMAND, edit, scene, session, write

pytestmark = pytest.mark.timeout(120)


def last(items: list, item) -> int:
    """The index of the last occurrence of ``item`` in ``items``."""
    return len(items) - 1 - items[::-1].index(item)

# -- the sample repositories -----------------------------------------------------------------

# a CI-only style check (as on GitHub Actions: ``CI`` is set there, not on the agent) whose
# failure names the offending file
STYLE_TEST = '''"""Style: no trailing whitespace in Python files (checked in CI only)."""
import os
import pathlib
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[1]


class StyleTest(unittest.TestCase):
    @unittest.skipUnless(os.environ.get("CI"), "style is checked in CI")
    def test_no_trailing_whitespace(self):
        bad = []
        for path in sorted(ROOT.rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line != line.rstrip():
                    bad.append(str(path.relative_to(ROOT)) + ":" + str(n) + ": trailing whitespace")
        self.assertEqual(bad, [], "\\n".join(bad))
'''
CALC = "def add(a, b):\n    return a + b\n"
CALC_FILES = {
    "calc.py": CALC,
    "tests/__init__.py": "",
    "tests/test_calc.py": ("import unittest\n\nfrom calc import add\n\n\n"
                           "class AddTest(unittest.TestCase):\n"
                           "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"),
    "tests/test_style.py": STYLE_TEST,
    ".ccc/test-command": TEST_COMMAND,
}
# the agent's change: right, but with trailing whitespace the agent's own run cannot see
SUB_WITH_WHITESPACE = edit("calc.py", "    return a + b\n",
                           "    return a + b\n\n\ndef sub(a, b):\n    return a - b  \n")


async def test_red_ci_is_fixed_in_a_ci_fix_round_then_green(tmp_path, nats_url, ns):
    scripts = {1: {
        "attempts": [session("sub() added.", SUB_WITH_WHITESPACE)],
        "ci_fixes": [session("Trailing whitespace removed.",
                             edit("calc.py", "return a - b  \n", "return a - b\n"))]}}
    async with scene(tmp_path, nats_url, ns, "acme/calc", CALC_FILES, scripts, max_ci_fixes=2) as s:
        await s.open_issue(1, "Add a subtract function")
        task = await s.until_status(1, "review", timeout=90)
        assert task.ci_fixes == 1 and task.attempt == 1 and task.reruns == 0 and task.green_at is not None
        events = await s.events(1)
        opened = [e for e in events if isinstance(e, TaskPullRequestOpened)]
        failed = [e for e in events if isinstance(e, TaskChecksFailed)]
        fixes = [e for e in events if isinstance(e, TaskFixQueued)]
        passed = [e for e in events if isinstance(e, TaskChecksPassed)]
        assert len(opened) == 2 and len(failed) == 1 and len(fixes) == 1 and len(passed) == 1
        # the first push failed CI because of the change: its log names the file it touched
        assert failed[0].classification == "change" and "calc.py" in failed[0].reason
        assert failed[0].head_sha == opened[0].head_sha
        assert "calc.py:6: trailing whitespace" in failed[0].checks[0].log_tail
        assert fixes[0].kind == "ci_fix" and fixes[0].number == 1
        assert "trailing whitespace" in fixes[0].guidance  # the failing log is the fix's guidance
        # the fix is a new commit on the same pull request, and its checks passed
        assert opened[1].head_sha != opened[0].head_sha and opened[1].branch == opened[0].branch
        assert opened[1].pr_number == opened[0].pr_number
        assert passed[0].head_sha == opened[1].head_sha == task.head_sha
        order = [type(e) for e in events]
        assert (order.index(TaskChecksFailed) < order.index(TaskFixQueued)
                < last(order, TaskPullRequestOpened) < order.index(TaskChecksPassed))
        assert "return a - b\n" in s.forge.read_file("acme/calc", task.branch, "calc.py")
        # the forge's CI saw both heads: red on the first (green on its base), green on the fix
        facts = {f.head_sha: f for f in await s.checks_facts()}
        assert facts[opened[0].head_sha].checks[0].conclusion == "failure"
        assert facts[opened[0].head_sha].base == {"ccc/test": "success"}
        assert facts[opened[1].head_sha].checks[0].conclusion == "success"
        assert why_waiting(task, s.model.tasks, datetime.now(UTC)) == "checks green; waiting for approval"


async def test_bounded_ci_fixes_end_in_failed_with_the_reason(tmp_path, nats_url, ns):
    # the fix round changes something, but not what CI complains about
    scripts = {1: {
        "attempts": [session("sub() added.", SUB_WITH_WHITESPACE)],
        "ci_fixes": [session("A comment.",
                             edit("calc.py", "def sub(a, b):\n", "def sub(a, b):\n    # a minus b\n"))]}}
    async with scene(tmp_path, nats_url, ns, "acme/calc", CALC_FILES, scripts, max_ci_fixes=1) as s:
        await s.open_issue(1, "Add a subtract function")
        task = await s.until_status(1, "failed", timeout=90)
        assert task.failure_phase == "checks" and not task.failure_retryable and not task.can_retry
        assert task.attempt == 1 and task.ci_fixes == 1  # fix rounds are not attempts
        assert "after 1 CI fix attempt" in task.failure_reason and "calc.py" in task.failure_reason
        events = await s.events(1)
        kinds = [e.__struct_config__.tag for e in events]
        assert kinds.count("task.checks_failed") == 2 and kinds.count("task.fix_queued") == 1
        assert kinds.count("task.pr_opened") == 2 and kinds[-1] == "task.failed"
        assert all(e.classification == "change" for e in events if isinstance(e, TaskChecksFailed))
        assert "calc.py:7: trailing whitespace" in task.checks[0].log_tail  # the last run's log
        assert why_waiting(task, s.model.tasks, datetime.now(UTC)) == ""  # nothing follows


# -- a flaky check ---------------------------------------------------------------------------
# A stand-in for a flaky dependency of the CI: the first run of a commit that has
# perimeter() loses its upstream; the re-run (CCC_CI_RUN_ATTEMPT=2) gets through. Nothing in
# its log names the changed file, and the check passes on the base commit.
UPSTREAM_TEST = '''import os
import unittest

import shapes

FIRST_RUN = os.environ.get("CCC_CI_RUN_ATTEMPT") == "1"
NEW_CODE = hasattr(shapes, "perimeter")


class UpstreamTest(unittest.TestCase):
    @unittest.skipUnless(os.environ.get("CI"), "needs the CI's package mirror")
    def test_package_mirror(self):
        if FIRST_RUN and NEW_CODE:
            raise ConnectionError("package mirror did not answer within 30 s")
'''
SHAPES_FILES = {
    "shapes.py": "def area(w, h):\n    return w * h\n",
    "tests/__init__.py": "",
    "tests/test_area.py": ("import unittest\n\nfrom shapes import area\n\n\n"
                           "class AreaTest(unittest.TestCase):\n"
                           "    def test_area(self):\n        self.assertEqual(area(2, 3), 6)\n"),
    "tests/test_upstream.py": UPSTREAM_TEST,
    ".ccc/test-command": TEST_COMMAND,
}


async def test_a_flaky_check_is_re_run_once_and_goes_green_without_a_fix(tmp_path, nats_url, ns):
    scripts = {1: {"attempts": [session("perimeter() added.", edit(
        "shapes.py", "    return w * h\n",
        "    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"))]}}
    async with scene(tmp_path, nats_url, ns, "acme/shapes", SHAPES_FILES, scripts) as s:
        await s.open_issue(1, "Add a perimeter function")
        task = await s.until_status(1, "review", timeout=90)
        assert task.ci_fixes == 0 and task.reruns == 1 and task.attempt == 1
        events = await s.events(1)
        kinds = [e.__struct_config__.tag for e in events]
        assert kinds.count("task.pr_opened") == 1 and "task.fix_queued" not in kinds
        assert kinds.count("task.checks_rerun") == 1
        [failed] = [e for e in events if isinstance(e, TaskChecksFailed)]
        [rerun] = [e for e in events if isinstance(e, TaskChecksRerun)]
        [passed] = [e for e in events if isinstance(e, TaskChecksPassed)]
        assert failed.classification == "flaky" and "passed on the base commit" in failed.reason
        assert "package mirror did not answer" in failed.checks[0].log_tail
        assert rerun.head_sha == passed.head_sha == failed.head_sha == task.head_sha
        assert rerun.rerun == 1 and rerun.checks == ("ccc/test",)
        assert (kinds.index("task.checks_failed") < kinds.index("task.checks_rerun")
                < kinds.index("task.checks_passed"))
        # the forge ran the same commit twice: red, then green
        facts = [f for f in await s.checks_facts() if f.head_sha == task.head_sha]
        assert [f.checks[0].conclusion for f in facts] == ["failure", "success"]


# -- conflicts and the file lease ------------------------------------------------------------
GREETING_FILES = {
    "greeting.py": 'MESSAGE = "hello"\n\n\ndef greet(name):\n    return MESSAGE + ", " + name\n',
    "tests/__init__.py": "",
    "tests/test_greeting.py": ("import unittest\n\nfrom greeting import greet\n\n\n"
                               "class GreetTest(unittest.TestCase):\n"
                               "    def test_greet(self):\n"
                               "        self.assertTrue(greet('ada').endswith(', ada'))\n"),
    ".ccc/test-command": TEST_COMMAND,
}
FRIENDLIER = session("Friendlier.", edit("greeting.py", 'MESSAGE = "hello"', 'MESSAGE = "hello there"'))


async def test_base_moves_the_pr_conflicts_is_rebased_and_goes_green(tmp_path, nats_url, ns):
    repo = "acme/greet"
    # the issues name no file: no lease keeps them apart, and both change the same line
    scripts = {
        1: {"attempts": [FRIENDLIER]},
        2: {"attempts": [session("Louder.", edit("greeting.py", 'MESSAGE = "hello"', 'MESSAGE = "HELLO"'))],
            # git cannot rebase it by itself: the coder resolves the conflict
            "rebases": [session("Both: friendlier and louder.", write(
                "greeting.py",
                'MESSAGE = "HELLO THERE"\n\n\ndef greet(name):\n    return MESSAGE + ", " + name\n'))]},
    }
    async with scene(tmp_path, nats_url, ns, repo, GREETING_FILES, scripts) as s:
        await s.open_issue(1, "Make the greeting friendlier")
        await s.open_issue(2, "Make the greeting louder")
        await s.until_status(1, "review", timeout=60)
        first = await s.until_status(2, "review", timeout=60)
        assert s.task(1).paths == () and first.paths == ()
        await s.merge(1)
        await s.until_status(1, "completed")
        # the merge moved main: #2's pull request conflicts, is rebased, and its checks run again
        task = await s.until(2, lambda t: t.status == "review" and t.rebases == 1, "rebased and green", 90)
        events = await s.events(2)
        [conflicted] = [e for e in events if isinstance(e, TaskConflicted)]
        assert conflicted.files == ("greeting.py",) and conflicted.base_branch == "main"
        [fix] = [e for e in events if isinstance(e, TaskFixQueued)]
        assert fix.kind == "rebase" and fix.number == 1
        opened = [e for e in events if isinstance(e, TaskPullRequestOpened)]
        assert len(opened) == 2 and opened[1].head_sha != opened[0].head_sha == first.head_sha
        assert opened[1].branch == opened[0].branch and opened[1].pr_number == opened[0].pr_number
        kinds = [type(e) for e in events]
        assert (kinds.index(TaskConflicted) < kinds.index(TaskFixQueued) < last(kinds, TaskPullRequestOpened)
                < last(kinds, TaskChecksPassed))
        assert task.ci_fixes == 0 and task.head_sha == opened[1].head_sha
        # the rebased branch sits on the new main and merges
        await s.merge(2)
        await s.until_status(2, "completed")
        assert 'MESSAGE = "HELLO THERE"' in s.forge.read_file(repo, "main", "greeting.py")
        assert s.run_test_command("main").returncode == 0


async def test_tasks_naming_the_same_file_are_serialised_by_the_lease(tmp_path, nats_url, ns):
    repo = "acme/lease"
    scripts = {
        1: {"attempts": [FRIENDLIER]},
        # this edit finds its text only on main after #1: it must run on the new base
        2: {"attempts": [session("Louder.",
                                 edit("greeting.py", 'MESSAGE = "hello there"', 'MESSAGE = "HELLO THERE"'))]},
    }
    # a free slot for #2 all along: only the lease can hold it back
    async with scene(tmp_path, nats_url, ns, repo, GREETING_FILES, scripts, capacity=2) as s:
        await s.open_issue(1, "The greeting in greeting.py should be friendlier")
        await s.until(1, lambda t: t.agent_id is not None or t.branch != "", "assigned")
        await s.open_issue(2, "The greeting in greeting.py should be louder")
        await s.until_status(1, "review", timeout=60)
        waiting = await s.until_status(2, "queued")
        assert waiting.paths == ("greeting.py",) == s.task(1).paths
        reason = why_waiting(waiting, s.model.tasks, datetime.now(UTC))
        assert reason == f"file lease: greeting.py held by {s.task_id(1)}"
        assert s.status(2) == "queued"  # still: #1's pull request is open
        await s.merge(1)
        task = await s.until_status(2, "review", timeout=60)
        # #2 was assigned only after #1 completed, and never conflicted
        [completed_at] = [seq for seq, e in await s.stored(1) if e.__struct_config__.tag == "task.completed"]
        stored = await s.stored(2)
        assigned = [seq for seq, e in stored if e.__struct_config__.tag == "task.assigned"]
        assert len(assigned) == 1 and assigned[0] > completed_at
        kinds = [e.__struct_config__.tag for _, e in stored]
        assert "task.conflicted" not in kinds and "task.fix_queued" not in kinds
        assert task.rebases == 0 and task.ci_fixes == 0 and task.attempt == 1
        await s.merge(2)
        await s.until_status(2, "completed")
        assert 'MESSAGE = "HELLO THERE"' in s.forge.read_file(repo, "main", "greeting.py")


# -- the merge queue -------------------------------------------------------------------------
LEDGER_FILES = {
    "lib.py": "def total(values):\n    return sum(values)\n",
    "app.py": "from lib import total\n\n\ndef checkout(prices):\n    return total(prices)\n",
    "tests/__init__.py": "",
    "tests/test_app.py": ("import unittest\n\nfrom app import checkout\n\n\n"
                          "class AppTest(unittest.TestCase):\n"
                          "    def test_checkout(self):\n        self.assertEqual(checkout([1, 2]), 3)\n"),
    ".ccc/test-command": TEST_COMMAND,
}
RENAME = session(
    "total() is sum_all() now.",
    edit("lib.py", "def total(values):", "def sum_all(values):"),
    edit("app.py", "from lib import total", "from lib import sum_all"),
    edit("app.py", "return total(prices)", "return sum_all(prices)"))
STATS = session("average() added.",
                write("stats.py", "def average(values):\n    return sum(values) / len(values)\n"),
                write("tests/test_stats.py", "import unittest\n\nfrom stats import average\n\n\n"
                                             "class StatsTest(unittest.TestCase):\n"
                                             "    def test_average(self):\n"
                                             "        self.assertEqual(average([1, 3]), 2)\n"))
REPORT = session("report() added.", write("report.py", "from lib import total\n\n\n"
                                                        "def report(values):\n"
                                                        "    return 'total: ' + str(total(values))\n"),
                 write("tests/test_report.py", "import unittest\n\nfrom report import report\n\n\n"
                                               "class ReportTest(unittest.TestCase):\n"
                                               "    def test_report(self):\n"
                                               "        self.assertEqual(report([1, 2]), 'total: 3')\n"))
REPORT_FIX = session("report() calls sum_all().",
                     edit("report.py", "from lib import total", "from lib import sum_all"),
                     edit("report.py", "str(total(values))", "str(sum_all(values))"))


async def test_the_merge_queue_ejects_the_pr_that_breaks_main_and_main_stays_green(tmp_path, nats_url, ns):
    repo = "acme/ledger"
    scripts = {1: {"attempts": [RENAME]}, 2: {"attempts": [STATS]},
               3: {"attempts": [REPORT], "ci_fixes": [REPORT_FIX]}}
    async with scene(tmp_path, nats_url, ns, repo, LEDGER_FILES, scripts, capacity=3, merge_queue=("*",),
                     max_ci_fixes=1) as s:
        initial = s.main_sha()
        # three pull requests, each green on its own (no issue names a file: no lease)
        await s.open_issue(1, "Rename total to sum_all")
        await s.open_issue(2, "Add an average function")
        await s.open_issue(3, "Add a report function")
        for n in (1, 2, 3):
            await s.until_status(n, "review", timeout=60)
        # approved in this order, each entering the queue behind the one before
        for n in (1, 2, 3):
            await s.approve(n)
            await s.until_status(n, "merge_queued", "merging", "completed")
        # #1 merges; #3 on the new main calls a function that no longer exists: ejected, fixed
        # in a CI fix round, green again, and (still approved) merged through the queue
        for n in (1, 2, 3):
            await s.until_status(n, "completed", timeout=90)
        events = await s.events(3)
        kinds = [type(e) for e in events]
        [ejected] = [e for e in events if isinstance(e, TaskMergeDequeued)]
        assert ejected.classification == "change"
        assert ejected.reason.startswith("ejected from the merge queue")
        assert "cannot import name 'total'" in ejected.checks[0].log_tail
        tested = [e for e in events if isinstance(e, TaskMergeTesting)]
        assert len(tested) == 2
        assert kinds.index(TaskMergeTesting) < kinds.index(TaskMergeDequeued) < kinds.index(TaskFixQueued)
        [fix] = [e for e in events if isinstance(e, TaskFixQueued)]
        assert fix.kind == "ci_fix" and "cannot import name 'total'" in fix.guidance
        assert s.task(3).ci_fixes == 1 and s.task(3).attempt == 1
        # main moved only to tested, green candidates, in queue order, and never to the ejected one
        merged = {}
        for n in (1, 2, 3):
            [m] = [e for e in await s.events(n) if isinstance(e, TaskMerged)]
            merged[n] = m.merge_sha
        # #3's candidate was the merge with main as #1 and #2 left it, both times
        assert tested[0].base_sha == tested[1].base_sha == merged[2]
        history = s.first_parents("main")
        assert history == [merged[3], merged[2], merged[1], initial]
        facts = await s.checks_facts()
        red = {f.head_sha for f in facts if any(not c.passed for c in f.checks)}
        green = {f.head_sha for f in facts if f.checks and all(c.passed for c in f.checks)}
        assert tested[0].queue_sha in red and tested[0].queue_sha not in history
        for sha in history[:-1]:
            assert sha in green and sha not in red
        # and main, checked out, passes its tests (the CI-only ones too)
        result = s.run_test_command("main")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "test_report" in result.stderr and "test_average" in result.stderr
