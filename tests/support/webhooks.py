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
