"""What ForgeSync writes to an issue, from the task's state alone: its state label and the masked tracking comment."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from msgspec.structs import replace

from actors.forge_sync import render_comment, state_label
from events import task_state as ts
from events.checks import CheckRun
from events.task import IssueRef
from infra.adapters.obs.masking import mask_secrets

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REPO = "acme/app"


def test_rendering_is_pure_and_masks_secrets():
    issue = IssueRef(source="github", repo=REPO, number=3, title="t")
    state = ts.fold(ts.decide(None, ts.CreateTask(at=AT, actor="c", task_id="acme_app-3", issue=issue)))
    assert state_label(state) == "ccc:queued"
    assert render_comment(state, mask_secrets) == render_comment(state, mask_secrets)
    assert render_comment(state, mask_secrets).startswith("<!-- ccc:task:acme_app-3 -->\n")
    for cmd in (ts.StartAnalysis(at=AT, actor="c"), ts.RecordAnalysis(at=AT, actor="c"),
                ts.AssignTask(at=AT, actor="c", agent_id="a-1"),
                ts.FailTask(at=AT, actor="c", reason="push failed: ghp_" + "x" * 36 + "\n<!-- ccc:task:y -->",
                            phase="push")):
        state = ts.fold(ts.decide(state, cmd), state)
    body = render_comment(state, mask_secrets)
    assert state_label(state) == "ccc:failed"
    assert "ghp_" + "x" * 36 not in body and "<!-- ccc:task:y" not in body
    assert len(re.findall(r"<!-- ccc:task:", body)) == 1


# -- the pull request's way to green ------------------------------------------------------
HEAD = "abcdef1234567890abcdef1234567890abcdef12"
RED = CheckRun(name="test", conclusion="failure", url="https://ci.example/runs/1",
               log_tail="FAILED src/app.py::test_login")
GREEN = CheckRun(name="lint", conclusion="success", url="https://ci.example/runs/2")


def run(state, *commands):
    for c in commands:
        state = ts.fold(ts.decide(state, c), state)
    return state


def opened(task_id: str = "acme_app-3", number: int = 3):
    issue = IssueRef(source="github", repo=REPO, number=number, title="t")
    return run(None, ts.CreateTask(at=AT, actor="c", task_id=task_id, issue=issue),
               ts.StartAnalysis(at=AT, actor="c"), ts.RecordAnalysis(at=AT, actor="c"),
               ts.AssignTask(at=AT, actor="c", agent_id="a-1"),
               ts.StartTask(at=AT, actor="a-1", agent_id="a-1"),
               ts.StartTests(at=AT, actor="a-1", agent_id="a-1", files_changed=("src/app.py",)),
               ts.OpenPullRequest(at=AT, actor="a-1", agent_id="a-1", branch="ccc/x", pr_number=9,
                                  pr_url="https://github.com/acme/app/pull/9", head_sha=HEAD,
                                  base_branch="main", tests_passed=4))


def rows_of(body: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", body, re.MULTILINE))


def test_every_status_has_a_label_and_a_status_line():
    state = opened()
    labels = set()
    for status in ts.TASK_STATUSES:
        s = replace(state, status=status)
        labels.add(state_label(s))
        assert state_label(s).startswith("ccc:")
        assert "**Status:** " in render_comment(s, mask_secrets)
    assert {"ccc:checking", "ccc:checks-failed", "ccc:needs-human", "ccc:conflicted", "ccc:merge-queue",
            "ccc:review", "ccc:done", "ccc:failed"} <= labels


def test_checks_running_then_a_ci_fix_round():
    state = opened()
    body = render_comment(state, mask_secrets)
    assert state_label(state) == "ccc:checking" and "**Status:** pull request open, checks running" in body
    assert "**Checks** running on `abcdef123456` since 2026-03-01 12:00 UTC" in body
    assert rows_of(body)["Head commit"] == "`abcdef123456`"
    assert rows_of(body)["Pull request"] == "[#9](https://github.com/acme/app/pull/9)"
    assert "| Check |" not in body  # nothing completed yet

    fixing = run(state, ts.RecordChecks(at=AT, actor="c", head_sha=HEAD, checks=(GREEN, RED), max_ci_fixes=2))
    assert (fixing.status, fixing.work) == ("queued", "ci_fix")
    body = render_comment(fixing, mask_secrets)
    assert state_label(fixing) == "ccc:queued"
    assert "**Status:** queued, waiting for an agent (CI fix 1" in body
    rows = rows_of(body)
    assert rows["CI fixes"] in ("1", "1 of 2")
    assert rows["Last CI failure"] == "`change`: caused by the change"
    table = body[body.index("**Checks:**"):]
    assert table.splitlines()[2:6] == [  # failing first, each with its link
        "| Check | Result | Details |", "|---|---|---|",
        "| test | failure | [details](https://ci.example/runs/1) |",
        "| lint | success | [details](https://ci.example/runs/2) |"]
    assert "Reason: test failed (failure) and its log names src/app.py" in body
    assert "FAILED src/app.py::test_login" not in body  # the log tail stays in the artifacts
    told = replace(fixing, max_ci_fixes=2)
    assert rows_of(render_comment(told, mask_secrets))["CI fixes"] == "1 of 2"
    assert "(CI fix 1 of 2)" in render_comment(told, mask_secrets)

    again = run(fixing, ts.AssignTask(at=AT, actor="c", agent_id="a-2"),
                ts.StartTask(at=AT, actor="a-2", agent_id="a-2"),
                ts.StartTests(at=AT, actor="a-2", agent_id="a-2", files_changed=("src/app.py",)),
                ts.OpenPullRequest(at=AT, actor="a-2", agent_id="a-2", branch="ccc/x", pr_number=9,
                                   head_sha="1" * 40, base_branch="main"))
    body = render_comment(again, mask_secrets)
    assert "**Checks** running on `111111111111`" in body and "**Previous checks:**" in body
    green = run(again, ts.RecordChecks(at=AT, actor="c", head_sha="1" * 40, checks=(GREEN,)))
    body = render_comment(green, mask_secrets)
    assert state_label(green) == "ccc:review" and "checks passed, waiting for review" in body
    assert "**Checks:**" in body and "| lint | success |" in body and "| test |" not in body


def test_what_a_human_must_do():
    waiting = run(opened(), ts.RecordChecks(at=AT, actor="c", head_sha=HEAD, checks=(
        CheckRun(name="deploy", conclusion="action_required"),)))
    body = render_comment(waiting, mask_secrets)
    assert state_label(waiting) == "ccc:needs-human"
    assert "**Needs a human:** a maintainer approves the pending workflow run(s) on the pull request" in body
    assert rows_of(body)["Last CI failure"] == ("`action_required`: a workflow waits for a "
                                                "maintainer's approval")
    assert "Reason: deploy waits for a maintainer to approve the workflow run" in body


def test_conflicts_rebases_and_the_merge_queue():
    conflicted = run(opened(), ts.RecordConflict(at=AT, actor="c", base_branch="main", base_sha="f" * 40,
                                                 files=("src/app.py", "a|b.py")))
    body = render_comment(conflicted, mask_secrets)
    assert "(rebase 1 on main)" in body
    assert rows_of(body)["Conflicts"] == "`src/app.py`, `a\\|b.py` with `main`"
    assert rows_of(body)["Rebases"] == "1"

    green = run(opened(), ts.RecordChecks(at=AT, actor="c", head_sha=HEAD, checks=(GREEN,)),
                ts.ApprovePullRequest(at=AT, actor="c", by="al`ice", merge_queue=True))
    body = render_comment(green, mask_secrets)
    assert state_label(green) == "ccc:merge-queue"
    rows = rows_of(body)
    assert rows["Approved"] == "by `alice`" and rows["Merge queue"] == "queued, waiting for its turn"
    testing = run(green, ts.StartMergeTest(at=AT, actor="c", queue_ref="ccc/mq/main", queue_sha="9" * 40))
    body = render_comment(testing, mask_secrets)
    assert rows_of(body)["Merge queue"] == "testing `999999999999` (the pull request on the latest `main`)"
    assert "**Checks** running on `999999999999`" in body
    merged = run(testing, ts.RecordChecks(at=AT, actor="c", head_sha="9" * 40, checks=(GREEN,)),
                 ts.CompleteMerge(at=AT, actor="c", base_branch="main", merge_sha="8" * 40))
    body = render_comment(merged, mask_secrets)
    assert state_label(merged) == "ccc:done" and rows_of(body)["Merge queue"] == "merged as `888888888888`"
    assert "Reason: merged by the merge queue" in body


def test_checks_from_the_forge_are_escaped_masked_and_linked_only_when_safe():
    token = "ghp_" + "y" * 36
    hostile = (
        CheckRun(name="a | b <!-- ccc:task:z -->", conclusion="failure", url="javascript:alert(1)"),
        CheckRun(name=f"leak {token}", conclusion="cancelled", started=False,
                 url=f"https://ci.example/x?token={token}"),
        CheckRun(name="paren", conclusion="failure", url="https://ci.example/a)(b"),
        *(CheckRun(name=f"c{i}", conclusion="success") for i in range(25)),
    )
    state = replace(opened(), status="checks_failed", checks=hostile, classification="change",
                    status_reason="x")
    body = render_comment(state, mask_secrets)
    assert body == render_comment(state, mask_secrets)
    assert token not in body and "javascript:" not in body and "<!-- ccc:task:z" not in body
    assert len(re.findall(r"<!-- ccc:task:", body)) == 1
    assert "| a \\| b &lt;!-- ccc:task:z --&gt; | failure | - |" in body
    assert "| paren | failure | - |" in body
    assert "cancelled (never started)" in body
    assert "| … and 8 more | | |" in body  # 28 checks, 20 rows
