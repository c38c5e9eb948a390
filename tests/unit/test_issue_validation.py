"""Validating a new local issue (repo, title, number, source, labels) before anything is published."""

from __future__ import annotations

import pytest

from events.errors import ConfigError
from infra.adapters.nats.issue_publisher import check_title, new_issue


@pytest.mark.parametrize("repo", ["", "a b", "a/b/c", "/x", "x/", "a/..", "a*b", "a.>", "own_er/x"])
def test_invalid_repo(repo):
    with pytest.raises(ConfigError, match="invalid repo"):
        new_issue(repo=repo, title="t", number=1)


@pytest.mark.parametrize("repo", ["owner/name", "name", "my-org/my.repo", "ab/c_d"])
def test_valid_repo(repo):
    assert new_issue(repo=f" {repo} ", title="t", number=1).repo == repo


def test_title_and_number_validation():
    with pytest.raises(ConfigError, match="title"):
        check_title("   ")
    with pytest.raises(ConfigError, match="number"):
        new_issue(repo="a/b", title="t", number=0)
    with pytest.raises(ConfigError, match="source"):
        new_issue(repo="a/b", title="t", number=1, source="no.dots")
    with pytest.raises(ConfigError, match="label"):
        new_issue(repo="a/b", title="t", number=1, labels=("ok", " "))
    e = new_issue(repo="a/b", title="t", number=3, source="github")
    assert e.event_id == "github:a/b#3:opened" and e.rel_subject == "issue.github.a_b.3.opened"
    # a source whose task ids could not be told apart from another's, and an owner whose
    # local ids would be a GitHub repository's (gh-acme/app's #3 would be acme/app's)
    with pytest.raises(ConfigError, match="unknown issue source 'gh'"):
        new_issue(repo="a/b", title="t", number=3, source="gh")
    with pytest.raises(ConfigError, match="reserved"):
        new_issue(repo="gh-acme/app", title="t", number=3)
