"""The subject scheme's one id validator and one repository-name validator."""

from __future__ import annotations

import pytest

from events.errors import ConfigError, DomainError
from events.subjects import check_id, check_repo, repo_parts, repo_token, task_id_for, task_id_stem


@pytest.mark.parametrize("value", ["agent-1", "acme_repo-7", "a=b", "x" * 128])
def test_valid_ids_are_returned_unchanged(value: str) -> None:
    assert check_id(value) == value


@pytest.mark.parametrize("value", ["", "a.b", "a*", "a>", "a b", "x" * 129, "ü", None])
def test_an_id_that_cannot_be_a_subject_token_is_refused(value) -> None:
    with pytest.raises(ConfigError, match=r"invalid task id .*letters, digits"):
        check_id(value, "task id")


def test_the_caller_says_what_kind_of_error_a_bad_id_is() -> None:
    with pytest.raises(DomainError, match="invalid agent id 'a.b'"):
        check_id("a.b", "agent id", error=DomainError)


@pytest.mark.parametrize(("repo", "expected"), [
    ("acme/shop", "acme/shop"), (" acme/shop \n", "acme/shop"), ("shop", "shop"),
    ("acme/.github", "acme/.github"), ("my-org/my_repo.js", "my-org/my_repo.js"),
    ("acme/shop.git", "acme/shop.git"), ("a" * 99 + "/" + "b" * 100, "a" * 99 + "/" + "b" * 100),
])
def test_valid_repository_names(repo: str, expected: str) -> None:
    assert check_repo(repo) == expected


@pytest.mark.parametrize("repo", [
    "", "   ", "a/b/c", "acme_corp/shop",  # "_" in the owner would make repo_token ambiguous
    "-acme/shop", ".acme/shop", ".hidden", "acme/..", "acme/.", "acme/...", "acme/a..b", "../etc",
    "acme/sh op", "acme/sh*p", "acme/", "/shop", "a" * 100 + "/b", "acme/" + "b" * 101, None,
])
def test_invalid_repository_names_are_refused(repo) -> None:
    with pytest.raises(ConfigError, match="use 'owner/name' or 'name'"):
        check_repo(repo)


def test_a_repository_error_can_be_a_domain_error_too() -> None:
    with pytest.raises(DomainError, match="invalid repository"):
        check_repo("a/b/c", "repository", error=DomainError)


def test_a_bare_name_is_owned_by_local() -> None:
    assert repo_parts("shop") == ("local", "shop") and repo_parts("acme/shop") == ("acme", "shop")
    assert repo_token("shop") == "local_shop" and task_id_for("acme/my.shop", 7) == "acme_my=shop-7"


def test_task_ids_carry_their_source() -> None:
    """A local issue cannot create the task of a GitHub issue ahead of it: the two never
    share an id, while local ids stay what the demo, the README and old logs show."""
    assert task_id_for("acme/app", 7) == task_id_for("acme/app", 7, "local") == "acme_app-7"
    assert task_id_for("acme/app", 7, "github") == "gh-acme_app-7"
    assert task_id_stem("acme/app", "github") == "gh-acme_app" and task_id_stem("shop") == "local_shop"
    for source in ("local", "github"):
        check_id(task_id_for("octo-org/my.app", 12, source))  # a valid subject token


def test_no_local_repository_has_a_github_repositorys_ids() -> None:
    # gh-acme/app's local #7 would be acme/app's GitHub #7: such owners are reserved
    with pytest.raises(ConfigError, match="owners starting with 'gh-' are reserved"):
        task_id_for("gh-acme/app", 7)
    assert task_id_for("gh-acme/app", 7, "github") == "gh-gh-acme_app-7"  # GitHub allows the name
    assert task_id_for("GH-acme/app", 7) == "GH-acme_app-7" and task_id_for("ghx/app", 7) == "ghx_app-7"
    with pytest.raises(ConfigError, match="unknown issue source 'gitlab'"):
        task_id_for("acme/app", 7, "gitlab")
