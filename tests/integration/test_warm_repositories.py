"""Warm repositories (infra.adapters.git.mirrors) on real git: an agent's mirror per
repository, cloned on first use and fetched after; workspaces made from it (a warm
checkout taken, or one built) that are complete, independent checkouts; two tasks of one
repository at once; a fetch killed half way and a mirror that fails ``git fsck``,
recovered; the sandboxed model's git working on the borrowed objects, read-only; and the
waste the workbench no longer makes (one snapshot of the files per round, no
``file://`` pack pass, a finished task keeping only its logs)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest

from actors.pipeline import PipelineSettings, run_pipeline
from events.errors import ConfigError
from events.task import IssueRef
from events.task_state import TaskState
from events.work import CodeOutcome, CodeRequest
from events.work_reports import ImplementationProduced, PullRequestOpened
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from infra.adapters.git import gitops
from infra.adapters.git.mirrors import Mirror, local_source, mirror_name, parse_sparse
from infra.adapters.git.sandbox import BwrapSandbox, NoSandbox
from infra.adapters.git.workbench import GitWorkbench
from infra.adapters.git.workspace import Workspace
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from tests.conftest import eventually

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("isolated_git")]

REPO = "acme/app"
ROOT = Path(__file__).resolve().parents[2]
FILES = {"app.py": "X = 1\n", "README.md": "# app\n", "src/a/one.py": "A = 1\n", "src/b/two.py": "B = 2\n",
         "docs/guide.md": "guide\n"}
AUTHOR = ("ccc agent", "agent@ccc.local")


@pytest.fixture
def forge(tmp_path: Path) -> LocalForge:
    f = LocalForge(tmp_path / "forge")
    f.create_repo(REPO, FILES)
    return f


def push(forge: LocalForge, tmp: Path, files: dict[str, str], message: str = "change") -> str:
    """Someone's commit on the forge's main."""
    work = tmp / f"push-{message.replace(' ', '-')}"
    gitops.run_git(tmp, "clone", "-q", str(forge.repo_path(REPO)), str(work))
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    gitops.run_git(work, "add", "-A")
    gitops.run_git(work, "commit", "-q", "-m", message, env=gitops.identity_env("someone", "s@x"))
    gitops.run_git(work, "push", "-q", "origin", "HEAD:main")
    shutil.rmtree(work)
    return forge.branch_sha(REPO, "main")


def mirror_of(root: Path, forge: LocalForge, agent: str = "agent-1") -> Mirror:
    url = forge.clone_url(REPO)
    return Mirror(root / agent / "mirrors" / mirror_name(url), url)


def checkout(wb: GitWorkbench, forge: LocalForge, task: str, agent: str = "agent-1") -> Workspace:
    ws = wb.create_workspace(agent, task, {"repo": REPO})
    wb.clone(forge.clone_url(REPO), ws.repo_dir)
    return ws


def fsck_clean(git_dir: Path) -> None:
    status, out, err = gitops.run_git(git_dir, "fsck", "--no-progress", "--no-dangling", check=False)
    assert status == 0 and not out.strip(), (out, err)


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


# -- the mirror ------------------------------------------------------------------------
def test_first_use_clones_the_mirror_then_each_task_fetches_and_takes_a_warm_checkout(forge, tmp_path):
    mirror = mirror_of(tmp_path / "ws", forge)
    first = mirror.check_out(tmp_path / "w1")
    assert first.cloned and not first.warm and first.sha == forge.branch_sha(REPO, "main")
    assert first.objects == mirror.path / "g1.git" / "objects"
    # the workspace borrows the mirror's objects, and is otherwise a clone of its own
    assert (tmp_path / "w1" / ".git" / "objects" / "info" / "alternates").read_text().strip() == str(first.objects)
    assert gitops.git_output(tmp_path / "w1", "status", "--porcelain") == ""
    assert mirror.refill(1) == 1 and mirror.refill(1) == 0  # one warm checkout, no more
    moved = push(forge, tmp_path, {"app.py": "X = 2\n", "new.py": "N = 1\n"}, "move")
    second = mirror.check_out(tmp_path / "w2")
    assert not second.cloned and second.warm and second.sha == moved  # fetched, not cloned again
    assert {p.name for p in mirror.path.glob("g*.git")} == {"g1.git"}
    w2 = tmp_path / "w2"
    assert (w2 / "app.py").read_text() == "X = 2\n" and (w2 / "new.py").read_text() == "N = 1\n"
    assert gitops.git_output(w2, "status", "--porcelain") == ""  # index and files agree
    assert gitops.git_output(w2, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert gitops.git_output(w2, "rev-parse", "origin/main") == moved
    assert mirror._spares(mirror.path / "g1.git") == []  # taken
    third = mirror.check_out(tmp_path / "w3")  # none ready: built from the mirror
    assert not third.warm and third.sha == moved
    for w in ("w1", "w2", "w3"):
        fsck_clean(tmp_path / w)
    fsck_clean(mirror.path / "g1.git")
    assert (mirror.path / "lock").read_text() == ""  # released in order


def test_the_workbench_clones_from_the_mirror_without_a_pack_pass(forge, tmp_path, monkeypatch):
    """A file:// URL would make git pack every object again; the mirror is cloned from
    the path (object files linked) and the workspace from the mirror."""
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox())
    ws = checkout(wb, forge, "acme_app-1")
    assert wb.settle(30)  # the warm checkout built after it too
    monkeypatch.delenv("GIT_TRACE")
    text = trace.read_text()
    assert "pack-objects" not in text  # (upload-pack lists the refs; no object is packed)
    assert "clone -q --bare -- " + str(forge.repo_path(REPO)) in text
    assert gitops.git_output(ws.repo_dir, "remote", "get-url", "origin") == forge.clone_url(REPO)
    [objects] = ws.read_metadata()["git_objects"]
    assert Path(objects).parent.parent == mirror_of(tmp_path / "ws", forge).path
    assert ws.borrowed_objects() == [Path(objects)]
    assert local_source(forge.clone_url(REPO)) == str(forge.repo_path(REPO))
    assert local_source("https://github.com/acme/app.git") == "https://github.com/acme/app.git"


def test_two_tasks_of_one_repository_at_once(forge, tmp_path):
    """Capacity 2, one repository: the mirror's lock orders the fetches; each gets a
    checkout of its own (the warm one, or one built), and they stay apart."""
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox())
    checkout(wb, forge, "acme_app-0")  # the mirror and a warm checkout exist
    assert wb.settle(30)
    head = push(forge, tmp_path, {"app.py": "X = 3\n"}, "concurrent")
    start = threading.Barrier(2)
    made: dict[str, Workspace] = {}
    errors: list[BaseException] = []

    def task(tid: str) -> None:
        try:
            start.wait(10)
            made[tid] = checkout(wb, forge, tid)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=task, args=(f"acme_app-{i}",)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    a, b = made["acme_app-1"].repo_dir, made["acme_app-2"].repo_dir
    for repo in (a, b):
        assert gitops.head_sha(repo) == head and (repo / "app.py").read_text() == "X = 3\n"
        assert gitops.git_output(repo, "status", "--porcelain") == ""
    # what one does is not the other's, nor the mirror's
    (a / "app.py").write_text("X = 4\n")
    gitops.run_git(a, "commit", "-qam", "mine", env=gitops.identity_env("m", "m@m"))
    assert (b / "app.py").read_text() == "X = 3\n" and gitops.head_sha(b) == head
    mirror = mirror_of(tmp_path / "ws", forge)
    assert gitops.git_output(mirror.path / "g1.git", "rev-parse", "main") == head
    assert wb.changed_files(a) == ["app.py"] and wb.changed_files(b) == []
    assert wb.settle(30)
    fsck_clean(mirror.path / "g1.git")


_CHILD = """
import sys
from pathlib import Path
from infra.adapters.git.mirrors import Mirror
Mirror(Path(sys.argv[1]), sys.argv[2]).check_out(Path(sys.argv[3]))
"""


async def test_a_fetch_killed_half_way_is_recovered(forge, tmp_path):
    """An agent killed in the middle of a fetch (SIGKILL to its process group, the fetch
    with it) leaves its lock file naming it, the fetch marker, and git's own lock file;
    the next task finds the mirror doubtful, cleans up, checks it and goes on."""
    mirror = mirror_of(tmp_path / "ws", forge)
    mirror.check_out(tmp_path / "w1")
    gen = mirror.path / "g1.git"
    head = push(forge, tmp_path, {"app.py": "X = 5\n"}, "during crash")
    hang = tmp_path / "hang-upload-pack"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    gitops.run_git(gen, "config", "remote.origin.uploadpack", str(hang))  # the forge stops answering
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(mirror.path), forge.clone_url(REPO), str(tmp_path / "w-crashed"),
        cwd=ROOT, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        await eventually(lambda: (gen / "ccc-fetching").exists(), timeout=30)
        assert (mirror.path / "lock").read_text().split()[0] == str(child.pid)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        await child.wait()
    (gen / "packed-refs.lock").write_text("")  # what a git killed while writing refs leaves
    gitops.run_git(gen, "config", "--unset", "remote.origin.uploadpack")

    recovered = mirror.check_out(tmp_path / "w2")
    assert recovered.repaired and not recovered.cloned and recovered.sha == head
    assert not (gen / "ccc-fetching").exists() and not (gen / "packed-refs.lock").exists()
    assert not (mirror.path / "doubtful").exists() and (mirror.path / "lock").read_text() == ""
    assert (tmp_path / "w2" / "app.py").read_text() == "X = 5\n"
    fsck_clean(gen)


def test_a_mirror_that_fails_fsck_is_cloned_again_and_the_old_one_kept_while_borrowed(forge, tmp_path):
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox(), spares=0)
    old = checkout(wb, forge, "acme_app-1")  # borrows g1, still running
    mirror = mirror_of(tmp_path / "ws", forge)
    g1 = mirror.path / "g1.git"
    # a crash mid-fetch that also lost the objects: the check fails
    (g1 / "ccc-fetching").write_text("4242 0\n")
    for pack in (g1 / "objects").rglob("*"):
        if pack.is_file() and pack.parent.name != "info":
            pack.chmod(0o644)
            pack.unlink()
    new = checkout(wb, forge, "acme_app-2")
    g2 = mirror.path / "g2.git"
    assert new.read_metadata()["git_objects"] == [str(g2 / "objects")]
    assert (mirror.path / "current").read_text().strip() == "g2.git"
    fsck_clean(g2)
    assert gitops.head_sha(new.repo_dir) == forge.branch_sha(REPO, "main")
    # the clean-up keeps g1 while the first task borrows it, and removes it after
    wb.remove_expired("agent-1", 3600)
    assert g1.is_dir()
    wb.finish_workspace("agent-1", "acme_app-1", "done")
    wb.remove_expired("agent-1", 3600)
    assert not g1.exists() and g2.is_dir()
    assert old.metadata_path.is_file()


def test_an_unused_mirror_is_removed_after_its_retention(forge, tmp_path):
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox(), mirror_retention=0.0)
    checkout(wb, forge, "acme_app-1")
    assert wb.settle(30)
    mirror = mirror_of(tmp_path / "ws", forge)
    wb.remove_expired("agent-1", 3600)
    assert (mirror.path / "g1.git").is_dir()  # borrowed by the unfinished workspace
    wb.finish_workspace("agent-1", "acme_app-1", "done")
    wb.remove_expired("agent-1", 3600)
    assert not any(mirror.path.glob("g*.git")) and not (mirror.path / "current").exists()
    assert names(mirror.spares_dir) == set()
    assert gitops.head_sha(checkout(wb, forge, "acme_app-2").repo_dir) == forge.branch_sha(REPO, "main")


# -- independence and clean-up ------------------------------------------------------------
def test_a_finished_workspace_keeps_its_logs_and_leaves_the_mirror_consistent(forge, tmp_path):
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox())
    ws = checkout(wb, forge, "acme_app-1")
    (ws.logs_dir / "tests.log").write_text("ok\n")
    # the model does what it likes with its own git: branches, commits, gc, config
    repo = ws.repo_dir
    gitops.run_git(repo, "checkout", "-qb", "scratch")
    (repo / "app.py").write_text("X = 9\n")
    gitops.run_git(repo, "commit", "-qam", "model", env=gitops.identity_env("m", "m@m"))
    gitops.run_git(repo, "gc", "-q")
    gitops.run_git(repo, "config", "remote.origin.url", "/elsewhere")
    mirror = mirror_of(tmp_path / "ws", forge)
    g1 = mirror.path / "g1.git"
    refs_before = gitops.git_output(g1, "for-each-ref")
    wb.finish_workspace("agent-1", "acme_app-1", "pr_opened")
    assert names(ws.path) == {"metadata.json", "logs"} and (ws.logs_dir / "tests.log").read_text() == "ok\n"
    meta = ws.read_metadata()
    assert meta["outcome"] == "pr_opened" and meta["finished_at"] and meta["kept"] == ["metadata.json", "logs"]
    assert wb.settle(30)
    assert names(tmp_path / "ws" / "agent-1" / "trash") == set()  # deleted in the background
    # the mirror: nothing of the workspace registered in it, refs as the forge's, sound
    assert gitops.git_output(g1, "for-each-ref") == refs_before
    assert gitops.git_output(g1, "worktree", "list", "--porcelain").count("worktree ") == 1
    fsck_clean(g1)
    # a warm checkout was made meanwhile, from the mirror alone
    [spare] = mirror._spares(g1)
    fsck_clean(spare)
    assert gitops.git_output(spare, "status", "--porcelain") == ""
    # and after the retention the rest goes
    assert wb.remove_expired("agent-1", 0.0) == [ws.path]


async def test_the_sandboxed_model_git_works_on_borrowed_objects_read_only(forge, tmp_path):
    for tool in ("bwrap", "prlimit"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the sandbox tests need it (bash .ci/system-deps.sh)")
    wb = GitWorkbench(tmp_path / "ws", sandbox=BwrapSandbox())
    wb.prepare()
    ws = checkout(wb, forge, "acme_app-1")
    [objects] = ws.borrowed_objects()
    r = await ws.run(["git", "log", "-1", "--format=%s"], timeout=60)
    assert r.exit_code == 0 and r.output.strip() == "initial commit", r.output
    r = await ws.run("git status --porcelain && git fsck --no-progress --connectivity-only && echo fine", timeout=60)
    assert r.exit_code == 0 and r.output.strip().endswith("fine"), r.output
    # the model's git writes its own objects, never the mirror's
    r = await ws.run("echo 'X = 7' > app.py && git -c user.name=m -c user.email=m@m commit -qam model && "
                     "git cat-file -t HEAD", timeout=60)
    assert r.exit_code == 0 and r.output.strip() == "commit", r.output
    r = await ws.run(["touch", f"{objects}/planted"], timeout=60)
    assert r.exit_code != 0 and "Read-only file system" in r.output
    assert not (objects / "planted").exists()
    # the control: without the binding the clone's objects are out of the sandbox's reach
    ws.update_metadata(git_objects=[])
    r = await ws.run(["git", "cat-file", "-e", "HEAD~1"], timeout=60)
    assert r.exit_code != 0
    ws.update_metadata(git_objects=[str(objects)])
    # a path the metadata names outside the workspaces' root is never bound
    ws.update_metadata(git_objects=[str(tmp_path / "home"), str(objects)])
    (tmp_path / "home").mkdir(exist_ok=True)
    assert ws.borrowed_objects() == [objects]


def test_sparse_checkout_when_the_repository_asks_for_it(forge, tmp_path):
    push(forge, tmp_path, {".ccc/sparse": "# what the agents need\nsrc/a\n"}, "sparse")
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox())
    ws = checkout(wb, forge, "acme_app-1")
    repo = ws.repo_dir
    on_disk = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert on_disk == {"app.py", "README.md", ".ccc/sparse", "src/a/one.py"}  # top-level files and src/a
    assert len(gitops.git_output(repo, "ls-files").splitlines()) == 6  # the rest is in the index
    assert wb.languages(repo) == {"Python": 3, "Markdown": 2}
    # the change: an edit in the cone and a new file anywhere; what is not on disk is not deleted
    wb.create_branch(repo, "ccc/task-acme_app-1-sparse")
    (repo / "src" / "a" / "one.py").write_text("A = 2\n")
    (repo / "src" / "c").mkdir(parents=True)
    (repo / "src" / "c" / "new.py").write_text("C = 3\n")
    assert wb.commit_all(repo, "sparse change", *AUTHOR)
    assert wb.changed_files(repo) == ["src/a/one.py", "src/c/new.py"]
    wb.push(repo, "ccc/task-acme_app-1-sparse")
    assert forge.read_file(REPO, "ccc/task-acme_app-1-sparse", "src/b/two.py") == "B = 2\n"
    # a warm checkout is sparse too
    assert wb.settle(30)
    ws2 = checkout(wb, forge, "acme_app-2")
    assert not (ws2.repo_dir / "src" / "b").exists() and (ws2.repo_dir / "src" / "a" / "one.py").is_file()


def test_a_bad_sparse_file_is_refused_with_the_line(forge, tmp_path):
    assert parse_sparse("# c\nsrc/a/\n\nlib\n") == ("src/a", "lib")
    for bad in ("../up", "/abs", "src/*.py", "-x", "a//b"):
        with pytest.raises(ConfigError, match="line 1"):
            parse_sparse(bad + "\n")
    push(forge, tmp_path, {".ccc/sparse": "src/a\n../etc\n"}, "bad sparse")
    wb = GitWorkbench(tmp_path / "ws", sandbox=NoSandbox())
    ws = wb.create_workspace("agent-1", "acme_app-1", {})
    with pytest.raises(ConfigError, match=r"\.ccc/sparse: line 2: '\.\./etc'"):
        wb.clone(forge.clone_url(REPO), ws.repo_dir)


# -- the waste on a round --------------------------------------------------------------
class EditingCoder:
    name = "editing"

    async def implement(self, request: CodeRequest, workspace) -> CodeOutcome:
        (Path(request.repo_dir) / "app.py").write_text("X = 42\n")
        return CodeOutcome(summary="set X", status="done")


async def test_an_implement_round_snapshots_the_files_once(nc, ns, store, forge, tmp_path, monkeypatch):
    """``git add -A`` walks the whole work tree: once per round (the commit); the files,
    diff and stat the round reports are read from that commit."""
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    reports: list = []

    async def report(body) -> None:
        reports.append(body)

    issue = IssueRef(source="local", repo=REPO, number=1, title="Set X", body="X must be 42")
    from datetime import UTC, datetime
    now = datetime(2026, 1, 1, tzinfo=UTC)
    task = TaskState(task_id="acme_app-1", status="assigned", version=3, issue=issue, created_at=now,
                     updated_at=now, agent_id="agent-1")
    wb = GitWorkbench(tmp_path / "ws")
    await run_pipeline(agent_id="agent-1", task=task, settings=PipelineSettings(test_timeout=60), workbench=wb,
                       coder=EditingCoder(), forge=LocalForgeClient(forge.root),
                       artifacts=ObjectStoreArtifacts(nc, ns.artifacts_bucket), report=report)
    monkeypatch.delenv("GIT_TRACE")
    adds = [line for line in trace.read_text().splitlines() if "built-in: git add" in line]
    assert len(adds) == 1, adds
    [produced] = [r for r in reports if isinstance(r, ImplementationProduced)]
    assert produced.files_changed == ("app.py",) and "1 file changed" in produced.diff_stat
    [opened] = [r for r in reports if isinstance(r, PullRequestOpened)]
    assert forge.read_file(REPO, opened.branch, "app.py") == "X = 42\n"
    await asyncio.to_thread(wb.settle, 30)
