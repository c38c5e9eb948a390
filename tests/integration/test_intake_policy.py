"""The policy gate at intake (issue 11, part 4), against the session's real nats-server,
a real coordinator, the webhook receiver over real HTTP, and the real PyGithub client
talking to the local fake GitHub:

* a local issue cannot take over the task of a GitHub issue (task ids carry the source);
* junk on a task's subjects does not make the intake drop the real issue;
* a captured webhook replayed with a new delivery id does nothing (content-derived dedup
  ids in NATS), nor does one older than the freshness window;
* "trusted" is write permission on the repository (GitHub's collaborator-permission
  API, cached), not the author's association alone;
* a review with three inline comments fails one attempt, and only an attempt in review
  on that pull request's branch.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import httpx
import pytest

from actors.analysis import RuleAnalyser
from actors.coordinator import Coordinator, CoordinatorConfig
from events import task_state as ts
from events.codec import encode
from events.issue import IssueChangesRequested, IssueOpened
from events.task import SPECIALTIES, IssueRef
from events.trust import TrustPolicy
from events.work_reports import ImplementationProduced, PullRequestOpened
from infra.adapters.forge.errors import ForgeUnavailable
from infra.adapters.http.webhook import WebhookServer
from infra.adapters.http.webhook_translate import sign
from infra.adapters.nats.issue_publisher import open_issue
from tests.conftest import eventually
from tests.fakes.github_api import FakeGitHub, fake_github_fixture  # noqa: F401 - fixture
from tests.integration.test_coordinator import FakeAgent, now, opened, publish_issue
from tests.integration.test_forge_github import make_forge
from tests.integration.test_intake_trust import dead_letters, parked
from tests.support.webhooks import (
    BRANCH,
    DELIVERED_AT,
    REPO,
    SECRET,
    comment,
    delivered_at,
    on_task_branch,
    triggered,
)

pytestmark = pytest.mark.timeout(60)

GH_TASK = "gh-Codertocat_Hello-World-1"  # the task of GitHub's Codertocat/Hello-World#1
REVIEW_ID = 237895671  # the review of the real payloads


@pytest.fixture
async def coordinator(nc, ns, store):
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, retry_base=0.05, retry_max=0.2))
    await c.start()
    yield c
    await c.stop()


class Clock:
    """The receiver's clock, moved by the test (the real payloads are from 2019)."""

    def __init__(self) -> None:
        self.at = DELIVERED_AT

    def __call__(self):
        return self.at


@pytest.fixture
async def receiver(nc, ns, store):
    clock = Clock()
    server = WebhookServer(nc, ns, "127.0.0.1", 0, secret=SECRET, clock=clock)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url) as client:
        yield client, clock
    await server.stop()


async def deliver(client: httpx.AsyncClient, event: str, payload: dict, delivery: str) -> httpx.Response:
    body = json.dumps(payload).encode()
    return await client.post("/webhook", content=body, headers={
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "Content-Type": "application/json",
        "X-Hub-Signature-256": sign(SECRET, body)})


async def issue_count(nc, ns) -> int:
    return (await nc.jetstream().stream_info(ns.issues_stream)).state.messages


def status(c, task_id):
    t = c.model.tasks.get(task_id)
    return t.status if t else None


async def task_events(store, ns, task_id: str) -> list[str]:
    return [type(e.event).__name__ for e in (await store.load(ns.task_filter(task_id))).events]


