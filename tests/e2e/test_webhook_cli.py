"""``ccc webhook`` as a process: with GitHub credentials it asks GitHub (the fake, through
PyGithub) for each author's permission; without, it says at startup that associations
alone decide; either way a replayed body and a stale one publish nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from datetime import UTC, datetime

import pytest

from infra.adapters.http.webhook_translate import sign
from infra.adapters.nats.provisioning import provision
from tests.e2e.test_cli import Proc, procs  # noqa: F401 - fixture
from tests.fakes.github_api import FakeGitHub, fake_github_fixture  # noqa: F401 - fixture
from tests.support.session import nats_args
from tests.support.webhooks import REPO, SECRET, comment, triggered

pytestmark = pytest.mark.timeout(90)
TOKEN = "ghp_fake_token_123456"
STAMPS = ("created_at", "updated_at", "closed_at", "merged_at", "submitted_at")


def fresh(node):
    """The payload made now: the receiver refuses deliveries older than --max-age."""
    if isinstance(node, dict):
        return {k: (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if k in STAMPS and v else fresh(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [fresh(x) for x in node]
    return node


def post(base: str, event: str, payload: dict, delivery: str) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(f"{base}/webhook", data=body, method="POST", headers={
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(SECRET, body)})
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def start(nats_url, ns, procs, env: dict) -> tuple[Proc, str]:  # noqa: F811 - the fixture
    p = Proc(*nats_args(nats_url), "--namespace", ns.prefix, "webhook", "--port", "0",
             env={"CCC_WEBHOOK_SECRET": SECRET, **env})
    procs.append(p)
    line = await asyncio.to_thread(p.next_line)
    assert line.startswith("webhook receiver at http://127.0.0.1:"), line
    return p, line.split()[3].removesuffix("/webhook")


async def test_with_github_credentials_the_authors_permission_decides(nats_url, nc, ns, procs,  # noqa: F811
                                                                     fake_github: FakeGitHub):
    await provision(nc, ns)
    fake_github.set_permission(REPO, "Codertocat", "write")
    fake_github.set_permission(REPO, "maria", "read")
    p, base = await start(nats_url, ns, procs, {"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": fake_github.base_url,
                                                "GITHUB_APP_ID": ""})
    opened = fresh(triggered())
    status, out = await asyncio.to_thread(post, base, "issues", opened, "d-1")
    assert status == 200 and out["published"][0]["duplicate"] is False, out
    # the same body again, under a new delivery id: a duplicate in NATS, nothing new
    status, out = await asyncio.to_thread(post, base, "issues", opened, "d-1-replayed")
    assert status == 200 and out["published"][0]["duplicate"] is True, out
    reader = fresh(comment("@ccc retry"))
    reader["comment"]["user"]["login"], reader["comment"]["author_association"] = "maria", "MEMBER"
    status, out = await asyncio.to_thread(post, base, "issue_comment", reader, "d-2")
    assert status == 202 and out["reason"] == \
        "untrusted author: maria has read permission on the repository, not write"
    assert len(fake_github.permission_requests(REPO)) == 2  # Codertocat once (cached), maria once
    msg = await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject(
        "issue.github.Codertocat_Hello-World.1.opened"))
    assert json.loads(msg.data)["author_permission"] == "write"
    code, err = await asyncio.to_thread(p.stop, signal.SIGTERM)
    assert code == 0 and "Traceback" not in err and "no GitHub credentials" not in err, err


async def test_without_credentials_it_says_so_and_still_refuses_stale_bodies(nats_url, nc, ns, procs):  # noqa: F811
    await provision(nc, ns)
    p, base = await start(nats_url, ns, procs, {"GITHUB_TOKEN": "", "GITHUB_APP_ID": ""})
    status, out = await asyncio.to_thread(post, base, "issues", fresh(triggered()), "d-1")
    assert status == 200, out  # trusted by association (OWNER), as the warning says
    status, out = await asyncio.to_thread(post, base, "issues", triggered(), "d-2")  # as captured in 2019
    assert status == 202 and out["reason"].startswith("stale: issues.opened of 2019-05-15"), out
    code, err = await asyncio.to_thread(p.stop, signal.SIGTERM)
    assert code == 0, err
    assert "warning: no GitHub credentials: authors are trusted by author_association alone" in err


async def test_the_rate_limit_is_set_on_the_command_line(nats_url, nc, ns, procs):  # noqa: F811
    await provision(nc, ns)
    p = Proc(*nats_args(nats_url), "--namespace", ns.prefix, "webhook", "--port", "0", "--rate-limit", "0.01",
             "--rate-burst", "2", env={"CCC_WEBHOOK_SECRET": SECRET, "GITHUB_TOKEN": "", "GITHUB_APP_ID": ""})
    procs.append(p)
    line = await asyncio.to_thread(p.next_line)
    base = line.split()[3].removesuffix("/webhook")
    codes = [(await asyncio.to_thread(post, base, "ping", {"zen": "hi", "hook_id": 1}, f"r-{i}"))[0]
             for i in range(3)]
    assert codes[:2] != [429, 429] and codes[2] == 429, codes  # a burst of 2, then the limit
    code, err = await asyncio.to_thread(p.stop, signal.SIGTERM)
    assert code == 0, err
