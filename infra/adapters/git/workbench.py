"""Where an agent works on repositories, as the pipeline sees it (``actors.ports.Workbench``):
task workspaces under one root directory, git on their clones (:mod:`gitops`), and the
repository's own tests (how to run them, and the counts their output reports).

Only the root is state here; every call goes to the module that owns the concept.
The git and file-system calls block: the pipeline runs the slow ones in a thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from events.work import TestCounts

from infra.adapters.git import gitops
from infra.adapters.git.cleanup import cleanup_expired
from infra.adapters.git.test_output import parse_test_counts
from infra.adapters.git.workspace import Workspace


class GitWorkbench:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- task workspaces ---------------------------------------------------------------
    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def create_workspace(self, agent_id: str, task_id: str, metadata: Mapping[str, Any]) -> Workspace:
        return Workspace.create(self.root, agent_id, task_id, metadata)

    def finish_workspace(self, agent_id: str, task_id: str, outcome: str) -> None:
        Workspace.open(self.root, agent_id, task_id).mark_finished(outcome=outcome)

    def remove_expired(self, agent_id: str, retention: float) -> list[Path]:
        return cleanup_expired(self.root, agent_id, retention)

    # -- git on a workspace's clone --------------------------------------------------------
    def clone(self, url: str, dest: Path, *, env: Mapping[str, str] | None = None) -> object:
        return gitops.clone(url, dest, env=env)

    def default_branch(self, repo_dir: Path) -> str:
        return gitops.default_branch(repo_dir)

    def head_sha(self, repo_dir: Path) -> str | None:
        return gitops.head_sha(repo_dir)

    def branch_name(self, task_id: str, title: str) -> str:
        return gitops.branch_name(task_id, title)

    def create_branch(self, repo_dir: Path, name: str) -> None:
        gitops.create_branch(repo_dir, name)

    def changed_files(self, repo_dir: Path) -> list[str]:
        return gitops.changed_files(repo_dir)

    def diff(self, repo_dir: Path) -> str:
        return gitops.diff(repo_dir)

    def diff_stat(self, repo_dir: Path) -> str:
        return gitops.diff_stat(repo_dir)

    def commit_all(self, repo_dir: Path, message: str, author_name: str, author_email: str) -> str:
        return gitops.commit_all(repo_dir, message, author_name, author_email)

    def push(self, repo_dir: Path, branch: str, *, env: Mapping[str, str] | None = None) -> str:
        return gitops.push(repo_dir, branch, env=env)

    # -- what kind of repository this is, and its own tests --------------------------------
    def languages(self, repo_dir: Path) -> dict[str, int]:
        return gitops.languages(repo_dir)

    def detect_test_command(self, repo_dir: Path) -> list[str] | None:
        return gitops.detect_test_command(repo_dir)

    def test_counts(self, output: str) -> TestCounts:
        return parse_test_counts(output)
