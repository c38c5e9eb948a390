"""Git helpers and the local forge, on real git repositories in tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from events.errors import CccError
from infra.adapters.git import gitops
from infra.adapters.forge.errors import ForgeError, MergeConflict
from infra.adapters.forge.local import LocalForge
from infra.adapters.git.gitops import NothingToCommit, PushRejected

pytestmark = pytest.mark.timeout(60)

AUTHOR = ("ccc agent", "agent@ccc.local")


@pytest.fixture(autouse=True)
def _no_user_git_identity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every commit must carry its identity explicitly: hide any user config."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def forge(tmp_path: Path) -> LocalForge:
    return LocalForge(tmp_path / "forge")


@pytest.fixture
def origin(forge: LocalForge) -> str:
    forge.create_repo("acme/app", {
        "README.md": "# app\n",
        "app/calc.py": "def add(a, b):\n    return a + b\n",
        "tests/test_calc.py": "from app.calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n",
        ".gitignore": "*.log\n",
    })
    return "acme/app"


def _clone(forge: LocalForge, repo: str, dest: Path) -> Path:
    gitops.clone(forge.clone_url(repo), dest)
    return dest


def _log(repo: Path, *args: str) -> list[str]:
    return gitops.run_git(repo, "log", "--format=%s|%an|%cn|%P", *args)[1].decode().splitlines()


# -- clone, branch, change, commit, push ---------------------------------------------
def test_full_change_cycle(forge: LocalForge, origin: str, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()  # like Workspace.repo_dir: exists, empty
    work = _clone(forge, origin, tmp_path / "work")
    assert gitops.default_branch(work) == "main"
    assert gitops.default_branch(forge.repo_path(origin)) == "main"
    branch = gitops.branch_name("acme_app-7", "Fix the add() bug")
    gitops.create_branch(work, branch)

    assert gitops.changed_files(work) == []
    assert gitops.diff(work) == ""
    (work / "app" / "calc.py").write_text("def add(a, b):\n    return a + b + 0\n")
    (work / "app" / "new.py").write_text("X = 1\n")
    (work / "README.md").unlink()
    (work / "debug.log").write_text("ignored\n")
    (work / "blob.bin").write_bytes(bytes(range(256)) * 4)

    assert gitops.changed_files(work) == ["README.md", "app/calc.py", "app/new.py", "blob.bin"]
    patch = gitops.diff(work)
    assert "+++ b/app/new.py" in patch and "+X = 1" in patch
    assert "-    return a + b\n+    return a + b + 0" in patch
    assert "--- a/README.md" in patch and "Binary files /dev/null and b/blob.bin differ" in patch
    assert "debug.log" not in patch
    assert "GIT binary patch" in gitops.diff(work, binary=True)
    assert gitops.diff_stat(work) == "4 files changed, 2 insertions(+), 2 deletions(-)"
    # diffing used a throw-away index: nothing was staged for real
    assert gitops.run_git(work, "diff", "--cached", "--name-only")[1] == b""

    sha = gitops.commit_all(work, "Fix add", *AUTHOR)
    assert gitops.head_sha(work) == sha
    assert _log(work, "-1")[0].startswith("Fix add|ccc agent|ccc agent|")
    assert gitops.changed_files(work) == []
    assert gitops.diff_stat(work) == "0 files changed, 0 insertions(+), 0 deletions(-)"
    with pytest.raises(NothingToCommit) as err:
        gitops.commit_all(work, "again", *AUTHOR)
    assert isinstance(err.value, CccError) and not err.value.retryable

    assert gitops.push(work, branch) == sha
    assert forge.branches(origin) == sorted(["main", branch])
    assert forge.read_file(origin, branch, "app/new.py") == "X = 1\n"


def test_same_size_edit_right_after_checkout_is_seen(forge: LocalForge, origin: str, tmp_path: Path) -> None:
    """git trusts its stat cache only for files older than the index; an edit of the
    same size within the second of the checkout must still be seen later on. Simulated
    without sleeping: checkout, index and edit all get the same (past) timestamp."""
    work = _clone(forge, origin, tmp_path / "work")
    calc = work / "app" / "calc.py"
    past = calc.stat().st_mtime_ns - 10 * 10**9
    for p in work.rglob("*.py"):
        os.utime(p, ns=(past, past))
    gitops.run_git(work, "update-index", "-q", "--refresh")  # the index records `past`
    os.utime(work / ".git" / "index", ns=(past, past))  # ...and was written in that second
    calc.write_text("def add(a, b):\n    return a - b\n")  # same size as before
    os.utime(calc, ns=(past, past))
    assert gitops.changed_files(work) == ["app/calc.py"]
    assert "+    return a - b" in gitops.diff(work)


def test_retry_attempt_force_pushes_its_own_branch_with_lease(
    forge: LocalForge, origin: str, tmp_path: Path
) -> None:
    branch = gitops.branch_name("acme_app-7", "Add feature")
    first = _clone(forge, origin, tmp_path / "attempt1")
    gitops.create_branch(first, branch)
    (first / "a.txt").write_text("attempt 1\n")
    gitops.commit_all(first, "attempt 1", *AUTHOR)
    gitops.push(first, branch)

    # a retry: a fresh clone, the branch started again from main, a different commit
    second = _clone(forge, origin, tmp_path / "attempt2")
    gitops.create_branch(second, branch)
    (second / "b.txt").write_text("attempt 2\n")
    sha2 = gitops.commit_all(second, "attempt 2", *AUTHOR)
    assert gitops.push(second, branch) == sha2
    assert forge.branch_sha(origin, branch) == sha2
    with pytest.raises(ForgeError):
        forge.read_file(origin, branch, "a.txt")

    # non-ccc branches are never forced
    gitops.create_branch(first, "feature")
    gitops.push(first, "feature")
    gitops.create_branch(second, "feature")
    with pytest.raises(PushRejected):
        gitops.push(second, "feature")


def test_lease_protects_against_a_concurrent_writer(
    forge: LocalForge, origin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    branch = "ccc/task-x-race"
    a = _clone(forge, origin, tmp_path / "a")
    b = _clone(forge, origin, tmp_path / "b")
    for repo, name in ((a, "a"), (b, "b")):
        gitops.create_branch(repo, branch)
        (repo / f"{name}.txt").write_text(name)
        gitops.commit_all(repo, name, *AUTHOR)
    # b looks at the remote (branch absent), then a pushes before b does
    real_out = gitops.git_output

    def racing_out(cwd, *args, env=None):
        result = real_out(cwd, *args, env=env)
        if args[0] == "ls-remote" and Path(cwd) == b:
            gitops.push(a, branch)
        return result

    monkeypatch.setattr(gitops, "git_output", racing_out)
    with pytest.raises(PushRejected):
        gitops.push(b, branch)


def test_git_errors_are_clear_and_redacted(tmp_path: Path) -> None:
    with pytest.raises(gitops.GitOperationError) as err:
        gitops.clone("https://user:hunter2@127.0.0.1:9/nope.git", tmp_path / "x")
    assert "hunter2" not in str(err.value) and err.value.retryable
    with pytest.raises(gitops.GitOperationError):
        gitops.create_branch(tmp_path, "bad..name")


def test_hooks_written_into_the_clone_do_not_run(forge: LocalForge, origin: str, tmp_path: Path) -> None:
    work = _clone(forge, origin, tmp_path / "work")
    marker = tmp_path / "hook-ran"
    hook = work / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    (work / "x.txt").write_text("x")
    gitops.commit_all(work, "x", *AUTHOR)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("task_id", "title", "expected"),
    [
        ("acme_app-7", "Fix the add() bug!", "ccc/task-acme_app-7-fix-the-add-bug"),
        ("t-1", "Café: ünïcode  déjà vu", "ccc/task-t-1-cafe-unicode-deja-vu"),
        ("t-1", "!!!", "ccc/task-t-1-change"),
        ("t-1", "", "ccc/task-t-1-change"),
        ("t-1", "中文标题", "ccc/task-t-1-change"),
        ("t-1", "a" * 60, "ccc/task-t-1-" + "a" * 40),
        ("t-1", "Make the scheduler honour clearance levels when assigning tasks",
         "ccc/task-t-1-make-the-scheduler-honour-clearance"),
    ],
)
def test_branch_name(task_id: str, title: str, expected: str, tmp_path: Path) -> None:
    name = gitops.branch_name(task_id, title)
    assert name == expected
    assert len(name.split("-", 2)[-1]) <= 60
    assert gitops.run_git(tmp_path, "check-ref-format", "--branch", name)[0] == 0


# -- repository analysis -------------------------------------------------------------
def _files(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({".ccc/test-command": "# comment\n./run-tests.sh --fast 'a b'\n", "go.mod": "module x\n"},
         ["./run-tests.sh", "--fast", "a b"]),
        ({"pyproject.toml": "[tool.pytest.ini_options]\n"}, ["python", "-m", "pytest", "-q"]),
        ({"setup.cfg": "[tool:pytest]\n"}, ["python", "-m", "pytest", "-q"]),
        ({"pytest.ini": "[pytest]\n"}, ["python", "-m", "pytest", "-q"]),
        ({"tests/test_x.py": "def test(): pass\n"}, ["python", "-m", "pytest", "-q"]),
        ({"pyproject.toml": "[project]\nname='x'\n",
          "package.json": json.dumps({"scripts": {"test": "jest"}})},
         ["npm", "test", "--silent"]),
        ({"package.json": json.dumps({"scripts": {"test": "echo \"Error: no test specified\" && exit 1"}}),
          "Makefile": "build:\n\tcc x.c\n\ntest: build\n\t./x\n"}, ["make", "test"]),
        ({"Makefile": "TEST := 1\ntest:=x\nall:\n\techo\n", "go.mod": "module x\n"}, ["go", "test", "./..."]),
        ({"Cargo.toml": "[package]\n"}, ["cargo", "test"]),
        ({"README.md": "hi\n"}, None),
    ],
)
def test_detect_test_command(files: dict[str, str], expected: list[str] | None, tmp_path: Path) -> None:
    assert gitops.detect_test_command(_files(tmp_path / "repo", files)) == expected


def test_languages(tmp_path: Path) -> None:
    repo = _files(tmp_path / "repo", {
        "a.py": "", "pkg/b.py": "", "pkg/c.PY": "", "web/app.ts": "", "web/x.tsx": "", "main.go": "",
        "README.md": "", "data.json": "{}", "node_modules/lib/index.js": "", ".venv/lib/site.py": "",
        "venv2/pyvenv.cfg": "", "venv2/lib/x.py": "", "build_out/gen.js": "", ".gitignore": "build_out/\n",
    })
    assert gitops.languages(repo) == {"Python": 3, "TypeScript": 2, "Go": 1, "Markdown": 1, "JavaScript": 1}
    gitops.run_git(repo, "init", "-q")  # a git repo: .gitignore is honoured
    assert gitops.languages(repo) == {"Python": 3, "TypeScript": 2, "Go": 1, "Markdown": 1}


# -- local forge ---------------------------------------------------------------------
def test_forge_repos(forge: LocalForge, origin: str, tmp_path: Path) -> None:
    assert forge.repo_path(origin) == forge.root / "acme" / "app.git"
    assert forge.clone_url(origin).startswith("file://")
    assert forge.branches(origin) == ["main"]
    assert forge.read_file(origin, "main", "README.md") == "# app\n"
    assert forge.default_branch(origin) == "main"
    for call in (lambda: forge.branches("acme/missing"), lambda: forge.clone_url("nobody/x"),
                 lambda: forge.read_file(origin, "nope", "README.md"),
                 lambda: forge.read_file(origin, "main", "missing.txt"),
                 lambda: forge.create_repo(origin, {}), lambda: forge.repo_path("../etc"),
                 lambda: forge.create_repo("acme/evil", {"../x": "y"})):
        with pytest.raises(ForgeError):
            call()
    err = pytest.raises(ForgeError, forge.branches, "acme/missing").value
    assert "unknown repository 'acme/missing'" in str(err)

    src = tmp_path / "src"
    src.mkdir()
    gitops.run_git(src, "init", "-q", "-b", "trunk")
    (src / "x.py").write_text("x = 1\n")
    gitops.commit_all(src, "first", *AUTHOR)
    forge.import_repo("local/imported", src)
    assert forge.default_branch("local/imported") == "trunk"
    assert forge.branches("imported") == ["trunk"]
    clone = _clone(forge, "local/imported", tmp_path / "clone")
    assert (clone / "x.py").read_text() == "x = 1\n" and gitops.default_branch(clone) == "trunk"


def _branch_with(forge: LocalForge, repo: str, tmp: Path, branch: str, files: dict[str, str]) -> str:
    work = _clone(forge, repo, tmp / branch.replace("/", "_"))
    gitops.create_branch(work, branch)
    _files(work, files)
    gitops.commit_all(work, f"change on {branch}", *AUTHOR)
    return gitops.push(work, branch)


def test_forge_merge_fast_forward_and_merge_commit(forge: LocalForge, origin: str, tmp_path: Path) -> None:
    sha1 = _branch_with(forge, origin, tmp_path, "ccc/task-1-one", {"one.txt": "1\n"})
    _branch_with(forge, origin, tmp_path, "ccc/task-2-two", {"two.txt": "2\n"})
    assert forge.merge(origin, "ccc/task-1-one", message="Merge task 1") == sha1  # fast-forward
    assert forge.branch_sha(origin, "main") == sha1
    merged = forge.merge(origin, "ccc/task-2-two", message="Merge task 2")  # main moved: merge commit
    assert forge.branch_sha(origin, "main") == merged != sha1
    head = _log(forge.repo_path(origin), "-1", "main")[0].split("|")
    assert head[0] == "Merge task 2" and len(head[3].split()) == 2
    assert forge.read_file(origin, "main", "one.txt") == "1\n"
    assert forge.read_file(origin, "main", "two.txt") == "2\n"
    assert forge.merge(origin, "ccc/task-2-two", message="again") == merged  # already merged: no-op

    assert forge.delete_branch(origin, "ccc/task-1-one") is True
    assert forge.delete_branch(origin, "ccc/task-1-one") is False
    assert "ccc/task-1-one" not in forge.branches(origin)
    with pytest.raises(ForgeError):
        forge.delete_branch(origin, "main")
    with pytest.raises(ForgeError):
        forge.merge(origin, "ccc/gone", message="x")


def test_forge_merge_conflict(forge: LocalForge, origin: str, tmp_path: Path) -> None:
    _branch_with(forge, origin, tmp_path, "ccc/task-1-a", {"app/calc.py": "def add(a, b):\n    return 1\n"})
    _branch_with(forge, origin, tmp_path, "ccc/task-2-b", {"app/calc.py": "def add(a, b):\n    return 2\n"})
    main_before = forge.merge(origin, "ccc/task-1-a", message="merge a")
    with pytest.raises(MergeConflict) as err:
        forge.merge(origin, "ccc/task-2-b", message="merge b")
    assert err.value.files == ["app/calc.py"] and not err.value.retryable
    assert forge.branch_sha(origin, "main") == main_before  # nothing half-merged was pushed
