"""Real GitHub webhook payloads (tests/fixtures/webhooks) and the small edits the webhook
tests make to them: shared by the pure translation tests and the HTTP ones."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from events.subjects import task_id_for
from infra.adapters.git.gitops import branch_name

WEBHOOKS = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"

SECRET = "It's a Secret to Everybody"
REPO = "Codertocat/Hello-World"
BRANCH = branch_name(task_id_for(REPO, 1), "Spelling error in the README file")
_LOADED: dict[str, dict] = {}


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
