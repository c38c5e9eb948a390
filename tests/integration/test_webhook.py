"""The GitHub webhook receiver's HTTP app publishing into a real JetStream (signature,
dedup, error statuses), in-process and under uvicorn on a free port. The pure translation
of the payloads is tested in tests/unit/test_webhook_translate.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import httpx
import nats.js.errors
import pytest

from events.codec import decode_issue
from events.errors import ConfigError, StoreUnavailable
from events.issue import IssuePullRequestMerged, IssueRetryRequested
from infra.adapters.nats.provisioning import provision
from infra.adapters.http.webhook import WebhookServer, create_webhook_app, nats_publisher
from infra.adapters.http.webhook_translate import sign, translate
from tests.support.webhooks import REPO, SECRET, comment, delivered_at, on_task_branch, only, real, triggered

pytestmark = pytest.mark.timeout(60)


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
    app = create_webhook_app(nats_publisher(nc, ns), secret=SECRET, is_connected=lambda: nc.is_connected,
                             clock=delivered_at)
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

    app = create_webhook_app(down, secret=SECRET, max_body_bytes=64 * 1024, is_connected=lambda: False,
                             clock=delivered_at)
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
    server = WebhookServer(nc, ns, "127.0.0.1", 0, clock=delivered_at)
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
        assert isinstance(merged, IssuePullRequestMerged) and merged.event_id == f"github:{REPO}#1:pr2:merged"
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject("issue.*.*.*.pr_closed"))
    finally:
        await server.stop()
        await server.stop()  # idempotent
