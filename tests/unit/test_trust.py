"""The intake's trust policy (events.trust): pure, no NATS."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from events.codec import decode_issue, encode
from events.errors import ConfigError
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
)
from events.trust import OPERATOR, TrustPolicy, association, parse_repos

AT = datetime(2026, 3, 1, tzinfo=UTC)
BASE = {"event_id": "e1", "repo": "acme/app", "number": 7, "occurred_at": AT}


def test_a_missing_author_association_means_none():
    fact = IssueOpened(**BASE, title="t")
    assert fact.author_association == "NONE"
    # as a raw `nats pub` sends it: no field at all
    raw = b'{"type":"issue.opened","event_id":"x7","repo":"acme/app","number":7,"title":"t",' \
          b'"occurred_at":"2026-01-01T00:00:00Z"}'
    decoded = decode_issue("issue.local.acme_app.7.opened", raw)
    assert decoded.author_association == "NONE"
    assert TrustPolicy().refusal(decoded) == \
        "untrusted author: (unnamed) is NONE, not one of COLLABORATOR, MEMBER, OWNER"


def test_an_explicit_owner_survives_the_wire():
    # OWNER used to be the default, and defaults are left off the wire: it must now be written
    fact = IssueOpened(**BASE, title="t", author_association=OPERATOR)
    assert b'"author_association":"OWNER"' in encode(fact)
    assert decode_issue(fact.rel_subject, encode(fact)).author_association == "OWNER"


@pytest.mark.parametrize("value,expected", [(None, "NONE"), ("", "NONE"), ("  ", "NONE"),
                                            ("member", "MEMBER"), ("OWNER", "OWNER")])
def test_association_is_normalised(value, expected):
    assert association(value) == expected


def authored(cls, assoc):
    extra = {"title": "t"} if cls is IssueOpened else {}
    return cls(**BASE, **extra, author="alice", author_association=assoc)


AUTHORED = [IssueOpened, IssueCommented, IssueChangesRequested, IssueCancelRequested, IssueRetryRequested]
FORGE_FACTS = [IssueClosed(**BASE), IssueReopened(**BASE), IssuePullRequestMerged(**BASE),
               IssuePullRequestClosed(**BASE), IssueEdited(**BASE, title="t"),
               IssueLabeled(**BASE, label="ccc")]


@pytest.mark.parametrize("cls", AUTHORED)
@pytest.mark.parametrize("assoc", ["OWNER", "MEMBER", "COLLABORATOR"])
def test_trusted_authors_pass(cls, assoc):
    assert TrustPolicy().refusal(authored(cls, assoc)) == ""


@pytest.mark.parametrize("cls", AUTHORED)
@pytest.mark.parametrize("assoc", ["NONE", "CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR", "MANNEQUIN", ""])
def test_every_fact_a_person_writes_is_checked(cls, assoc):
    why = TrustPolicy().refusal(authored(cls, assoc))
    assert why == f"untrusted author: alice is {association(assoc)}, not one of COLLABORATOR, MEMBER, OWNER"


@pytest.mark.parametrize("fact", FORGE_FACTS, ids=lambda f: type(f).__name__)
def test_the_forges_own_facts_have_no_author_to_check_but_a_repository(fact):
    assert TrustPolicy().refusal(fact) == ""
    assert TrustPolicy(repos=("other/app",)).refusal(fact) == \
        "repository acme/app is not in CCC_REPOS (other/app)"


def test_the_associations_are_a_choice():
    strict = TrustPolicy(associations=frozenset({"OWNER"}))
    assert strict.refusal(authored(IssueOpened, "OWNER")) == ""
    assert strict.refusal(authored(IssueOpened, "MEMBER")) == \
        "untrusted author: alice is MEMBER, not one of OWNER"


def test_the_repository_is_checked_before_the_author():
    why = TrustPolicy(repos=("acme/web",)).refusal(authored(IssueOpened, "NONE"))
    assert why == "repository acme/app is not in CCC_REPOS (acme/web)"


@pytest.mark.parametrize("repos,repo,allowed", [
    ((), "anyone/anything", True),                 # empty: every repository
    (("acme/app",), "acme/app", True),
    (("acme/app",), "ACME/App", True),             # GitHub names are case-insensitive
    (("acme/app",), "acme/app2", False),
    (("acme/app",), "acme/ap", False),
    (("acme/*",), "acme/anything", True),
    (("acme/*",), "Acme/x", True),
    (("acme/*",), "acmex/app", False),             # the owner, not a prefix of it
    (("acme/*",), "evil/acme", False),
    (("solo",), "local/solo", True),               # a bare name is local's, as for `issue publish`
    (("local/solo",), "solo", True),
    (("a/x", "b/*"), "b/y", True),
    (("a/x", "b/*"), "c/x", False),
])
def test_repository_allow_list(repos, repo, allowed):
    assert TrustPolicy(repos=repos).allows_repo(repo) is allowed


def test_parse_repos():
    assert parse_repos(None) == ()
    assert parse_repos("") == ()
    assert parse_repos(" acme/app , acme/* ,, solo, acme/app") == ("acme/app", "acme/*", "solo")


@pytest.mark.parametrize("text", ["*", "*/*", "acme/a*", "a b/c", "acme/../x", "acme/app/x", "a_b/c", "/x"])
def test_parse_repos_refuses_what_it_cannot_match_exactly(text):
    with pytest.raises(ConfigError, match=r"^CCC_REPOS: invalid repository .*'owner/name' or 'owner/\*'"):
        parse_repos(f"acme/ok,{text}")


def test_parse_repos_names_the_setting_it_read():
    with pytest.raises(ConfigError, match="^--repos: "):
        parse_repos("*", "--repos")


# -- permissions: what "trusted" means where the forge can say ------------------------------
def with_permission(cls, assoc, perm, source="github"):
    extra = {"title": "t"} if cls is IssueOpened else {}
    return cls(**{**BASE, "source": source}, **extra, author="alice", author_association=assoc,
               author_permission=perm)


@pytest.mark.parametrize("cls", AUTHORED)
@pytest.mark.parametrize("perm", ["write", "maintain", "admin", "WRITE"])
def test_write_permission_and_a_trusted_association_pass(cls, perm):
    strict = TrustPolicy(permission_required_for=frozenset({"github"}))
    assert strict.refusal(with_permission(cls, "MEMBER", perm)) == ""
    assert TrustPolicy().refusal(with_permission(cls, "MEMBER", perm)) == ""


@pytest.mark.parametrize("cls", AUTHORED)
@pytest.mark.parametrize("perm", ["read", "triage", "none", "owner-ish"])
def test_a_member_without_write_access_is_not_trusted(cls, perm):
    """MEMBER and COLLABORATOR include people with read or triage access: where the
    permission is on the fact it decides, whatever the policy says about missing ones."""
    expected = "none" if perm == "owner-ish" else perm  # what GitHub does not define is none
    for policy in (TrustPolicy(), TrustPolicy(permission_required_for=frozenset({"github"}))):
        assert policy.refusal(with_permission(cls, "COLLABORATOR", perm)) == \
            f"untrusted author: alice has {expected} permission on the repository, not write"


def test_write_access_does_not_lift_an_untrusted_association():
    assert TrustPolicy().refusal(with_permission(IssueOpened, "CONTRIBUTOR", "write")) == \
        "untrusted author: alice is CONTRIBUTOR, not one of COLLABORATOR, MEMBER, OWNER"


def test_a_missing_permission_is_refused_only_for_the_sources_that_require_it():
    strict = TrustPolicy(permission_required_for=frozenset({"github"}))
    unchecked = with_permission(IssueCommented, "OWNER", "")
    assert TrustPolicy().refusal(unchecked) == ""  # no credentials anywhere: associations decide
    why = strict.refusal(unchecked)
    assert why.startswith("untrusted author: alice's permission on the repository is not on the fact")
    assert "required for github facts" in why
    # the operator's local facts carry no permission: trusted by role, as before
    assert strict.refusal(with_permission(IssueOpened, OPERATOR, "", source="local")) == ""
    # the forge's own facts have no author at all
    assert all(strict.refusal(f) == "" for f in FORGE_FACTS)


def test_the_permission_survives_the_wire_and_old_facts_have_none():
    fact = with_permission(IssueChangesRequested, "MEMBER", "write")
    assert decode_issue(fact.rel_subject, encode(fact)).author_permission == "write"
    assert b"author_permission" not in encode(with_permission(IssueOpened, "OWNER", ""))  # as before
