"""The scripted coder: replaying recorded sessions into a workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from events.subjects import task_id_for
from events.task import Usage
from infra.adapters.git import gitops
from actors.ports import Coder
from events.work import Budget, CodeRequest
from infra.adapters.coders import ScriptedCoder
from infra.adapters.git.workspace import Workspace

pytestmark = pytest.mark.timeout(60)

REPO = "acme/app"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace.create(tmp_path / "ws", "agent-1", task_id_for(REPO, 7), {})
    (ws.repo_dir / "app.py").write_text("def add(a, b):\n    return a - b\n")
    return ws


def _request(ws: Workspace, attempt: int = 1, **kw) -> CodeRequest:
    return CodeRequest(task_id=ws.task_id, attempt=attempt, title="Fix add", body="add subtracts",
                       specialty="python", labels=("bug",), repo=REPO, repo_dir=str(ws.repo_dir), **kw)


def _write_script(path: Path, attempts: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"attempts": attempts}))
    return path


FIX = {"edit": {"path": "app.py", "old": "return a - b", "new": "return a + b"}}


async def test_script_dir_lookup_and_steps(ws: Workspace, tmp_path: Path) -> None:
    scripts = tmp_path / "scripts"
    _write_script(scripts / "acme_app-7.json", [{"summary": "fixed add", "steps": [
        FIX,
        {"write": {"path": "tests/test_app.py", "content": "from app import add\n"}},
        {"write": {"path": "obsolete.txt", "content": "bye"}},
        {"delete": {"path": "obsolete.txt"}},
        # python3: the system's, the one a sandboxed command sees (not the agent's virtualenv)
        {"run": {"command": ["python3", "-c", "print('ran fine')"], "timeout": 30}},
    ]}])
    coder = ScriptedCoder(scripts)
    assert isinstance(coder, Coder) and coder.name == "scripted"
    out = await coder.implement(_request(ws), ws)
    assert out.status == "done", out.reason
    assert out.summary == "fixed add" and out.turns == 5
    assert out.usage == Usage(model="scripted")
    assert (ws.repo_dir / "app.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert (ws.repo_dir / "tests" / "test_app.py").exists() and not (ws.repo_dir / "obsolete.txt").exists()
    assert "ran fine" in out.transcript and "exit 0" in out.transcript
    assert (ws.logs_dir / "coder-attempt1-step5.log").exists()


async def test_script_inside_the_repository(ws: Workspace) -> None:
    _write_script(ws.repo_dir / ".ccc" / "scripts" / "7.json", [{"steps": [FIX]}])
    gitops.run_git(ws.repo_dir, "init", "-q")
    gitops.commit_all(ws.repo_dir, "base", "t", "t@example.com")
    out = await ScriptedCoder().implement(_request(ws), ws)
    assert out.status == "done" and out.summary == "applied 1 recorded steps"
    assert gitops.changed_files(ws.repo_dir) == ["app.py"]  # the script is not part of the change
    # an explicit issue number wins over the task id
    _write_script(ws.repo_dir / ".ccc" / "scripts" / "99.json", [{"steps": [], "summary": "empty"}])
    out = await ScriptedCoder().implement(_request(ws, issue_number=99), ws)
    assert out.summary == "empty"


async def test_script_dir_takes_precedence(ws: Workspace, tmp_path: Path) -> None:
    _write_script(ws.repo_dir / ".ccc" / "scripts" / "7.json", [{"steps": [], "summary": "from repo"}])
    _write_script(tmp_path / "s" / "acme_app-7.json", [{"steps": [], "summary": "from dir"}])
    assert (await ScriptedCoder(tmp_path / "s").implement(_request(ws), ws)).summary == "from dir"
    assert (await ScriptedCoder(tmp_path / "empty").implement(_request(ws), ws)).summary == "from repo"


async def test_attempt_selection(ws: Workspace, tmp_path: Path) -> None:
    _write_script(tmp_path / "s" / "acme_app-7.json", [
        {"steps": [], "summary": "first"}, {"steps": [], "summary": "second"}])
    coder = ScriptedCoder(tmp_path / "s")
    summaries = [(await coder.implement(_request(ws, attempt=k), ws)).summary for k in (1, 2, 3, 9)]
    assert summaries == ["first", "second", "second", "second"]


async def test_edit_must_match_exactly_once(ws: Workspace, tmp_path: Path) -> None:
    (ws.repo_dir / "twice.txt").write_text("x = 1\nx = 1\n")
    _write_script(tmp_path / "s" / "acme_app-7.json", [
        {"steps": [{"edit": {"path": "twice.txt", "old": "x = 1", "new": "x = 2"}}]},
        {"steps": [FIX, {"edit": {"path": "app.py", "old": "not there", "new": "y"}}, FIX]},
        {"steps": [{"edit": {"path": "missing.py", "old": "a", "new": "b"}}]},
    ])
    coder = ScriptedCoder(tmp_path / "s")
    out = await coder.implement(_request(ws, attempt=1), ws)
    assert out.status == "failed" and "found 2 times" in out.reason and out.turns == 1
    assert (ws.repo_dir / "twice.txt").read_text() == "x = 1\nx = 1\n"
    out = await coder.implement(_request(ws, attempt=2), ws)
    assert out.status == "failed" and out.reason.startswith("step 2:") and "found 0 times" in out.reason
    assert out.turns == 2 and "FAILED" in out.transcript
    out = await coder.implement(_request(ws, attempt=3), ws)
    assert out.status == "failed" and "no such file" in out.reason


async def test_run_step_with_check_and_timeout(ws: Workspace, tmp_path: Path) -> None:
    _write_script(tmp_path / "s" / "acme_app-7.json", [
        {"steps": [{"run": {"command": "echo nope; exit 2"}}], "summary": "exit ignored"},
        {"steps": [{"run": {"command": "echo nope; exit 2", "check": True}}]},
        {"steps": [{"run": {"command": "sleep 30", "timeout": 0.5, "check": True}}]},
    ])
    coder = ScriptedCoder(tmp_path / "s")
    out = await coder.implement(_request(ws, attempt=1), ws)
    assert out.status == "done" and "exit 2" in out.transcript
    out = await coder.implement(_request(ws, attempt=2), ws)
    assert out.status == "failed" and "exit 2" in out.reason and "nope" in out.reason
    out = await coder.implement(_request(ws, attempt=3), ws)
    assert out.status == "failed" and "timed out" in out.reason


async def test_escaping_steps_are_refused(ws: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    (ws.repo_dir / "link").symlink_to(tmp_path)
    _write_script(tmp_path / "s" / "acme_app-7.json", [
        {"steps": [{"write": {"path": "../../outside.txt", "content": "pwned"}}]},
        {"steps": [{"write": {"path": str(outside), "content": "pwned"}}]},
        {"steps": [{"write": {"path": "link/outside.txt", "content": "pwned"}}]},
        {"steps": [{"write": {"path": ".git/hooks/pre-commit", "content": "pwned"}}]},
    ])
    coder = ScriptedCoder(tmp_path / "s")
    for attempt in (1, 2, 3, 4):
        out = await coder.implement(_request(ws, attempt=attempt), ws)
        assert out.status == "failed" and out.reason.startswith("step 1:"), out.reason
    assert not outside.exists()


async def test_no_script_bad_script_and_budget(ws: Workspace, tmp_path: Path) -> None:
    out = await ScriptedCoder(tmp_path / "none").implement(_request(ws), ws)
    assert out.status == "failed" and out.reason.startswith("no recorded session for acme/app#7")
    assert out.usage.input_tokens == 0 and out.turns == 0

    _write_script(tmp_path / "s" / "acme_app-7.json", [{"steps": [{"paint": {"path": "x"}}]}])
    out = await ScriptedCoder(tmp_path / "s").implement(_request(ws), ws)
    assert out.status == "failed" and "unknown step" in out.reason
    (tmp_path / "s" / "acme_app-7.json").write_text("{not json")
    out = await ScriptedCoder(tmp_path / "s").implement(_request(ws), ws)
    assert out.status == "failed" and out.reason.startswith("invalid script")

    steps = [{"write": {"path": f"f{i}.txt", "content": "x"}} for i in range(5)]
    _write_script(tmp_path / "s" / "acme_app-7.json", [{"steps": steps}])
    out = await ScriptedCoder(tmp_path / "s").implement(_request(ws, budget=Budget(max_turns=3)), ws)
    assert out.status == "budget_exhausted" and out.turns == 3
    assert (ws.repo_dir / "f2.txt").exists() and not (ws.repo_dir / "f3.txt").exists()


async def test_transcript_is_masked(ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_" + "z" * 36)
    _write_script(tmp_path / "s" / "acme_app-7.json", [
        {"steps": [{"run": {"command": "echo token ghp_" + "z" * 36}}]}])
    out = await ScriptedCoder(tmp_path / "s").implement(_request(ws), ws)
    assert out.status == "done" and "ghp_" not in out.transcript and "***" in out.transcript


async def test_pipeline_flow_with_local_forge(tmp_path: Path) -> None:
    """The adapters in the order the agent pipeline uses them: clone from the local
    forge, replay, run the repo's tests in the workspace, count, commit, push, merge."""
    from infra.adapters.forge.local import LocalForge
    from infra.adapters.git.test_output import parse_test_counts

    forge = LocalForge(tmp_path / "forge")
    forge.create_repo(REPO, {
        "calc.py": "def add(a, b):\n    return a - b\n",
        # the tests run in the sandbox, where the agent's virtualenv (and its pytest) is not:
        # a repository brings its own tools; the standard library's unittest is always there
        "test_calc.py": ("import unittest\n\nfrom calc import add\n\n\nclass AddTest(unittest.TestCase):\n"
                         "    def test_add(self):\n        self.assertEqual(add(2, 2), 4)\n"),
        ".ccc/test-command": "python3 -m unittest -v\n",
        ".ccc/scripts/7.json": json.dumps({"attempts": [{"summary": "fix add", "steps": [
            {"edit": {"path": "calc.py", "old": "a - b", "new": "a + b"}}]}]}),
    })
    ws = Workspace.create(tmp_path / "ws", "agent-1", task_id_for(REPO, 7), {"attempt": 1})
    gitops.clone(forge.clone_url(REPO), ws.repo_dir)
    branch = gitops.branch_name(ws.task_id, "Fix add")
    gitops.create_branch(ws.repo_dir, branch)

    out = await ScriptedCoder().implement(_request(ws), ws)
    assert out.status == "done", out.reason
    command = gitops.detect_test_command(ws.repo_dir)
    result = await ws.run(command, timeout=60, log_name="tests")
    counts = parse_test_counts(result.output, result.exit_code)
    assert result.ok, result.output
    assert (counts.passed, counts.failed, counts.framework) == (1, 0, "unittest")
    assert gitops.changed_files(ws.repo_dir) == ["calc.py"]
    sha = gitops.commit_all(ws.repo_dir, f"{out.summary}\n\nFixes #7", "ccc agent-1", "agent-1@ccc.local")
    gitops.push(ws.repo_dir, branch)
    assert forge.merge(REPO, branch, message="Merge fix") == sha
    assert "a + b" in forge.read_file(REPO, "main", "calc.py")
    ws.mark_finished()