# -- task ids carry their source -------------------------------------------------------------
async def test_a_local_issue_cannot_take_over_a_github_task(nc, ns, store, coordinator, receiver):
    client, _ = receiver
    # whoever may publish local facts opens "issue #1 of Codertocat/Hello-World" first...
    local = await open_issue(nc, ns, repo=REPO, title="Print the environment", number=1)
    assert local.task_id == "Codertocat_Hello-World-1"
    await eventually(lambda: status(coordinator, local.task_id) == "queued")
    # ...and GitHub's real issue #1 still gets a task of its own, with its own text
    r = await deliver(client, "issues", triggered(), "d-open")
    assert r.status_code == 200, r.text
    await eventually(lambda: status(coordinator, GH_TASK) == "queued")
    github, pre_empted = coordinator.model.tasks[GH_TASK], coordinator.model.tasks[local.task_id]
    assert (github.issue.source, github.issue.title) == ("github", "Spelling error in the README file")
    assert (pre_empted.issue.source, pre_empted.issue.title) == ("local", "Print the environment")
    # nor can a local repository be named so that its ids are GitHub's (gh-x/app #7 = x/app #7)
    squatter = IssueOpened(event_id="squat", repo="gh-Codertocat/Hello-World", number=1, title="t",
                           occurred_at=now(), author="cli", author_association="OWNER")
    await publish_issue(nc, ns, squatter)
    [letter] = await parked(nc, ns, 1)
    assert letter.reason == "refused" and "owners starting with 'gh-' are reserved" in letter.error
    assert set(coordinator.model.tasks) == {GH_TASK, local.task_id}


async def test_facts_about_a_github_task_created_before_ids_had_a_source_still_find_it(
        nc, ns, store, coordinator):
    """Old logs keep their ids (ids come from the events): a GitHub task created as
    ``acme_app-5`` is still the task the facts about acme/app#5 on GitHub drive."""
    ref = IssueRef(source="github", repo="acme/app", number=5, title="Fix it")
    await store.append(ts.decide(None, ts.CreateTask(at=now(), actor="coordinator", task_id="acme_app-5",
                                                      issue=ref)), expected_last_seq=0)
    await eventually(lambda: status(coordinator, "acme_app-5") == "pending")
    await publish_issue(nc, ns, IssueOpened(event_id="old-5", source="github", repo="acme/app", number=5,
                                            title="Fix it", occurred_at=now(), author="maria",
                                            author_association="MEMBER"))
    await eventually(lambda: status(coordinator, "acme_app-5") == "queued")  # analysed, as before
    assert "gh-acme_app-5" not in coordinator.model.tasks


# -- junk on a task's subjects ---------------------------------------------------------------
class SlowRules(RuleAnalyser):
    """The rules, as an analyser that does I/O would be used: creation first, on its own."""

    instant = False


@pytest.mark.parametrize("instant", [True, False], ids=["rules", "analyser-with-io"])
async def test_junk_on_a_task_subject_does_not_drop_the_real_issue(nc, ns, store, instant):
    task_id = "acme_app-30"
    js = nc.jetstream()
    def created(tid: str, number: int):
        issue = IssueRef(source="local", repo="acme/app", number=number, title="x")
        return ts.decide(None, ts.CreateTask(at=now(), actor="mallory", task_id=tid, issue=issue))[0]

    real, other = created(task_id, 30), created("acme_app-31", 31)
    started = ts.decide(ts.evolve(None, real), ts.StartAnalysis(at=now(), actor="mallory"))[0]
    junk = [
        (f"task.{task_id}.created", b"not json at all"),
        (f"task.{task_id}.created", encode(other)),  # a valid event, of another task
        (started.rel_subject, encode(started)),  # a valid event of this task, but no creation
        (f"task.{task_id}.assigned.agent-1", b'{"type":"task.assigned"}'),
    ]
    for subject, data in junk:
        await js.publish(ns.subject(subject), data)
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60),
                    analyser=RuleAnalyser() if instant else SlowRules())
    await c.start()
    try:
        await publish_issue(nc, ns, opened(30, "Fix the API endpoint", labels=["backend"]))
        await eventually(lambda: status(c, task_id) == "queued")
        assert c.model.tasks[task_id].issue.title == "Fix the API endpoint"
        # the log: the junk (one message decodes, as an event no task can begin with), then
        # the real task, created after it
        loaded = await store.load(ns.task_filter(task_id))
        # (the rules are recorded on the creation; an analyser with I/O writes its own events)
        chain = ["TaskCreated"] if instant else ["TaskCreated", "TaskAnalysisStarted", "TaskAnalyzed"]
        assert [type(e.event).__name__ for e in loaded.events] == ["TaskAnalysisStarted", *chain]
        assert len(loaded.bad) == 3 and loaded.events[1].seq > max(b.seq for b in loaded.bad)
        assert c.model.tasks[task_id].version == len(chain) and c.model.task_seq[task_id] == loaded.last_seq
        intake = c.consumers[0]
        assert intake.failed == 0 and intake.refused == 0
        # and the task works on: an agent gets it
        agent = FakeAgent(store, "agent-1")
        await agent.register()
        await eventually(lambda: status(c, task_id) == "assigned")
    finally:
        await c.stop()


