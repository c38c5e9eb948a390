"""The pure parts of a round on a pull request's branch: what a rebase's coder is told,
which recorded session a scripted round replays, and the pull-request report's new
fields (old events still decode)."""

from __future__ import annotations

import msgspec
import pytest

from actors.pipeline import MAX_GUIDANCE, conflict_guidance
from events.agent import AgentPullRequestOpened
from events.codec import decode_event
from events.work import CodeRequest, ConflictedFile, Rebase
from infra.adapters.coders.scripted import Script

REBASE = Rebase(status="conflicts", head="b" * 40, base="a" * 40, conflicts=(
    ConflictedFile(path="calc.py", messages=("CONFLICT (content): Merge conflict in calc.py",),
                   regions="@@ line 2 @@\n<<<<<<< origin/main\n    return sum((a, b))\n=======\n"
                           "    return a + b\n>>>>>>> ccc/task-x"),
    ConflictedFile(path="old.py", messages=(
        "CONFLICT (modify/delete): old.py deleted in origin/main and modified in ccc/task-x.",)),
))


def test_the_rebase_guidance_names_every_conflict_with_both_sides_then_the_tasks_guidance():
    text = conflict_guidance(REBASE, branch="ccc/task-x", base_branch="main", guidance="  keep both  ")
    head, calc, old, tail = text.split("\n\n")
    assert head.startswith(f"Rebase of ccc/task-x on the latest main ({'a' * 12}): ")
    assert "collides with it in 2 file(s)" in head and "remove every marker line" in head
    assert calc.splitlines()[:2] == ["--- calc.py ---", "CONFLICT (content): Merge conflict in calc.py"]
    assert "<<<<<<< origin/main" in calc and ">>>>>>> ccc/task-x" in calc
    assert old.startswith("--- old.py ---\nCONFLICT (modify/delete)")
    assert tail == "keep both"


def test_the_rebase_guidance_is_bounded():
    big = Rebase(status="conflicts", head="b" * 40, base="a" * 40,
                 conflicts=tuple(ConflictedFile(path=f"f{i}.py", regions="x" * 5000) for i in range(10)))
    text = conflict_guidance(big, branch="b", base_branch="main")
    assert len(text) == MAX_GUIDANCE + len("\n[... cut]") and text.endswith("[... cut]")


def request(work: str = "implement", attempt: int = 1, round: int = 0) -> CodeRequest:
    return CodeRequest(task_id="acme_app-1", attempt=attempt, title="t", body="b", specialty="general",
                       repo="acme/app", repo_dir="/nonexistent", work=work, round=round)


def test_a_scripted_round_replays_the_recording_of_its_kind_and_number():
    script = msgspec.json.decode(b"""{
        "attempts": [{"summary": "a1"}, {"summary": "a2"}],
        "ci_fixes": [{"summary": "f1"}, {"summary": "f2"}],
        "rebases": [{"summary": "r1"}]}""", type=Script)
    summaries = [script.session(request(*args)).summary for args in (
        ("implement", 1), ("implement", 3), ("ci_fix", 1, 1), ("ci_fix", 1, 2), ("ci_fix", 2, 5),
        ("rebase", 1, 1), ("rebase", 1, 2))]
    assert summaries == ["a1", "a2", "f1", "f2", "f2", "r1", "r1"]
    only = msgspec.json.decode(b'{"attempts": [{"summary": "a1"}]}', type=Script)
    assert only.session(request("ci_fix", 1, 1)) is None and only.session(request("rebase", 1, 1)) is None


def test_a_code_request_is_an_implementation_unless_told():
    assert (request().work, request().round) == ("implement", 0)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**msgspec.to_builtins(request()), "work": "merge"}, CodeRequest)


def test_the_pull_request_report_carries_head_and_base_and_old_ones_still_decode():
    old = (b'{"type":"agent.pr_opened","task_id":"demo_shop-2","attempt":1,"branch":"ccc/task-demo_shop-2-x",'
           b'"pr_url":"file:///f/demo/shop.git?branch=ccc/task-demo_shop-2-x&base=main","pr_number":2,'
           b'"tests_passed":3,"event_id":"agent-2:8","agent_id":"agent-2","version":8,'
           b'"occurred_at":"2026-11-27T06:58:17.197408Z","correlation_id":"agent-2","actor":"agent-2"}')
    event = decode_event("agent.agent-2.pr_opened", old)
    assert isinstance(event, AgentPullRequestOpened)
    assert (event.head_sha, event.base_branch) == ("", "")
    new = old.replace(b'"tests_passed":3,', b'"tests_passed":3,"head_sha":"' + b"c" * 40 + b'","base_branch":"main",')
    event = decode_event("agent.agent-2.pr_opened", new)
    assert (event.head_sha, event.base_branch) == ("c" * 40, "main")
