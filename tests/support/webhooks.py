"""Real GitHub webhook payloads (tests/fixtures/webhooks) and the small edits the webhook
tests make to them: shared by the pure translation tests and the HTTP ones."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from events.subjects import task_id_for
from infra.adapters.git.gitops import branch_name

WEBHOOKS = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"

SECRET = "It's a Secret to Everybody"
REPO = "Codertocat/Hello-World"
BRANCH = branch_name(task_id_for(REPO, 1, "github"), "Spelling error in the README file")
_LOADED: dict[str, dict] = {}
DELIVERED_AT = datetime(2019, 5, 15, 15, 25, tzinfo=UTC)
"""When the receivers in the tests "receive" the real payloads: minutes after they were
made (2019-05-15, 15:20-15:21), so they are fresh; the fixtures stay as GitHub sent them."""


def delivered_at() -> datetime:
    """A receiver's clock (``clock=``) for the real payloads."""
    return DELIVERED_AT


def real(name: str) -> dict:
    """A fresh copy of a real payload from tests/fixtures/webhooks (see its README)."""
    if name not in _LOADED:
        _LOADED[name] = json.loads((WEBHOOKS / f"{name}.json").read_text())
    return copy.deepcopy(_LOADED[name])


def triggered(name: str = "issues.opened") -> dict:
    p = real(name)
    p["issue"]["labels"].append({"name": "ccc"})
    return p


def on_task_branch(name: str) -> dict:
    p = real(name)
    p["pull_request"]["head"]["ref"] = BRANCH
    return p


def comment(body: str, **comment_fields: Any) -> dict:
    p = real("issue_comment.created")
    p["comment"]["body"] = body
    p["comment"].update(comment_fields)
    return p


def only(events: list) -> Any:
    assert len(events) == 1, events
    return events[0]


# -- a pull request's way to green (issue 12) ----------------------------------------------
def task_branch(repo: str = REPO, number: int = 1, title: str = "Spelling error in the README file") -> str:
    """The cluster's branch for GitHub issue ``number`` of ``repo`` (gitops.branch_name)."""
    return branch_name(task_id_for(repo, number, "github"), title)


def ci_on_task_branch(name: str, *, sha: str | None = None, number: int = 1) -> dict:
    """A real ``check_run`` / ``check_suite`` / ``workflow_run`` payload moved to a task
    branch of its own repository (issue ``number``), and with ``sha`` to that commit: the
    branch and commit fields, and those of the pull requests it lists, nothing else."""
    p = real(name)
    repo = p["repository"]["full_name"]
    branch = task_branch(repo, number)
    if "check_run" in p:
        run = p["check_run"]
        suite, pulls = run["check_suite"], run["pull_requests"]
        if sha:
            run["head_sha"] = suite["head_sha"] = sha
    elif "check_suite" in p:
        suite = p["check_suite"]
        pulls = suite["pull_requests"]
        if sha:
            suite["head_sha"] = sha
    else:
        suite = p["workflow_run"]
        pulls = suite["pull_requests"]
        if sha:
            suite["head_sha"] = sha
            suite["head_commit"]["id"] = sha
    suite["head_branch"] = branch
    for pr in pulls:
        pr["head"]["ref"] = branch
        if sha:
            pr["head"]["sha"] = sha
    return p


def approved_review() -> dict:
    """The real review, on a task branch, submitted as "approved" (the package has no
    approved example: only ``review.state`` differs)."""
    p = on_task_branch("pull_request_review.submitted")
    p["review"]["state"] = "approved"
    return p


def base_edited(ref: str, sha: str) -> dict:
    """The real ``pull_request.synchronize``, on a task branch, as the ``edited`` GitHub
    sends when someone moves the pull request to base ``ref`` (at ``sha``): ``action``,
    ``changes`` and the new ``base``; no ``before``/``after`` (a push's fields)."""
    p = on_task_branch("pull_request.synchronize")
    old = p["pull_request"]["base"]
    p["action"] = "edited"
    del p["before"], p["after"]
    p["changes"] = {"base": {"ref": {"from": old["ref"]}, "sha": {"from": old["sha"]}}}
    p["pull_request"]["base"] = {**old, "ref": ref, "sha": sha, "label": f"Codertocat:{ref}"}
    return p


def pushed(branch: str, after: str, before: str = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e") -> dict:
    """A ``push`` of ``after`` to ``branch`` of the fixtures' repository, shaped as GitHub
    documents the event (the package's push example is not among the fixtures): built from
    the real payloads' repository and sender. As in every push payload, the repository's
    ``created_at`` and ``pushed_at`` are epoch seconds, not ISO strings."""
    base = real("pull_request.synchronize")
    repository = base["repository"]
    for key in ("created_at", "pushed_at"):
        repository[key] = int(datetime.fromisoformat(repository[key]).timestamp())
    author = {"name": "Codertocat", "email": "21031067+Codertocat@users.noreply.github.com",
              "username": "Codertocat"}
    commit = {"id": after, "tree_id": "b4a5" + after[4:], "distinct": True, "message": "Update README.md",
              "timestamp": "2019-05-15T15:20:30Z", "url": f"https://github.com/{REPO}/commit/{after}",
              "author": author, "committer": author, "added": [], "removed": [], "modified": ["README.md"]}
    return {"ref": f"refs/heads/{branch}", "before": before, "after": after, "created": False,
            "deleted": False, "forced": False, "base_ref": None,
            "compare": f"https://github.com/{REPO}/compare/{before[:12]}...{after[:12]}",
            "commits": [commit], "head_commit": commit, "repository": repository,
            "pusher": {"name": "Codertocat", "email": author["email"]}, "sender": base["sender"]}