# -- replays -----------------------------------------------------------------------------------
REPLAYED = [
    ("issues", triggered, "issue.github.Codertocat_Hello-World.1.opened"),
    ("issue_comment", lambda: comment("@ccc retry"), "issue.github.Codertocat_Hello-World.1.retry_requested"),
    ("pull_request", lambda: on_task_branch("pull_request.closed"),
     "issue.github.Codertocat_Hello-World.1.pr_closed"),
]


async def test_a_replayed_webhook_with_a_new_delivery_id_is_ignored(nc, ns, store, receiver):
    client, clock = receiver
    for n, (event, payload, subject) in enumerate(REPLAYED):
        first = await deliver(client, event, payload(), f"original-{n}")
        assert first.status_code == 200 and first.json()["published"][0]["duplicate"] is False, first.text
        count = await issue_count(nc, ns)
        # the same captured body, a fresh delivery id, a valid signature (signing is not
        # proof of freshness: whoever captured the body has the signature too)
        replays = await asyncio.gather(*(deliver(client, event, payload(), f"replay-{n}-{i}")
                                         for i in range(3)))
        assert [r.status_code for r in replays] == [200] * 3
        assert all(p["duplicate"] for r in replays for p in r.json()["published"])
        assert await issue_count(nc, ns) == count
        msg = await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject(subject))
        assert msg.seq == first.json()["published"][0]["seq"]
    # a day later the dedup window may be gone, but the body is stale
    clock.at = DELIVERED_AT + timedelta(hours=25)
    count = await issue_count(nc, ns)
    for n, (event, payload, _) in enumerate(REPLAYED):
        r = await deliver(client, event, payload(), f"much-later-{n}")
        assert r.status_code == 202 and r.json()["status"] == "ignored"
        assert r.json()["reason"].startswith(f"stale: {event}.")
    # a ping is never stale: it starts nothing
    r = await deliver(client, "ping", {"zen": "Keep it logically awesome.", "hook_id": 1}, "ping-later")
    assert r.status_code == 200 and r.json()["status"] == "pong"
    assert await issue_count(nc, ns) == count


# -- reviews -------------------------------------------------------------------------------------
def review(review_id: int = REVIEW_ID, branch: str = BRANCH) -> dict:
    p = on_task_branch("pull_request_review.submitted")
    p["review"].update(id=review_id, state="changes_requested", body="Three things, see inline.")
    p["pull_request"]["head"]["ref"] = branch
    return p


def inline(comment_id: int, text: str, review_id: int = REVIEW_ID) -> dict:
    p = on_task_branch("pull_request_review_comment.created")
    p["comment"].update(id=comment_id, body=text, pull_request_review_id=review_id)
    return p


async def to_review(c, agent: FakeAgent, attempt: int) -> None:
    await eventually(lambda: status(c, GH_TASK) == "assigned" and c.model.tasks[GH_TASK].attempt == attempt)
    await agent.start(GH_TASK, attempt=attempt)
    await agent.report(GH_TASK, ImplementationProduced(files_changed=["README.md"]), attempt=attempt)
    await agent.report(GH_TASK, PullRequestOpened(branch=BRANCH, pr_number=2, pr_url="https://x/pull/2"),
                       attempt=attempt)
    await agent.release(GH_TASK, attempt=attempt)
    await eventually(lambda: status(c, GH_TASK) == "checking")


async def failures(store, ns) -> int:
    return (await task_events(store, ns, GH_TASK)).count("TaskFailed")


