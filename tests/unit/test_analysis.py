"""The rule-based analyser, pure: an issue in, specialty, requirements, complexity,
priority, security level and dependencies out, each decision with its reason."""

from __future__ import annotations

import pytest

from actors.analysis import Analyser, RuleAnalyser, analyse_issue
from events.subjects import task_id_for
from events.task import IssueRef


def analyse(title: str, body: str = "", labels: tuple[str, ...] = (), number: int = 1):
    return analyse_issue(IssueRef(source="local", repo="acme/app", number=number, title=title, body=body,
                                  labels=labels))


# -- specialty ---------------------------------------------------------------------------
def test_a_label_outweighs_paths_and_keywords() -> None:
    a = analyse("Button broken", "The api endpoint in server.py returns 500", labels=("Frontend",))
    assert a.specialty == "frontend"
    assert a.reasons[0] == "label 'frontend' -> frontend (+10)"  # labels are compared lower-case
    assert set(a.requirements) >= {"frontend", "backend", "python"}  # every signal is a requirement


@pytest.mark.parametrize(("title", "specialty", "language"), [
    ("Crash in src/server/app.py", "backend", "python"),
    ("Flaky tests/test_login.py", "testing", "python"),
    ("Broken Button.tsx", "frontend", "typescript"),
    ("Update the Dockerfile", "devops", None),
    ("Add migrations/0002_add_index.sql", "database", "sql"),
    ("Typo in docs/guide.md", "documentation", "markdown"),
    ("Speed up .github/workflows/ci.yml", "devops", None),
])
def test_paths_named_in_the_issue_choose_the_specialty(
    title: str, specialty: str, language: str | None
) -> None:
    a = analyse(title)
    assert a.specialty == specialty
    assert any(r.startswith("path '") and r.endswith(f"-> {specialty} (+3)") for r in a.reasons), a.reasons
    if language:
        assert language in a.requirements


def test_keywords_match_whole_words_only() -> None:
    assert analyse("Capital letters in the testimony").specialty == "general"
    a = analyse("The login page layout breaks in the browser")
    assert a.specialty == "frontend" and "keywords browser, layout, page -> frontend (+3)" in a.reasons


def test_a_url_is_not_a_path() -> None:
    a = analyse("See https://example.com/src/app.py for the trace")
    assert not any(r.startswith("path ") for r in a.reasons)


def test_no_signal_is_general_and_says_so() -> None:
    a = analyse("Something is odd")
    assert a.specialty == "general" and a.requirements == ()
    assert "no label, path or keyword signal -> general" in a.reasons


def test_a_tie_goes_to_the_specialty_listed_first() -> None:
    assert analyse("api and css").specialty == "backend"
    assert analyse("css and api").specialty == "backend"  # order in the text does not matter


# -- priority and security -----------------------------------------------------------------
@pytest.mark.parametrize(("labels", "priority"), [
    ((), "normal"),
    (("p1",), "high"),
    (("low", "p1"), "high"),  # the highest named priority wins
    (("critical", "high"), "urgent"),
    (("Low-Priority",), "low"),
])
def test_priority_comes_from_labels(labels: tuple[str, ...], priority: str) -> None:
    a = analyse("x", labels=labels)
    assert a.priority == priority
    assert (f"priority {priority} from labels" in a.reasons) == (priority != "normal")


@pytest.mark.parametrize(("title", "labels", "level"), [
    ("Fix the date format", (), "public"),
    ("Fix the date format", ("internal",), "internal"),
    ("Fix the date format", ("confidential",), "confidential"),
    ("Fix xss in comments", (), "confidential"),  # a security issue is confidential by itself
    ("Fix the date format", ("security",), "confidential"),
    ("Fix the date format", ("restricted", "security"), "restricted"),
])
def test_security_level(title: str, labels: tuple[str, ...], level: str) -> None:
    a = analyse(title, labels=labels)
    assert a.security_level == level
    assert (f"security level {level}" in a.reasons) == (level != "public")


# -- complexity ------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "labels", "complexity"), [
    ("", (), "trivial"),
    ("one two three four five six seven eight nine ten eleven twelve", (), "small"),
    ("word " * 200, (), "medium"),
    ("word " * 500, (), "large"),
    ("word " * 500, ("good first issue",), "trivial"),
    ("touch a.py b.py c.py d.py e.py", (), "medium"),  # more than three files is not small
])
def test_complexity_from_length_and_files(body: str, labels: tuple[str, ...], complexity: str) -> None:
    a = analyse("Fix it", body, labels=labels)
    assert a.complexity == complexity
    assert any(r.startswith(f"complexity {complexity} (") for r in a.reasons)


# -- dependencies ----------------------------------------------------------------------------
def test_written_dependencies_become_task_ids() -> None:
    a = analyse("Search", "Depends on #12 and #13, blocked by other/lib#4; after #1. Depends on #12 again.",
                number=1)
    assert a.dependencies == (task_id_for("acme/app", 12), task_id_for("acme/app", 13),
                              task_id_for("other/lib", 4))  # in order, once, never itself
    assert "depends on acme_app-12, acme_app-13, other_lib-4" in a.reasons


def test_a_mention_is_not_a_dependency() -> None:
    assert analyse("Like #12 but for search").dependencies == ()


# -- the Analyser protocol ---------------------------------------------------------------------
async def test_the_rule_analyser_is_an_analyser_with_the_same_answer() -> None:
    issue = IssueRef(source="local", repo="acme/app", number=3, title="Fix xss in comments", labels=("p0",))
    analyser: Analyser = RuleAnalyser()
    result = await analyser.analyse(issue)
    assert analyser.name == "rules" and result == analyse_issue(issue)
    assert result.usage is None  # no model, no cost
    assert (result.specialty, result.priority) == ("security", "urgent")
    assert result.security_level == "confidential"
