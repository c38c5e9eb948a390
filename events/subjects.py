"""The subject scheme: one place that knows how ids become NATS subjects.

``<ns>.issue.<source>.<repo>.<number>.<action>``  issue facts from outside  (<NS>_ISSUES)
``<ns>.task.<task_id>.<event>``                   task aggregate            (<NS>_EVENTS)
``<ns>.task.<task_id>.assigned.<agent_id>``       the assignment            (<NS>_EVENTS)
``<ns>.agent.<agent_id>.<event>``                 agent aggregate           (<NS>_EVENTS)
``<ns>.hb.<agent_id>``                            heartbeats                (<NS>_HEARTBEATS)
``<ns>.demand.<specialty>.<task_id>``             a task needing an agent   (<NS>_DEMAND)

``<ns>`` is ``ccc`` unless a :class:`Namespace` says otherwise: one NATS system can
host several independent clusters (staging and production, or one per test).
Events know only their subject *within* the namespace (``rel_subject``).

Tokens are sanitised ids: ``[A-Za-z0-9_=-]`` only, so they are also valid KV keys
and never contain the NATS separators ``.``, ``*``, ``>`` or whitespace.

The one validator of ids (:func:`check_id`) and of repository names (:func:`check_repo`)
lives here too: what a user, a webhook or a forge hands us either becomes a subject token
or a path on disk, so every entry point checks it the same way.
"""

from __future__ import annotations

import re

import msgspec

from events.errors import CccError, ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ID = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")
_NS = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# ``owner/name`` or ``name``; no "_" in the owner (as on GitHub): repo_token splits owner
# and name at the first "_"
_REPO = re.compile(r"^([A-Za-z0-9][A-Za-z0-9.-]{0,98}/)?[A-Za-z0-9_.-]{1,100}$")


QUEUE_BRANCH_PREFIX = "ccc-queue/"
"""The merge queue's candidate branches: ``ccc-queue/<task_id>`` holds the merge of the
task's pull request into the latest base while its checks run (the coordinator makes
it; the forges' CI and webhooks recognise it)."""


def token(value: str) -> str:
    """Make any string a safe subject token (lossy for exotic characters)."""
    out = _UNSAFE.sub("=", value.strip())
    if not out:
        raise ConfigError(f"empty id: {value!r}")
    return out[:128]


def check_id(value: str, what: str = "id", *, error: type[CccError] = ConfigError) -> str:
    """Validate an id (it becomes a subject token); never silently rewrite it.

    ``error`` is what a bad id is: bad input (:class:`ConfigError`, the default) where a
    user or a caller gave it, a :class:`~events.errors.DomainError` inside ``decide``."""
    if not _ID.match(value or ""):
        raise error(f"invalid {what} {value!r}: use letters, digits, '_', '-', '=' (max 128)")
    return value


def check_repo(repo: str, what: str = "repo", *, error: type[CccError] = ConfigError) -> str:
    """Validate a repository name, ``owner/name`` or ``name`` (owned by ``local``);
    returns it without surrounding whitespace.

    The owner starts with a letter or digit and has no ``_`` (GitHub's rule, and what
    lets :func:`repo_token` split at the first ``_``); neither part may climb out of a
    directory (no ``..``, no leading ``.`` on the whole, no name of dots only), because
    the local forge keeps ``<root>/<owner>/<name>.git``."""
    repo = (repo or "").strip()
    name = repo.rpartition("/")[2]
    if not _REPO.match(repo) or ".." in repo or repo.startswith(".") or not name.strip("."):
        raise error(f"invalid {what} {repo!r}: use 'owner/name' or 'name'")
    return repo


def repo_parts(repo: str) -> tuple[str, str]:
    """``owner/name`` -> ``(owner, name)``; a bare ``name`` is owned by ``local``.
    Does not validate: see :func:`check_repo`."""
    owner, _, name = repo.strip().partition("/")
    if not name:
        owner, name = "local", owner
    return owner, name


def repo_token(repo: str) -> str:
    """``owner/name`` -> ``owner_name``. GitHub owners cannot contain ``_``, so the
    first ``_`` splits unambiguously; ``.`` and other characters become ``=``."""
    owner, name = repo_parts(repo)
    return f"{token(owner)}_{token(name)}"


SOURCE_PREFIXES: dict[str, str] = {"local": "", "github": "gh"}
"""The issue sources the cluster knows, and the prefix each one's task ids carry.

The local forge's ids have none (``acme_app-7``: what the demo, the README and the golden
log show), every other source has one (``gh-acme_app-7``), so the task of a GitHub issue
is not the task of the local issue with the same repository and number: whoever may
publish local issue facts (``ccc issue publish``, ``nats pub``) cannot create, ahead of
time, the task a GitHub issue will need, and so cannot decide what it looks like."""


