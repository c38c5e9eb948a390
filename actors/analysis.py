"""Task analysis, pure: from an issue to specialty, requirements, complexity,
priority, security level and dependencies, each decision with its reason.

The rule-based analyser is the default and the fallback; a Claude-backed analyser
(:mod:`actors.claude_analysis`) plugs in behind the same :class:`Analyser` protocol and
returns the same :class:`~events.task.Analysis`."""

from __future__ import annotations

import re
from typing import Protocol

from events.errors import ConfigError
from events.subjects import task_id_for
from events.task import PRIORITIES, SECURITY_LEVELS, Analysis, IssueRef

LABEL_SPECIALTY = {
    "backend": "backend", "api": "backend", "server": "backend",
    "frontend": "frontend", "ui": "frontend", "ux": "frontend", "css": "frontend",
    "testing": "testing", "tests": "testing", "test": "testing", "qa": "testing",
    "devops": "devops", "ci": "devops", "infra": "devops", "infrastructure": "devops", "deploy": "devops",
    "database": "database", "db": "database", "migration": "database", "sql": "database",
    "security": "security", "vulnerability": "security",
    "documentation": "documentation", "docs": "documentation",
}
KEYWORDS = {
    "backend": ("api", "endpoint", "backend", "server", "handler", "fastapi", "django", "flask",
                "service", "rest", "grpc"),
    "frontend": ("ui", "frontend", "css", "react", "component", "button", "page", "layout",
                 "stylesheet", "browser", "vue", "typescript"),
    "testing": ("test", "tests", "testing", "coverage", "pytest", "jest", "flaky", "unittest",
                "regression"),
    "devops": ("ci", "docker", "dockerfile", "deploy", "deployment", "pipeline", "kubernetes", "k8s",
               "helm", "terraform", "ansible", "workflow", "github actions"),
    "database": ("database", "migration", "migrations", "sql", "postgres", "postgresql", "mysql",
                 "sqlite", "schema", "index", "query", "queries"),
    "security": ("security", "vulnerability", "xss", "csrf", "injection", "cve", "authentication",
                 "authorization", "secret", "secrets", "password", "exploit"),
    "documentation": ("docs", "documentation", "readme", "typo", "tutorial", "docstring", "guide"),
}
EXT_SPECIALTY = {
    ".py": "backend", ".go": "backend", ".rs": "backend", ".java": "backend", ".rb": "backend",
    ".ts": "frontend", ".tsx": "frontend", ".jsx": "frontend", ".js": "frontend", ".css": "frontend",
    ".scss": "frontend", ".html": "frontend", ".vue": "frontend", ".svelte": "frontend",
    ".sql": "database", ".tf": "devops", ".md": "documentation", ".rst": "documentation",
}
EXT_LANGUAGE = {
    ".py": "python", ".go": "go", ".rs": "rust", ".java": "java", ".rb": "ruby", ".ts": "typescript",
    ".tsx": "typescript", ".js": "javascript", ".jsx": "javascript", ".css": "css", ".scss": "css",
    ".html": "html", ".vue": "vue", ".sql": "sql", ".tf": "terraform", ".md": "markdown",
}
PRIORITY_LABELS = {
    "urgent": "urgent", "critical": "urgent", "p0": "urgent", "blocker": "urgent",
    "high": "high", "high-priority": "high", "priority: high": "high", "p1": "high",
    "low": "low", "low-priority": "low", "p3": "low",
}
SECURITY_RANK = {level: rank for rank, level in enumerate(SECURITY_LEVELS)}
WEIGHT_LABEL, WEIGHT_PATH, WEIGHT_KEYWORD = 10, 3, 1

_PATH = re.compile(
    r"(?<![\w/.-])((?:[\w.-]+/)*(?:Dockerfile|Makefile|[\w.-]*\.[A-Za-z0-9]{1,5}))(?![\w/-])"
)
_DEPENDS = re.compile(
    r"\b(?:depends\s+on|blocked\s+by|after)\s+((?:[\w.-]+/[\w.-]+)?#\d+(?:\s*(?:,|and)\s*(?:[\w.-]+/[\w.-]+)?#\d+)*)",
    re.IGNORECASE,
)
_REF = re.compile(r"(?:([\w.-]+/[\w.-]+))?#(\d+)")
_KEYWORD_RES = {
    specialty: re.compile(r"\b(" + "|".join(re.escape(k) for k in words) + r")\b", re.IGNORECASE)
    for specialty, words in KEYWORDS.items()
}


class Analyser(Protocol):
    """Decides specialty, requirements, complexity, priority, security level and
    dependencies of an issue. Must not fail for want of a service: an analyser that asks
    one falls back to the rules, saying why in the reasons."""

    name: str  # recorded on ``task.analysis_started``

    async def analyse(self, issue: IssueRef) -> Analysis: ...


def _path_specialty(path: str) -> str | None:
    lower = path.lower()
    name = lower.rsplit("/", 1)[-1]
    if name.startswith("test_") or "/tests/" in f"/{lower}" or re.search(r"[._]test\.\w+$|_test\.go$|\.spec\.\w+$", name):
        return "testing"
    if name in ("dockerfile", "makefile") or lower.startswith(".github/workflows/") or name.endswith((".yml", ".yaml")) and "workflow" in lower:
        return "devops"
    if "migrations/" in lower:
        return "database"
    ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return EXT_SPECIALTY.get(ext)


