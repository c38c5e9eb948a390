"""Translation of real GitHub webhook payloads into issue events, and their signatures."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from events.codec import decode_issue, encode
from events.errors import ConfigError
from events.issue import (
    IssueBaseMoved,
    IssueCancelRequested,
    IssueChangesRequested,
    IssueChecksStarted,
    IssueClosed,
    IssueCommented,
    IssueEdited,
    IssueLabeled,
    IssueOpened,
    IssuePullRequestApproved,
    IssuePullRequestClosed,
    IssuePullRequestMerged,
    IssueReopened,
    IssueRetryRequested,
    issue_decoder,
)
from events.subjects import task_id_for
from infra.adapters.git.gitops import branch_name
from infra.adapters.http.webhook import create_webhook_app, webhook_secret
from infra.adapters.http.webhook_translate import (
    BadPayload,
    CommitChecks,
    interpret,
    is_signed,
    mentions,
    sign,
    task_issue_number,
    translate,
)
from infra.adapters.nats.issue_publisher import opened_event_id
from tests.support.webhooks import (
    BRANCH,
    REPO,
    SECRET,
    approved_review,
    base_edited,
    ci_on_task_branch,
    comment,
    on_task_branch,
    only,
    pushed,
    real,
    task_branch,
    triggered,
)


def stamp(*at: int) -> int:
    """A UTC time as the facts' ids carry it (epoch seconds)."""
    return int(datetime(*at, tzinfo=UTC).timestamp())


T_ISSUE = stamp(2019, 5, 15, 15, 20, 18)  # the issue's updated_at in the issues.* payloads


