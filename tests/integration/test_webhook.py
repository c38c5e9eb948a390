"""The GitHub webhook receiver: translation of real payloads (pure), and the HTTP app
publishing into a real JetStream (signature, dedup, error statuses), in-process and
under uvicorn on a free port."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import nats.js.errors
import pytest

from events.codec import decode_issue, encode
from events.errors import ConfigError, StoreUnavailable
from events.issue import (
    IssueCancelRequested,
    IssueChangesRequested,
    IssueClosed,
    IssueCommented,
    IssueEdited,
    IssueLabeled,
    IssueOpened,
    IssuePullRequestClosed,
    IssuePullRequestMerged,
    IssueReopened,
    IssueRetryRequested,
    issue_decoder,
)
from events.subjects import task_id_for
from infra.adapters.git.gitops import branch_name
from infra.adapters.nats.issue_publisher import opened_event_id
from infra.adapters.nats.provisioning import provision
from infra.adapters.http.webhook import (
    BadPayload,
    WebhookServer,
    create_webhook_app,
    interpret,
    is_signed,
    mentions,
    nats_publisher,
    sign,
    task_issue_number,
    translate,
    webhook_secret,
)

pytestmark = pytest.mark.timeout(60)

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


# -- the real payloads as they are ---------------------------------------------------------
@pytest.mark.parametrize(("event", "name", "reason"), [
    ("issues", "issues.opened", "no 'ccc' label and no @ccc mention"),
    ("issues", "issues.labeled", "not for @ccc"),
    ("issues", "issues.edited", "not for @ccc"),
    ("issue_comment", "issue_comment.created", "not addressed to @ccc"),
    ("pull_request", "pull_request.closed", "not a task branch"),
    ("pull_request_review", "pull_request_review.submitted", "not changes_requested"),
    ("pull_request_review_comment", "pull_request_review_comment.created", "not a task branch"),
    ("ping", "ping", "not handled"),
])
def test_real_payloads_not_meant_for_the_bot_are_ignored_with_a_reason(event, name, reason):
    result = interpret(event, real(name), "d-1")
    assert result.events == []
    assert reason in result.reason


def test_issue_opened_with_the_trigger_label():
    event = only(translate("issues", triggered(), "d-1"))
    assert event == IssueOpened(
        event_id=f"github:{REPO}#1:opened", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 18, tzinfo=UTC), actor="github:Codertocat",
        title="Spelling error in the README file",
        body="It looks like you accidently spelled 'commit' with two 't's.", labels=("bug", "ccc"),
        url="https://github.com/Codertocat/Hello-World/issues/1", author="Codertocat",
        author_association="OWNER",
    )
    assert event.rel_subject == "issue.github.Codertocat_Hello-World.1.opened"
    assert event.event_id == opened_event_id("github", REPO, 1)  # as the CLI derives it


@pytest.mark.parametrize("text", ["@ccc please fix this", "cc @CCC", "(@ccc)"])
def test_issue_opened_mentioning_the_bot(text):
    p = real("issues.opened")
    p["issue"]["body"] = text
    assert isinstance(only(translate("issues", p, "d-1")), IssueOpened)


@pytest.mark.parametrize("text", ["@ccc-bot fix", "mail me@ccc.io", "> @ccc fix\nquoted", "```\n@ccc\n```"])
def test_near_mentions_quotes_and_code_do_not_trigger(text):
    assert not mentions(text, "ccc")
    p = real("issues.opened")
    p["issue"]["body"] = text
    assert translate("issues", p, "d-1") == []


def test_custom_trigger_label_and_bot_name():
    p = real("issues.opened")
    p["issue"]["labels"].append({"name": "AI-Fix"})
    assert translate("issues", p, "d-1") == []
    assert only(translate("issues", p, "d-1", trigger_label="ai-fix", bot_name="robot")).labels == ("bug", "AI-Fix")


@pytest.mark.parametrize("association", ["CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR", "FIRST_TIMER", "NONE", "MANNEQUIN"])
@pytest.mark.parametrize("action", ["opened", "labeled", "edited", "closed"])
def test_untrusted_issue_authors_are_ignored(association, action):
    p = triggered({"opened": "issues.opened", "labeled": "issues.labeled",
                   "edited": "issues.edited", "closed": "issues.reopened"}[action])
    p["action"] = action
    p["issue"]["author_association"] = association
    result = interpret("issues", p, "d-1")
    assert result.events == []
    assert association in result.reason


def test_issues_opened_by_bots_are_ignored():
    p = triggered()
    p["issue"]["user"]["type"] = "Bot"
    assert "is a bot" in interpret("issues", p, "d-1").reason


def test_trigger_label_added_later_starts_work():
    p = real("issues.labeled")
    p["label"]["name"] = "CCC"  # labels compare case-insensitively, as on GitHub
    p["issue"]["labels"].append({"name": "CCC"})
    opened, labeled = translate("issues", p, "d-7")
    assert isinstance(opened, IssueOpened) and opened.event_id == f"github:{REPO}#1:opened"
    assert opened.labels == ("bug", "CCC")
    assert labeled == IssueLabeled(event_id="gh:d-7:1", source="github", repo=REPO, number=1,
                                   occurred_at=opened.occurred_at, actor="github:Codertocat",
                                   label="CCC", labels=("bug", "CCC"))


def test_another_label_on_a_triggered_issue_is_only_a_label():
    p = triggered("issues.labeled")  # the "bug" label added to an issue that has "ccc"
    assert only(translate("issues", p, "d-8")) == IssueLabeled(
        event_id="gh:d-8:0", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 18, tzinfo=UTC), actor="github:Codertocat",
        label="bug", labels=("bug", "ccc"))


def test_edited_closed_reopened():
    edited = only(translate("issues", triggered("issues.edited"), "d-1"))
    assert isinstance(edited, IssueEdited) and edited.title == "Spelling error in the README file"
    reopened = only(translate("issues", real("issues.reopened"), "d-2"))
    assert isinstance(reopened, IssueReopened) and reopened.event_id == "gh:d-2:0"
    p = real("issues.reopened")  # the package has no "closed" example: derive it
    p.update(action="closed")
    p["issue"].update(state="closed", closed_at="2019-05-15T15:30:00Z")
    closed = only(translate("issues", p, "d-3"))  # no label needed: it may be gone by now
    assert isinstance(closed, IssueClosed)
    assert closed.occurred_at == datetime(2019, 5, 15, 15, 30, tzinfo=UTC)
    assert closed.rel_subject == "issue.github.Codertocat_Hello-World.1.closed"


# -- comments ------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "cls", "reason"), [
    ("@ccc retry", IssueRetryRequested, "retry requested by Codertocat"),
    ("@ccc Retry: flaky network", IssueRetryRequested, "flaky network"),
    ("Thanks!\n\n@ccc cancel", IssueCancelRequested, "cancelled by Codertocat"),
    ("@ccc stop, wrong approach", IssueCancelRequested, "wrong approach"),
    ("@ccc retry\nthe runner was down", IssueRetryRequested, "the runner was down"),
])
def test_comment_commands(body, cls, reason):
    event = only(translate("issue_comment", comment(body), "d-c"))
    assert type(event) is cls and event.reason == reason
    assert (event.repo, event.number, event.event_id) == (REPO, 1, "gh:d-c:0")


def test_comment_with_a_free_text_request():
    body = "Looks good so far.\n@ccc please also update the docs"
    event = only(translate("issue_comment", comment(body), "d-c"))
    assert event == IssueCommented(
        event_id="gh:d-c:0", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 21, tzinfo=UTC), actor="github:Codertocat",
        comment_id=492700400, body=body, request="please also update the docs", author="Codertocat",
        author_association="OWNER",
        url="https://github.com/Codertocat/Hello-World/issues/1#issuecomment-492700400",
    )
    assert event.rel_subject == "issue.github.Codertocat_Hello-World.1.commented"


@pytest.mark.parametrize(("change", "reason"), [
    ({"author_association": "CONTRIBUTOR"}, "CONTRIBUTOR"),
    ({"author_association": "NONE"}, "NONE"),
    ({"user": {"login": "ccc[bot]", "type": "Bot"}}, "is a bot"),
    ({"user": {"login": "CCC", "type": "User"}}, "is a bot"),  # the bot's own user account
    ({"body": "> @ccc cancel\nno, keep going"}, "not addressed"),
    ({"body": "@ccc"}, "no request"),
])
def test_comments_not_listened_to(change, reason):
    p = comment("@ccc retry")
    p["comment"].update(change)
    result = interpret("issue_comment", p, "d-c")
    assert result.events == [] and reason in result.reason


def test_comments_on_pull_requests_are_ignored():
    p = comment("@ccc retry")
    p["issue"]["pull_request"] = {"url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/1"}
    assert "pull request" in interpret("issue_comment", p, "d-c").reason


# -- pull requests and reviews ---------------------------------------------------------------
def test_task_branch_parsing_matches_the_branches_the_cluster_pushes():
    for repo, number in [(REPO, 1), ("octo-org/my-app-2", 7), ("a/b", 123)]:
        branch = branch_name(task_id_for(repo, number), "Fix 42 things - now")
        assert task_issue_number(branch, repo) == number
    assert task_issue_number("ccc/task-octo-org_my-app-2-7", "octo-org/my-app-2") == 7
    # the same name in repo my-app is its issue 2 (titled "7 x"): the payload's repo decides
    assert task_issue_number("ccc/task-octo-org_my-app-2-7-x", "octo-org/my-app") == 2
    assert task_issue_number("ccc/task-octo-org_my-app-2-7", "octo-org/other") is None
    assert task_issue_number("changes", REPO) is None
    assert task_issue_number("ccc/task-Codertocat_Hello-World-fix", REPO) is None


def test_pull_request_closed_unmerged_and_merged():
    p = on_task_branch("pull_request.closed")
    assert only(translate("pull_request", p, "d-p")) == IssuePullRequestClosed(
        event_id="gh:d-p:0", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 21, 18, tzinfo=UTC), actor="github:Codertocat",
        pr_number=2, branch=BRANCH)
    p["pull_request"].update(merged=True, merged_at="2019-05-15T15:21:17Z")  # derived: merged
    merged = only(translate("pull_request", p, "d-m"))
    assert isinstance(merged, IssuePullRequestMerged)
    assert (merged.number, merged.pr_number, merged.branch) == (1, 2, BRANCH)
    assert merged.occurred_at == datetime(2019, 5, 15, 15, 21, 17, tzinfo=UTC)


def test_pull_requests_from_forks_never_count():
    p = on_task_branch("pull_request.closed")
    p["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    assert "not a task branch" in interpret("pull_request", p, "d-p").reason
    p["pull_request"]["head"]["repo"] = None  # the fork was deleted
    assert translate("pull_request", p, "d-p") == []


def test_review_requesting_changes():
    p = on_task_branch("pull_request_review.submitted")
    p["review"].update(state="changes_requested", body="Please add a test.")  # derived
    event = only(translate("pull_request_review", p, "d-r"))
    assert event == IssueChangesRequested(
        event_id="gh:d-r:0", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 38, tzinfo=UTC), actor="github:Codertocat",
        pr_number=2, branch=BRANCH, body="Please add a test.", author="Codertocat",
        author_association="OWNER", review_id=237895671,
        url="https://github.com/Codertocat/Hello-World/pull/2#pullrequestreview-237895671")
    assert event.rel_subject == "issue.github.Codertocat_Hello-World.1.changes_requested"
    p["review"]["author_association"] = "CONTRIBUTOR"
    assert translate("pull_request_review", p, "d-r") == []


def test_review_comment_on_a_task_branch():
    event = only(translate("pull_request_review_comment",
                           on_task_branch("pull_request_review_comment.created"), "d-rc"))
    assert isinstance(event, IssueChangesRequested)
    assert (event.number, event.pr_number, event.body, event.path, event.comment_id, event.review_id) == (
        1, 2, "Maybe you should use more emoji on this line.", "README.md", 284312630, 237895671)
    p = on_task_branch("pull_request_review_comment.created")
    p["comment"]["user"]["type"] = "Bot"
    assert translate("pull_request_review_comment", p, "d-rc") == []


def test_new_facts_round_trip_through_the_issue_codec():
    for event in [*translate("issue_comment", comment("@ccc do more"), "d"),
                  *translate("pull_request_review_comment",
                             on_task_branch("pull_request_review_comment.created"), "d")]:
        assert decode_issue(event.rel_subject, encode(event)) == event
    old = b'{"type":"issue.retry_requested","event_id":"x","repo":"a/b","number":1,"occurred_at":"2024-01-01T00:00:00Z"}'
    assert isinstance(issue_decoder.decode(old), IssueRetryRequested)


def test_unknown_events_and_actions_and_bad_payloads():
    assert interpret("star", {"action": "created"}, "d").reason == "not handled: star.created"
    assert interpret("issues", real("issues.opened") | {"action": "pinned"}, "d").events == []
    with pytest.raises(BadPayload):
        translate("issues", [1, 2], "d")
    broken = real("issues.opened")
    del broken["issue"]["number"]
    with pytest.raises(BadPayload, match="number"):
        translate("issues", broken, "d")


def test_signatures():
    body = b'{"zen": "hi"}'
    good = sign(SECRET, body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert is_signed(SECRET, body, good)
    assert not is_signed(SECRET, body + b" ", good)
    assert not is_signed("other", body, good)
    assert not is_signed(SECRET, body, good.removeprefix("sha256="))
    assert not is_signed(SECRET, body, None) and not is_signed("", body, good)
    assert not is_signed(SECRET, body, "sha256=é")


def test_a_secret_is_required():
    with pytest.raises(ConfigError):
        create_webhook_app(lambda e: None, secret="")
    with pytest.raises(ConfigError, match="CCC_WEBHOOK_SECRET"):
        webhook_secret({})
    assert webhook_secret({"CCC_WEBHOOK_SECRET": "s3"}) == "s3"


# -- HTTP ------------------------------------------------------------------------------------
def headers(event: str, body: bytes, delivery: str, *, secret: str | None = SECRET,
            content_type: str = "application/json") -> dict[str, str]:
    h = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "Content-Type": content_type,
         "User-Agent": "GitHub-Hookshot/test"}
    if secret is not None:
        h["X-Hub-Signature-256"] = sign(secret, body)
    return h


def dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


@pytest.fixture
async def hook(nc, ns):
    await provision(nc, ns)
    app = create_webhook_app(nats_publisher(nc, ns), secret=SECRET, is_connected=lambda: nc.is_connected)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hook") as client:
        yield client


async def stream_count(nc, ns) -> int:
    return (await nc.jetstream().stream_info(ns.issues_stream)).state.messages


async def last_issue(nc, ns, subject: str):
    msg = await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject(subject))
    return decode_issue(subject, msg.data)


async def test_signed_delivery_is_published(hook, nc, ns):
    body = dumps(triggered())
    r = await hook.post("/webhook", content=body, headers=headers("issues", body, "72d3162e-1"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "published" and out["action"] == "opened"
    assert out["published"] == [{"event_id": f"github:{REPO}#1:opened", "type": "issue.opened",
                                 "seq": 1, "duplicate": False}]
    event = await last_issue(nc, ns, "issue.github.Codertocat_Hello-World.1.opened")
    assert event == only(translate("issues", triggered(), "72d3162e-1"))


async def test_a_redelivered_webhook_is_a_no_op(hook, nc, ns):
    body = dumps(comment("@ccc retry"))
    h = headers("issue_comment", body, "72d3162e-2")
    first = await hook.post("/", content=body, headers=h)
    again = await asyncio.gather(*(hook.post("/webhook", content=body, headers=h) for _ in range(4)))
    assert [r.status_code for r in (first, *again)] == [200] * 5
    assert [r.json()["published"][0]["duplicate"] for r in again] == [True] * 4
    assert await stream_count(nc, ns) == 1
    assert isinstance(await last_issue(nc, ns, "issue.github.Codertocat_Hello-World.1.retry_requested"),
                      IssueRetryRequested)


async def test_opened_and_labeled_for_one_new_issue_collapse_into_one_opened(hook, nc, ns):
    opened = dumps(triggered())
    labeled = real("issues.labeled")
    labeled["label"]["name"] = "ccc"
    labeled["issue"]["labels"].append({"name": "ccc"})
    labeled = dumps(labeled)
    assert (await hook.post("/webhook", content=opened, headers=headers("issues", opened, "d-o"))).status_code == 200
    r = await hook.post("/webhook", content=labeled, headers=headers("issues", labeled, "d-l"))
    assert [(p["type"], p["duplicate"]) for p in r.json()["published"]] == [
        ("issue.opened", True), ("issue.labeled", False)]
    assert await stream_count(nc, ns) == 2


@pytest.mark.parametrize("case", ["unsigned", "wrong secret", "tampered", "bare hex", "unsigned garbage"])
async def test_bad_signatures_are_refused_before_anything_else(hook, nc, ns, case):
    body = dumps(triggered())
    h = headers("issues", body, "d-bad", secret=None if case.startswith("unsigned") else SECRET)
    if case == "wrong secret":
        h["X-Hub-Signature-256"] = sign("not the secret", body)
    elif case == "bare hex":
        h["X-Hub-Signature-256"] = h["X-Hub-Signature-256"].removeprefix("sha256=")
    elif case == "tampered":
        body = body.replace(b"Spelling", b"Spellinq")
    elif case == "unsigned garbage":
        body = b"{not json"
        del h["X-GitHub-Delivery"]
    r = await hook.post("/webhook", content=body, headers=h)
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized", "detail": "missing or invalid X-Hub-Signature-256"}
    assert await stream_count(nc, ns) == 0


async def test_signed_but_malformed(hook, nc, ns):
    for body, h in [
        (b"{not json", headers("issues", b"{not json", "d-1")),
        (b"[1]", headers("issues", b"[1]", "d-2")),
        (b'{"action": "opened", "issue": {}}', headers("issues", b'{"action": "opened", "issue": {}}', "d-3")),
        (b"{}", {**headers("issues", b"{}", "d-4"), "X-GitHub-Delivery": "a\tb"}),
        (b"{}", {k: v for k, v in headers("issues", b"{}", "d-5").items() if k != "X-GitHub-Event"}),
    ]:
        r = await hook.post("/webhook", content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"] == "bad_request"
    assert await stream_count(nc, ns) == 0


async def test_ignored_deliveries_answer_202_with_the_reason(hook, nc, ns):
    untrusted = triggered()
    untrusted["issue"]["author_association"] = "NONE"
    for event, payload, reason in [
        ("star", {"action": "created", "starred_at": None}, "not handled: star.created"),
        ("issues", untrusted, "is NONE"),
        ("issues", real("issues.opened"), "no 'ccc' label"),
    ]:
        body = dumps(payload)
        r = await hook.post("/webhook", content=body, headers=headers(event, body, "d-i"))
        assert r.status_code == 202
        assert r.json()["status"] == "ignored" and reason in r.json()["reason"]
    assert await stream_count(nc, ns) == 0


async def test_ping_health_and_form_encoding(hook, nc, ns):
    body = dumps(real("ping"))
    r = await hook.post("/webhook", content=body, headers=headers("ping", body, "d-ping"))
    assert r.status_code == 200
    assert r.json() == {"status": "pong", "event": "ping", "delivery": "d-ping",
                        "zen": "Anything added dilutes everything else."}
    assert (await hook.get("/health")).json() == {"status": "ok", "nats_connected": True}
    form = urlencode({"payload": json.dumps(triggered())}).encode()
    h = headers("issues", form, "d-form", content_type="application/x-www-form-urlencoded")
    assert (await hook.post("/webhook", content=form, headers=h)).status_code == 200
    assert await stream_count(nc, ns) == 1


async def test_publish_failures_answer_503_and_oversize_bodies_413():
    async def down(_event):
        raise StoreUnavailable("publish: no responders")

    app = create_webhook_app(down, secret=SECRET, max_body_bytes=64 * 1024, is_connected=lambda: False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hook") as client:
        body = dumps(triggered())
        r = await client.post("/webhook", content=body, headers=headers("issues", body, "d-503"))
        assert r.status_code == 503 and "no responders" in r.json()["detail"]
        big = b'{"pad": "' + b"x" * 70_000 + b'"}'
        r = await client.post("/webhook", content=big, headers=headers("issues", big, "d-413"))
        assert r.status_code == 413
        assert (await client.get("/health")).status_code == 503


async def test_real_server_on_a_free_port(nc, ns, monkeypatch):
    await provision(nc, ns)
    monkeypatch.delenv("CCC_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ConfigError):
        WebhookServer(nc, ns)
    monkeypatch.setenv("CCC_WEBHOOK_SECRET", SECRET)
    server = WebhookServer(nc, ns, "127.0.0.1", 0)
    port = await server.start()
    try:
        assert port > 0 and server.url == f"http://127.0.0.1:{port}"
        p = on_task_branch("pull_request.closed")
        p["pull_request"].update(merged=True, merged_at="2019-05-15T15:21:17Z")
        body = dumps(p)
        async with httpx.AsyncClient(base_url=server.url) as client:
            r = await client.post("/webhook", content=body, headers=headers("pull_request", body, "d-srv"))
            assert r.status_code == 200, r.text
            assert (await client.post("/webhook", content=body, headers={})).status_code == 401
        merged = await last_issue(nc, ns, "issue.github.Codertocat_Hello-World.1.pr_merged")
        assert isinstance(merged, IssuePullRequestMerged) and merged.event_id == "gh:d-srv:0"
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject("issue.*.*.*.pr_closed"))
    finally:
        await server.stop()
        await server.stop()  # idempotent