def analyse_issue(issue: IssueRef) -> Analysis:
    """The rule-based analyser: labels weigh most, then file paths named in the
    issue, then whole-word keywords. No signal -> ``general``."""
    text = f"{issue.title}\n{issue.body}"
    labels = [label.strip().lower() for label in issue.labels]
    scores: dict[str, int] = {}
    reasons: list[str] = []

    def score(specialty: str, weight: int, why: str) -> None:
        scores[specialty] = scores.get(specialty, 0) + weight
        reasons.append(f"{why} -> {specialty} (+{weight})")

    for label in labels:
        if label in LABEL_SPECIALTY:
            score(LABEL_SPECIALTY[label], WEIGHT_LABEL, f"label '{label}'")
    paths = [m.group(1) for m in _PATH.finditer(text) if not m.group(1).startswith(("http", "www."))]
    languages: set[str] = set()
    for path in dict.fromkeys(paths):
        spec = _path_specialty(path)
        ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if ext in EXT_LANGUAGE:
            languages.add(EXT_LANGUAGE[ext])
        if spec:
            score(spec, WEIGHT_PATH, f"path '{path}'")
    for specialty, pattern in _KEYWORD_RES.items():
        found = sorted({m.group(1).lower() for m in pattern.finditer(text)})
        if found:
            score(specialty, WEIGHT_KEYWORD * len(found), f"keywords {', '.join(found)}")

    if scores:
        # highest score wins; ties go to the more specific specialty in this order
        order = list(KEYWORDS)
        specialty = max(scores, key=lambda s: (scores[s], -order.index(s)))
    else:
        specialty = "general"
        reasons.append("no label, path or keyword signal -> general")

    named = [PRIORITY_LABELS[label] for label in labels if label in PRIORITY_LABELS]
    priority = max(named, key=PRIORITIES.index, default="normal")
    if priority != "normal":
        reasons.append(f"priority {priority} from labels")

    security = "public"
    if "restricted" in labels:
        security = "restricted"
    elif specialty == "security" or "security" in labels or "confidential" in labels:
        security = "confidential"
    elif "internal" in labels:
        security = "internal"
    if security != "public":
        reasons.append(f"security level {security}")

    n_paths = len(set(paths))
    words = len(text.split())
    if "good first issue" in labels or (words < 25 and n_paths <= 1):
        complexity = "trivial" if "good first issue" in labels or words < 12 else "small"
    elif words < 150 and n_paths <= 3:
        complexity = "small"
    elif words < 400 and n_paths <= 8:
        complexity = "medium"
    else:
        complexity = "large"
    reasons.append(f"complexity {complexity} ({words} words, {n_paths} paths)")

    deps: list[str] = []
    for m in _DEPENDS.finditer(text):
        for ref in _REF.finditer(m.group(1)):
            repo = ref.group(1) or issue.repo
            number = int(ref.group(2))
            if (repo, number) != (issue.repo, issue.number):
                try:  # "#12" is an issue of the same forge as this one: its task id says which
                    deps.append(task_id_for(repo, number, issue.source))
                except ConfigError:
                    reasons.append(f"ignored dependency {repo}#{number}: no task of this cluster can have it")
    deps = list(dict.fromkeys(deps))
    if deps:
        reasons.append(f"depends on {', '.join(deps)}")

    predicted = predicted_paths(paths)
    if predicted:
        reasons.append(f"predicted to touch {', '.join(predicted)}")
    requirements = tuple(sorted(set(s for s in scores if scores[s] > 0) | languages))
    return Analysis(
        specialty=specialty, requirements=requirements, complexity=complexity,
        priority=priority, security_level=security, dependencies=tuple(deps),
        reasons=tuple(reasons), paths=predicted,
    )


# what a named file must look like to be predicted as touched (so "e.g." or "v1.2" are not)
_SOURCE_EXTENSIONS = frozenset(
    "py pyi js jsx ts tsx mjs cjs css scss sass less html htm vue svelte md rst txt go rs java kt "
    "rb php c h cc cpp hpp cs swift m scala sql sh bash yml yaml json toml ini cfg conf xml "
    "proto graphql tf lock gradle".split())
MAX_PREDICTED_PATHS = 20


def predicted_paths(named: list[str]) -> tuple[str, ...]:
    """The files an issue names that look like files of a repository, normalised
    (``./a.py`` -> ``a.py``), in order, at most :data:`MAX_PREDICTED_PATHS`."""
    out: list[str] = []
    for raw in named:
        path = raw.strip().removeprefix("./").strip("/")
        name = path.rsplit("/", 1)[-1]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if not path or ".." in path.split("/"):
            continue
        if name in ("Dockerfile", "Makefile") or ext in _SOURCE_EXTENSIONS:
            out.append(path)
    return tuple(dict.fromkeys(out))[:MAX_PREDICTED_PATHS]


class RuleAnalyser:
    name = "rules"
    instant = True  # no I/O: the coordinator may record creation and analysis together

    async def analyse(self, issue: IssueRef) -> Analysis:
        return analyse_issue(issue)