# -- the real payloads as they are ---------------------------------------------------------
@pytest.mark.parametrize(("event", "name", "reason"), [
    ("issues", "issues.opened", "no 'ccc' label and no @ccc mention"),
    ("issues", "issues.labeled", "not for @ccc"),
    ("issues", "issues.edited", "not for @ccc"),
    ("issue_comment", "issue_comment.created", "not addressed to @ccc"),
    ("pull_request", "pull_request.closed", "not a task branch"),
    ("pull_request_review", "pull_request_review.submitted", "not changes_requested or approved"),
    ("pull_request", "pull_request.synchronize", "not a task branch"),
    ("check_run", "check_run.completed", "not a task branch"),
    ("check_suite", "check_suite.completed", "not a task branch"),
    ("workflow_run", "workflow_run.completed", "not a task branch"),
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
    assert labeled == IssueLabeled(event_id=f"github:{REPO}#1:labeled:CCC:{T_ISSUE}", source="github",
                                   repo=REPO, number=1,
                                   occurred_at=opened.occurred_at, actor="github:Codertocat",
                                   label="CCC", labels=("bug", "CCC"))


def test_another_label_on_a_triggered_issue_is_only_a_label():
    p = triggered("issues.labeled")  # the "bug" label added to an issue that has "ccc"
    assert only(translate("issues", p, "d-8")) == IssueLabeled(
        event_id=f"github:{REPO}#1:labeled:bug:{T_ISSUE}", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 18, tzinfo=UTC), actor="github:Codertocat",
        label="bug", labels=("bug", "ccc"))


def test_edited_closed_reopened():
    edited = only(translate("issues", triggered("issues.edited"), "d-1"))
    assert isinstance(edited, IssueEdited) and edited.title == "Spelling error in the README file"
    reopened = only(translate("issues", real("issues.reopened"), "d-2"))
    assert isinstance(reopened, IssueReopened)
    at = stamp(2021, 10, 11, 16, 40, 56)  # the reopened issue's updated_at
    assert reopened.event_id == f"github:{reopened.repo}#{reopened.number}:reopened:{at}"
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
    assert (event.repo, event.number, event.event_id) == (REPO, 1, f"github:{REPO}#1:comment:492700400")


def test_comment_with_a_free_text_request():
    body = "Looks good so far.\n@ccc please also update the docs"
    event = only(translate("issue_comment", comment(body), "d-c"))
    assert event == IssueCommented(
        event_id=f"github:{REPO}#1:comment:492700400", source="github", repo=REPO, number=1,
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
    for repo, number in [(REPO, 1), ("octo-org/my-app-2", 7), ("a/b", 123), ("gh-x/app", 5)]:
        branch = branch_name(task_id_for(repo, number, "github"), "Fix 42 things - now")
        assert branch.startswith("ccc/task-gh-")
        assert task_issue_number(branch, repo) == number
    assert task_issue_number("ccc/task-gh-octo-org_my-app-2-7", "octo-org/my-app-2") == 7
    # the same name in repo my-app is its issue 2 (titled "7 x"): the payload's repo decides
    assert task_issue_number("ccc/task-gh-octo-org_my-app-2-7-x", "octo-org/my-app") == 2
    assert task_issue_number("ccc/task-gh-octo-org_my-app-2-7", "octo-org/other") is None
    assert task_issue_number("changes", REPO) is None
    assert task_issue_number("ccc/task-gh-Codertocat_Hello-World-fix", REPO) is None
    # branches of tasks created before ids carried their source: their PRs may be open still
    assert task_issue_number("ccc/task-octo-org_my-app-2-7-fix", "octo-org/my-app-2") == 7
    assert task_issue_number("ccc/task-gh-x_app-5-fix", "gh-x/app") == 5  # old id of gh-x/app
    # a local task's branch names the local id, and the local forge's own facts read it
    assert task_issue_number(branch_name(task_id_for("a/b", 3), "t"), "a/b", "local") == 3


def test_pull_request_closed_unmerged_and_merged():
    p = on_task_branch("pull_request.closed")
    assert only(translate("pull_request", p, "d-p")) == IssuePullRequestClosed(
        event_id=f"github:{REPO}#1:pr2:closed:{stamp(2019, 5, 15, 15, 21, 18)}", source="github",
        repo=REPO, number=1,
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
        event_id=f"github:{REPO}#1:pr2:review:237895671", source="github", repo=REPO, number=1,
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


# -- the trust policy: the same one the intake re-checks ---------------------------------------
def test_retry_and_cancel_requests_carry_their_author_for_the_intake():
    from events.trust import TrustPolicy

    for body in ("@ccc retry", "@ccc cancel"):
        event = only(translate("issue_comment", comment(body), "d-c"))
        assert (event.author, event.author_association) == ("Codertocat", "OWNER")
        assert TrustPolicy().refusal(event) == ""  # what the webhook let through, the intake accepts


@pytest.mark.parametrize(("event", "payload"), [
    ("issues", triggered),
    ("issue_comment", lambda: comment("@ccc retry")),
    ("pull_request", lambda: on_task_branch("pull_request.closed")),
    ("pull_request_review_comment", lambda: on_task_branch("pull_request_review_comment.created")),
])
def test_repositories_outside_the_allow_list_are_ignored(event, payload):
    from events.trust import TrustPolicy

    assert translate(event, payload(), "d", trust=TrustPolicy(repos=("codertocat/*",))) != []
    result = interpret(event, payload(), "d", trust=TrustPolicy(repos=("acme/*", "octo/app")))
    assert result.events == []
    assert result.reason == f"repository {REPO} is not in CCC_REPOS (acme/*, octo/app)"


def test_the_authors_the_webhook_trusts_are_the_policys():
    from events.trust import TrustPolicy

    owners_only = TrustPolicy(associations=frozenset({"OWNER"}))
    p = triggered()
    p["issue"]["author_association"] = "MEMBER"
    assert translate("issues", p, "d") != []
    result = interpret("issues", p, "d", trust=owners_only)
    assert result.events == [] and result.reason == "untrusted author: Codertocat is MEMBER, not one of OWNER"


# -- ids from the content, freshness ---------------------------------------------------------
def _review(state: str = "changes_requested") -> dict:
    p = on_task_branch("pull_request_review.submitted")
    p["review"].update(state=state, body="Three things, inline.")
    return p


def _inline(comment_id: int, review_id: int | None = 237895671) -> dict:
    p = on_task_branch("pull_request_review_comment.created")
    p["comment"].update(id=comment_id, body=f"comment {comment_id}", pull_request_review_id=review_id)
    return p


DELIVERIES = [  # every kind of fact the receiver publishes, from the real payloads
    ("issues", triggered),
    ("issues", lambda: triggered("issues.labeled")),
    ("issues", lambda: triggered("issues.edited")),
    ("issue_comment", lambda: comment("@ccc retry")),
    ("issue_comment", lambda: comment("@ccc please add docs")),
    ("pull_request", lambda: on_task_branch("pull_request.closed")),
    ("pull_request_review", _review),
    ("pull_request_review_comment", lambda: _inline(284312630)),
]


@pytest.mark.parametrize(("event", "payload"), DELIVERIES)
def test_fact_ids_come_from_the_content_not_the_delivery(event, payload):
    """A captured body replayed with a new X-GitHub-Delivery makes the same facts, ids and
    all: NATS deduplicates them."""
    first, replayed = translate(event, payload(), "72d3162e-1"), translate(event, payload(), "ffff-2")
    assert first and [e.event_id for e in first] == [e.event_id for e in replayed]
    assert all(e.event_id.startswith(f"github:{REPO}#1:") and "72d3162e" not in e.event_id for e in first)


def test_distinct_happenings_have_distinct_ids():
    ids = {only(translate("issue_comment", comment("@ccc retry", id=n), "d")).event_id for n in (1, 2)}
    closed = on_task_branch("pull_request.closed")
    again = on_task_branch("pull_request.closed")
    again["pull_request"]["closed_at"] = "2019-05-16T09:00:00Z"  # reopened, closed once more
    ids |= {only(translate("pull_request", p, "d")).event_id for p in (closed, again)}
    edited = triggered("issues.edited")
    edited["issue"]["body"] = "another text, within the same second"
    ids |= {only(translate("issues", p, "d")).event_id for p in (triggered("issues.edited"), edited)}
    assert len(ids) == 6


def test_a_review_and_its_inline_comments_are_one_fact_by_id():
    """GitHub sends the review and one delivery per inline comment; they share the
    review's id, so whichever comes first is the fact and the others are duplicates."""
    facts = [only(translate("pull_request_review", _review(), "d-0")),
             *(only(translate("pull_request_review_comment", _inline(n), f"d-{n}")) for n in (11, 12, 13))]
    assert {f.review_id for f in facts} == {237895671}
    assert {f.event_id for f in facts} == {f"github:{REPO}#1:pr2:review:237895671"}
    # a comment GitHub puts in no review is a review of its own
    lone = only(translate("pull_request_review_comment", _inline(14, review_id=None), "d"))
    assert lone.event_id == f"github:{REPO}#1:pr2:review-comment:14"


AGES = {  # the delivery's own time in each payload
    "issues": datetime(2019, 5, 15, 15, 20, 18, tzinfo=UTC),
    "issue_comment": datetime(2019, 5, 15, 15, 20, 21, tzinfo=UTC),
    "pull_request": datetime(2019, 5, 15, 15, 21, 18, tzinfo=UTC),
    "pull_request_review": datetime(2019, 5, 15, 15, 20, 38, tzinfo=UTC),
    "pull_request_review_comment": datetime(2019, 5, 15, 15, 20, 37, tzinfo=UTC),
}


@pytest.mark.parametrize(("event", "payload"), DELIVERIES)
def test_deliveries_older_than_the_window_are_stale(event, payload):
    from datetime import timedelta

    at, window = AGES[event], timedelta(minutes=15)
    fresh = interpret(event, payload(), "d", now=at + timedelta(minutes=14), max_age=window)
    assert fresh.events and not fresh.stale
    early = interpret(event, payload(), "d", now=at - timedelta(minutes=3), max_age=window)
    assert early.events  # clocks differ a little; a replay is never from the future
    late = interpret(event, payload(), "d", now=at + timedelta(minutes=16), max_age=window)
    assert late.events == [] and late.stale
    assert late.reason.startswith("stale: ") and "16 min old, more than the 15 min allowed" in late.reason
    assert translate(event, payload(), "d", now=at + timedelta(days=400)) != []  # no max_age: no check


def test_a_delivery_without_its_timestamp_is_stale():
    from datetime import timedelta

    p = comment("@ccc retry")
    p["comment"]["created_at"] = None
    result = interpret("issue_comment", p, "d", max_age=timedelta(minutes=15))
    assert result.stale and "no timestamp" in result.reason


# -- a pull request's way to green (issue 12) -----------------------------------------------------
SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"  # the head commit of the real check/PR payloads
OTHER = "3484a3fb816e0859fd6e1cea078d76385ff50625"
BEFORE = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e"


@pytest.mark.parametrize(("event", "name", "trigger"), [
    ("check_run", "check_run.completed", "check_run.completed"),
    ("check_run", "check_run.completed.failure", "check_run.completed"),
    ("check_suite", "check_suite.completed", "check_suite.completed"),
])
def test_a_finished_check_of_a_task_branch_asks_for_the_commits_checks(event, name, trigger):
    result = interpret(event, ci_on_task_branch(name), "d-ci")
    assert result.events == [] and result.reason == ""
    assert result.checks == CommitChecks(source="github", repo=REPO, number=1, head_sha=SHA, branch=BRANCH,
                                         trigger=trigger, actor="github:Codertocat")
    assert translate(event, ci_on_task_branch(name), "d-ci") == []  # no fact: the API decides


def test_workflow_runs_completed_or_waiting_for_approval():
    repo = "octo-org/octo-repo"
    done = interpret("workflow_run", ci_on_task_branch("workflow_run.completed", number=3), "d")
    assert done.checks == CommitChecks(source="github", repo=repo, number=3, head_sha=OTHER,
                                       branch=task_branch(repo, 3), trigger="workflow_run.completed",
                                       actor="github:Codertocat")
    waiting = interpret("workflow_run", ci_on_task_branch("workflow_run.requested.action_required", number=3), "d")
    assert waiting.checks is not None and waiting.checks.trigger == "workflow_run.requested"
    # a run merely requested says nothing yet; a fork's run is not ours, whatever its branch
    requested = ci_on_task_branch("workflow_run.requested.action_required", number=3)
    requested["workflow_run"].update(status="queued", conclusion=None)
    assert interpret("workflow_run", requested, "d").reason == \
        "workflow run requested: its result comes when it completes"
    fork = ci_on_task_branch("workflow_run.completed", number=3)
    fork["workflow_run"]["head_repository"]["full_name"] = "mallory/octo-repo"
    assert interpret("workflow_run", fork, "d").reason == "a workflow run of mallory/octo-repo, a fork"
    assert interpret("workflow_run", real("workflow_run.completed") | {"action": "in_progress"}, "d").reason == \
        "not handled: workflow_run.in_progress"


def test_a_merge_queue_candidates_checks_are_asked_for_too():
    p = ci_on_task_branch("check_suite.completed")
    p["check_suite"]["head_branch"] = "ccc-queue/gh-Codertocat_Hello-World-1"
    checks = interpret("check_suite", p, "d").checks
    assert checks is not None and checks.candidate and (checks.number, checks.branch) == (
        1, "ccc-queue/gh-Codertocat_Hello-World-1")
    assert not interpret("check_suite", ci_on_task_branch("check_suite.completed"), "d").checks.candidate
    for branch in ("ccc-queue/gh-Codertocat_Hello-World-1-x", "ccc-queue/gh-octo_other-1",
                   "ccc-queue/Codertocat_Hello-World-1"):  # another repository's, a local task's
        p["check_suite"]["head_branch"] = branch
        assert "not a task branch" in interpret("check_suite", p, "d").reason


def test_check_deliveries_are_checked():
    p = ci_on_task_branch("check_suite.completed")
    p["check_suite"]["head_sha"] = "HEAD; rm -rf /"
    with pytest.raises(BadPayload, match="not a commit id"):
        translate("check_suite", p, "d")
    p = ci_on_task_branch("check_suite.completed")
    p["check_suite"]["head_branch"] = None  # a commit no branch points at
    assert interpret("check_suite", p, "d").reason == f"branch None is not a task branch of {REPO}"
    from datetime import timedelta

    late = interpret("check_run", ci_on_task_branch("check_run.completed"), "d",
                     now=datetime(2019, 5, 15, 16, 0, tzinfo=UTC), max_age=timedelta(minutes=15))
    assert late.stale and late.checks is None and late.reason.startswith("stale: check_run.completed")


def test_a_push_to_a_task_pull_request_starts_its_checks():
    event = only(translate("pull_request", on_task_branch("pull_request.synchronize"), "d"))
    assert event == IssueChecksStarted(
        event_id=f"github:{REPO}#1:pr2:sync:{SHA}", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 33, tzinfo=UTC), actor="github:Codertocat",
        head_sha=SHA, branch=BRANCH)
    assert decode_issue(event.rel_subject, encode(event)) == event


def test_a_base_edit_and_a_push_to_the_default_branch_move_the_base():
    edit = only(translate("pull_request", base_edited("release", OTHER), "d"))
    assert edit == IssueBaseMoved(
        event_id=f"github:{REPO}#0:pr2:base:release:{OTHER}", source="github", repo=REPO, number=0,
        occurred_at=datetime(2019, 5, 15, 15, 20, 33, tzinfo=UTC), actor="github:Codertocat",
        branch="release", sha=OTHER, before=BEFORE)
    assert edit.rel_subject == "issue.github.Codertocat_Hello-World.0.base_moved"
    title_only = on_task_branch("pull_request.synchronize") | {"action": "edited",
                                                               "changes": {"title": {"from": "Old"}}}
    assert interpret("pull_request", title_only, "d").reason == "pull request edited, its base branch unchanged"

    push = only(translate("push", pushed("master", OTHER), "d"))
    assert push == IssueBaseMoved(
        event_id=f"github:{REPO}#0:base:master:{OTHER}", source="github", repo=REPO, number=0,
        occurred_at=datetime(2019, 5, 15, 15, 20, 32, tzinfo=UTC), actor="github:Codertocat",
        branch="master", sha=OTHER, before=BEFORE)
    assert decode_issue(push.rel_subject, encode(push)) == push
    new_branch = only(translate("push", pushed("master", OTHER, before="0" * 40), "d"))
    assert new_branch.before == ""
    for payload, reason in [
        (pushed("develop", OTHER), "a push to 'develop', not to the default branch 'master'"),
        (pushed("master", OTHER) | {"ref": "refs/tags/v1.0"}, "a push to refs/tags/v1.0, not to a branch"),
        (pushed("master", "0" * 40) | {"deleted": True}, "branch 'master' deleted"),
    ]:
        assert interpret("push", payload, "d").reason == reason
    from datetime import timedelta

    late = interpret("push", pushed("master", OTHER), "d", now=datetime(2019, 5, 15, 16, 0, tzinfo=UTC),
                     max_age=timedelta(minutes=15))
    assert late.stale and late.reason.startswith("stale: push")


def test_an_approving_review_of_a_task_pull_request():
    event = only(translate("pull_request_review", approved_review(), "d"))
    assert event == IssuePullRequestApproved(
        event_id=f"github:{REPO}#1:pr2:review:237895671", source="github", repo=REPO, number=1,
        occurred_at=datetime(2019, 5, 15, 15, 20, 38, tzinfo=UTC), actor="github:Codertocat",
        pr_number=2, branch=BRANCH, author="Codertocat", author_association="OWNER")
    assert event.rel_subject == "issue.github.Codertocat_Hello-World.1.pr_approved"
    untrusted = approved_review()
    untrusted["review"]["author_association"] = "CONTRIBUTOR"
    assert "untrusted author" in interpret("pull_request_review", untrusted, "d").reason
    bot = approved_review()
    bot["review"]["user"]["type"] = "Bot"
    assert "is a bot" in interpret("pull_request_review", bot, "d").reason
    other = approved_review()
    other["pull_request"]["head"]["ref"] = "changes"
    assert "not a task branch" in interpret("pull_request_review", other, "d").reason
