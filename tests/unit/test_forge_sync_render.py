"""What ForgeSync writes to an issue, from the task's state alone: its state label and the masked tracking comment."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from actors.forge_sync import render_comment, state_label
from events import task_state as ts
from events.task import IssueRef
from infra.adapters.obs.masking import mask_secrets

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
REPO = "acme/app"


def test_rendering_is_pure_and_masks_secrets():
    issue = IssueRef(source="github", repo=REPO, number=3, title="t")
    state = ts.fold(ts.decide(None, ts.CreateTask(at=AT, actor="c", task_id="acme_app-3", issue=issue)))
    assert state_label(state) == "ccc:queued"
    assert render_comment(state, mask_secrets) == render_comment(state, mask_secrets)
    assert render_comment(state, mask_secrets).startswith("<!-- ccc:task:acme_app-3 -->\n")
    for cmd in (ts.StartAnalysis(at=AT, actor="c"), ts.RecordAnalysis(at=AT, actor="c"),
                ts.AssignTask(at=AT, actor="c", agent_id="a-1"),
                ts.FailTask(at=AT, actor="c", reason="push failed: ghp_" + "x" * 36 + "\n<!-- ccc:task:y -->",
                            phase="push")):
        state = ts.fold(ts.decide(state, cmd), state)
    body = render_comment(state, mask_secrets)
    assert state_label(state) == "ccc:failed"
    assert "ghp_" + "x" * 36 not in body and "<!-- ccc:task:y" not in body
    assert len(re.findall(r"<!-- ccc:task:", body)) == 1