async def test_a_three_comment_review_fails_one_attempt(nc, ns, store, coordinator, receiver):
    client, _ = receiver
    agent = FakeAgent(store, "agent-1", SPECIALTIES)
    await agent.register()
    assert (await deliver(client, "issues", triggered(), "d-open")).status_code == 200
    await to_review(coordinator, agent, attempt=1)

    # GitHub sends the review and one delivery per inline comment, in no promised order
    deliveries = [("pull_request_review_comment", inline(n, f"nit {n}"), f"d-c{n}") for n in (11, 12, 13)]
    deliveries.insert(1, ("pull_request_review", review(), "d-review"))
    answers = await asyncio.gather(*(deliver(client, *d) for d in deliveries))
    assert [r.status_code for r in answers] == [200] * 4
    published = [p for r in answers for p in r.json()["published"]]
    assert {p["event_id"] for p in published} == {f"github:{REPO}#1:pr2:review:{REVIEW_ID}"}
    assert sorted(p["duplicate"] for p in published) == [False, True, True, True]

    await eventually(lambda: coordinator.model.tasks[GH_TASK].attempt == 2)
    assert await failures(store, ns) == 1
    assert coordinator.model.tasks[GH_TASK].guidance.startswith("Changes requested by Codertocat: ")

    # a straggler of the same review that escaped dedup (another writer, or past the
    # window): the attempt it was about is over, and attempt 2 is not in review
    straggler = IssueChangesRequested(event_id="straggler", source="github", repo=REPO, number=1,
                                      occurred_at=now(), pr_number=2, branch=BRANCH, body="nit 13",
                                      author="Codertocat", author_association="OWNER",
                                      review_id=REVIEW_ID, comment_id=13)
    intake = coordinator.consumers[0]
    handled = intake.handled
    await publish_issue(nc, ns, straggler)
    await eventually(lambda: intake.handled > handled)  # handled (and ignored) before attempt 2 is in review
    assert coordinator.model.tasks[GH_TASK].status in ("queued", "assigned")
    await to_review(coordinator, agent, attempt=2)  # attempt 2 ends in review as usual
    assert await failures(store, ns) == 1 and coordinator.model.tasks[GH_TASK].attempt == 2

    # in review again: a review of another branch (an old pull request, a fork's) does nothing
    elsewhere = review(review_id=999, branch="ccc/task-gh-Codertocat_Hello-World-1-old-attempt")
    handled = intake.handled
    r = await deliver(client, "pull_request_review", elsewhere, "d-elsewhere")
    assert r.status_code == 200, r.text
    await eventually(lambda: intake.handled > handled)
    assert status(coordinator, GH_TASK) == "checking" and await failures(store, ns) == 1
    # a new review of this pull request does fail attempt 2, the one it is about
    r = await deliver(client, "pull_request_review", review(review_id=1000), "d-review-2")
    assert r.status_code == 200 and not r.json()["published"][0]["duplicate"]
    await eventually(lambda: coordinator.model.tasks[GH_TASK].attempt == 3)
    assert await failures(store, ns) == 2
    assert "Three things" in coordinator.model.tasks[GH_TASK].guidance
    assert await dead_letters(nc, ns) == []  # ignored, not refused: nothing to put on record


# -- permissions ---------------------------------------------------------------------------------
async def test_the_permission_api_decides_trust_and_is_cached(fake_github: FakeGitHub):
    forge = make_forge(fake_github)
    try:
        fake_github.set_permission(REPO, "maria", "write")
        fake_github.set_permission(REPO, "tom", "read")  # an org MEMBER may have no more than this
        fake_github.set_permission(REPO, "tina", "triage")
        fake_github.set_permission(REPO, "max", "maintain")
        assert await forge.author_permission(REPO, "maria") == "write"
        assert await forge.author_permission(REPO, "tom") == "read"
        assert await forge.author_permission(REPO, "tina") == "read"  # the API's base role
        assert await forge.author_permission(REPO, "max") == "write"
        assert await forge.author_permission(REPO, "Codertocat") == "admin"  # the owner
        assert await forge.author_permission(REPO, "ghost") == "none"  # 404: no such user
        assert await forge.author_permission(REPO, "dependabot[bot]") == "none"  # not asked
        assert len(fake_github.permission_requests()) == 6
        # cached: asking again (any case, concurrently) calls GitHub no more
        again = await asyncio.gather(*(forge.author_permission(REPO.lower(), who)
                                       for who in ("MARIA", "tom", "maria", "ghost") * 3))
        assert again == ["write", "read", "write", "none"] * 3
        assert len(fake_github.permission_requests()) == 6 and forge.permission_lookups == 6
        # the path PyGithub sends, with the token in the header only
        [call] = fake_github.permission_requests(REPO, "maria")
        assert call.path == f"/repos/{REPO}/collaborators/maria/permission"
        assert call.headers["authorization"] == "token ghp_fake_token_123456"
    finally:
        forge.close()


