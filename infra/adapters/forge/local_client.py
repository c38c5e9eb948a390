"""Forge clients for agents: where to clone from, how to authenticate git, and how
to open a pull request. The local forge is the embedded default: bare repositories
on disk; a pull request there is the pushed branch plus its record in the event log
(the ``agent.pr_opened`` report and the task's ``task.pr_opened``)."""

from __future__ import annotations

from pathlib import Path

from infra.adapters.forge.local import LocalForge


class LocalForgeClient:
    name = "local"

    def __init__(self, root: Path | str) -> None:
        self.forge = LocalForge(root)

    def clone_url(self, repo: str) -> str:
        return self.forge.clone_url(repo)

    def git_env(self, repo: str) -> dict[str, str]:
        return {}  # a path on disk needs no credentials

    async def open_pull_request(
        self, *, repo: str, branch: str, base: str, title: str, body: str, draft: bool, issue_number: int
    ) -> tuple[str, int | None]:
        # the branch is already pushed; the record is the event the agent appends next
        url = f"{self.forge.repo_path(repo).as_uri()}?branch={branch}&base={base}"
        return url, issue_number