def task_id_stem(repo: str, source: str = "local") -> str:
    """Everything of a task id but the issue number: ``gh-acme_app`` for GitHub's
    ``acme/app``, ``acme_app`` for the local forge's; branch names start with it too.

    Injective across sources: a local id starts with an owner's token, and owners may
    not start with a source's prefix and ``-`` (``gh-acme/app`` cannot be a local
    repository: its ids would be GitHub's ``acme/app``'s), so no local repository's id
    is a GitHub repository's. Raises :class:`ConfigError` for an unknown source (its ids
    could not be told apart) and for such an owner."""
    if source not in SOURCE_PREFIXES:
        raise ConfigError(f"unknown issue source {source!r}: one of {', '.join(SOURCE_PREFIXES)}")
    stem = repo_token(repo)
    prefix = SOURCE_PREFIXES[source]
    if prefix:
        return f"{prefix}-{stem}"
    for reserved in filter(None, SOURCE_PREFIXES.values()):
        if stem.startswith(f"{reserved}-"):
            raise ConfigError(f"repository {repo!r}: owners starting with '{reserved}-' are reserved "
                              f"(task ids starting with '{reserved}-' are those of another source)")
    return stem


def task_id_for(repo: str, number: int, source: str = "local") -> str:
    """One task per issue: the id is derived, so a repeated issue event maps to the
    same task and its creation deduplicates. The source is part of it
    (:data:`SOURCE_PREFIXES`): ``acme_app-7`` locally, ``gh-acme_app-7`` on GitHub.

    Ids are derived here only for new facts; a task keeps the id it was created with
    (ids come from the events), so old logs replay unchanged."""
    return f"{task_id_stem(repo, source)}-{int(number)}"


# -- subjects relative to the namespace ----------------------------------------------
def issue_subject(source: str, repo: str, number: int, action: str) -> str:
    return f"issue.{token(source)}.{repo_token(repo)}.{int(number)}.{token(action)}"


def task_subject(task_id: str, event: str, agent_id: str | None = None) -> str:
    if agent_id is not None:
        return f"task.{task_id}.{event}.{agent_id}"
    return f"task.{task_id}.{event}"


def agent_subject(agent_id: str, event: str) -> str:
    return f"agent.{agent_id}.{event}"


class Namespace(msgspec.Struct, frozen=True):
    """Absolute subjects, stream and bucket names for one cluster."""

    prefix: str = "ccc"

    def __post_init__(self) -> None:
        if not _NS.match(self.prefix):
            raise ConfigError(f"invalid namespace {self.prefix!r}: lowercase letters, digits, '_'")

    # streams and buckets
    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def issues_stream(self) -> str:
        return f"{self.prefix.upper()}_ISSUES"

    @property
    def heartbeats_stream(self) -> str:
        return f"{self.prefix.upper()}_HEARTBEATS"

    @property
    def dlq_stream(self) -> str:
        return f"{self.prefix.upper()}_DLQ"

    def dlq_subject(self, consumer: str) -> str:
        return f"{self.prefix}.dlq.{consumer}"

    @property
    def demand_stream(self) -> str:
        """The tasks waiting for an agent or held by one, per specialty, one message each
        (``actors.demand``): what KEDA scales agent Deployments on. Soft state, kept
        equal to the read model."""
        return f"{self.prefix.upper()}_DEMAND"

    def demand_subject(self, specialty: str, task_id: str) -> str:
        return f"{self.prefix}.demand.{specialty}.{task_id}"

    def demand_filter(self, specialty: str = "*") -> str:
        """One specialty's demand (its ``demand-<specialty>`` consumer filters on it)."""
        return f"{self.prefix}.demand.{specialty}.>"

    @property
    def tasks_bucket(self) -> str:
        return f"{self.prefix}_tasks"

    @property
    def agents_bucket(self) -> str:
        return f"{self.prefix}_agents"

    @property
    def artifacts_bucket(self) -> str:
        return f"{self.prefix}_artifacts"

    def agent_artifacts_bucket(self, agent_id: str) -> str:
        """Where an agent writes its artifacts: a bucket of its own, so that permissions
        can confine it there (an object's subject carries its name base64-encoded, so a
        shared bucket could not be split by subject)."""
        return f"{self.artifacts_bucket}_{check_id(agent_id, 'agent id').replace('-', '_')}"

    # subjects
    def subject(self, rel: str) -> str:
        return f"{self.prefix}.{rel}"

    def rel(self, subject: str) -> str:
        return subject[len(self.prefix) + 1:]

    def task_filter(self, task_id: str = "*") -> str:
        """Every event of one task: also the optimistic-concurrency scope."""
        return f"{self.prefix}.task.{task_id}.>"

    def agent_filter(self, agent_id: str = "*") -> str:
        return f"{self.prefix}.agent.{agent_id}.>"

    def assignments_filter(self, agent_id: str) -> str:
        """What an agent's durable consumer filters on: only its own assignments."""
        return f"{self.prefix}.task.*.assigned.{agent_id}"

    def heartbeat_subject(self, agent_id: str) -> str:
        return f"{self.prefix}.hb.{agent_id}"

    def scope_of(self, subject: str) -> str | None:
        """The concurrency scope (``<ns>.task.<id>.>``) of an aggregate subject."""
        parts = subject.split(".")
        if len(parts) >= 4 and parts[0] == self.prefix and parts[1] in ("task", "agent"):
            return f"{self.prefix}.{parts[1]}.{parts[2]}.>"
        return None


DEFAULT_NS = Namespace()