async def test_permissions_expire_and_failures_are_not_cached(fake_github: FakeGitHub):
    forge = make_forge(fake_github, permission_ttl=0.0)
    try:
        fake_github.set_permission(REPO, "maria", "write")
        assert await forge.author_permission(REPO, "maria") == "write"
        fake_github.set_permission(REPO, "maria", "read")  # write access revoked
        assert await forge.author_permission(REPO, "maria") == "read"
        fake_github.fail("GET", r"/collaborators/maria/permission", 502)
        with pytest.raises(ForgeUnavailable):
            await forge.author_permission(REPO, "maria")
        assert await forge.author_permission(REPO, "maria") == "read"
        assert len(fake_github.permission_requests(REPO, "maria")) == 4
    finally:
        forge.close()


async def test_write_access_not_the_association_decides_who_starts_work(nc, ns, store,
                                                                       fake_github: FakeGitHub):
    """The receiver asks GitHub before publishing a fact that starts or drives work, and
    the intake requires the answer on every GitHub fact."""
    forge = make_forge(fake_github)
    trust = TrustPolicy(permission_required_for=frozenset({"github"}))
    c = Coordinator(nc, ns, CoordinatorConfig(heartbeat_timeout=60, trust=trust))
    server = WebhookServer(nc, ns, "127.0.0.1", 0, secret=SECRET, trust=trust, clock=delivered_at,
                           permissions=forge.author_permission)
    await c.start()
    await server.start()
    try:
        fake_github.set_permission(REPO, "Codertocat", "write")
        fake_github.set_permission(REPO, "maria", "read")
        async with httpx.AsyncClient(base_url=server.url) as client:
            r = await deliver(client, "issues", triggered(), "d-1")  # Codertocat: OWNER, write
            assert r.status_code == 200, r.text
            await eventually(lambda: status(c, GH_TASK) == "queued")
            # maria is a MEMBER (the association passes), but may only read
            p = comment("@ccc cancel")
            p["comment"]["user"]["login"] = "maria"
            p["comment"]["author_association"] = "MEMBER"
            r = await deliver(client, "issue_comment", p, "d-2")
            assert r.status_code == 202
            assert r.json()["reason"] == \
                "untrusted author: maria has read permission on the repository, not write"
            # Codertocat again: the answer is cached, GitHub is not asked twice
            r = await deliver(client, "issue_comment", comment("@ccc cancel"), "d-3")
            assert r.status_code == 200, r.text
            await eventually(lambda: status(c, GH_TASK) == "cancelled")
            assert len(fake_github.permission_requests(REPO, "Codertocat")) == 1
            # GitHub failing: nobody is trusted on a guess, the delivery can be redelivered
            fake_github.set_permission(REPO, "lea", "admin")
            fake_github.fail("GET", r"/collaborators/lea/permission", 503)
            p = comment("@ccc retry")
            p["comment"]["user"]["login"] = "lea"
            r = await deliver(client, "issue_comment", p, "d-4")
            assert r.status_code == 503 and "permission" in r.json()["detail"]
        # the published facts carry the answer, which the intake checked again
        msg = await nc.jetstream().get_last_msg(ns.issues_stream, ns.subject(
            "issue.github.Codertocat_Hello-World.1.opened"))
        assert json.loads(msg.data)["author_permission"] == "write"
        # a GitHub fact that did not come through a receiver that asked is refused
        await publish_issue(nc, ns, IssueOpened(event_id="no-perm", source="github", repo=REPO, number=2,
                                                title="t", occurred_at=now(), author="Codertocat",
                                                author_association="OWNER"))
        [letter] = await parked(nc, ns, 1)
        assert "permission on the repository is not on the fact" in letter.error
        assert "gh-Codertocat_Hello-World-2" not in c.model.tasks
    finally:
        await server.stop()
        await c.stop()
        forge.close()
