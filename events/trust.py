"""The intake's trust policy: whose issue facts may start or drive work, and on which
repositories. Pure (no I/O, no environment): the settings build it, the adapters and
actors are handed it.

It is applied twice, on purpose. The webhook receiver applies it to what GitHub tells
it, so an untrusted comment never even reaches the log. The coordinator's intake
applies it again to every fact it consumes, because the webhook is not the only way
onto the issue subjects: ``ccc issue publish``, a script with ``nats pub``, or anything
else that can reach NATS publishes there too. Trust is therefore a property of the fact
(``author_association`` travels with it), checked where work is decided, and a fact
that does not say who wrote it is trusted with nothing (``NONE``).

Associations are not permissions. GitHub's ``MEMBER`` is anyone in the organisation,
``COLLABORATOR`` includes people invited with read or triage access: none of them need
be able to push. What "trusted" means is write permission on the repository, which only
the forge's API knows (GitHub: ``GET /repos/{owner}/{repo}/collaborators/{user}/permission``).
The webhook receiver asks it when it has GitHub credentials and writes the answer on the
fact (``author_permission``); where a permission is on a fact, it must be write or above,
*and* the association must pass (a cheap first filter that spares the API the spam).
For the sources in ``permission_required_for`` a fact without a permission is refused:
the cluster's own forge (``--forge github``) has the credentials, so a GitHub fact that
does not carry one did not come through a receiver that checked. Without credentials
the receiver falls back to the associations alone, and says so when it starts.

Which facts carry an author: the ones a person writes (opened, a free-text request, a
retry/cancel request, changes requested). The others are the forge's own observations
(closed, reopened, merged, a pull request closed, edited, labeled): they have no author
to check, only a repository.

Old logs. Before this policy ``IssueOpened`` defaulted to ``OWNER``, and as defaults are
left off the wire, ``ccc issue publish`` wrote no association at all. Read today, such
a fact is ``NONE`` and refused. That is deliberate: whoever publishes a fact writes all
of it, ``occurred_at`` included, so an old fact cannot be told from a forged one, and
grandfathering them would reopen the hole this closes. It costs little: the intake's
durable consumer acknowledged those facts long ago, and the tasks they created live in
the task log, which is the authority (the golden task log holds no issue facts and
re-projects unchanged). Only a fact not yet consumed at the upgrade, or a new intake
consumer reading the issue stream from the start, meets the refusal; it becomes a dead
letter with the reason (``ccc dead-letters``), and the operator publishes it again
(``ccc issue publish``, or ``nats pub`` with the field and a new event id).
"""

from __future__ import annotations

import msgspec

from events.errors import ConfigError
from events.issue import (
    IssueCancelRequested,
    IssueChangesRequested,
    IssueCommented,
    IssueEvent,
    IssueOpened,
    IssuePullRequestApproved,
    IssueRetryRequested,
)
from events.subjects import check_repo, repo_parts

NONE = "NONE"  # GitHub's "no association with the repository"; what a missing field means
GITHUB = "github"  # the source whose facts can carry a permission
PERMISSIONS: tuple[str, ...] = ("none", "read", "triage", "write", "maintain", "admin")
"""GitHub's repository roles, weakest first (the REST API's ``permission`` field says
``admin``, ``write``, ``read`` or ``none``; ``role_name`` the finer ones)."""
WRITE_PERMISSIONS: frozenset[str] = frozenset({"write", "maintain", "admin"})
TRUSTED_ASSOCIATIONS: frozenset[str] = frozenset({"OWNER", "MEMBER", "COLLABORATOR"})
OPERATOR = "OWNER"
"""The association of the local operator's facts (``ccc issue publish``, ``ccc tasks
cancel``): whoever runs the CLI against the cluster's NATS is trusted by role, as the
repository's owner would be on GitHub (who may publish at all is NATS's permissions)."""
REPOS_SETTING = "CCC_REPOS"  # named in refusals, so the operator knows what to change
AUTHORED = (IssueOpened, IssueCommented, IssueChangesRequested, IssueCancelRequested, IssueRetryRequested,
            IssuePullRequestApproved)
"""The facts a person writes: the only ones with an ``author_association`` to check."""


def association(value: str | None) -> str:
    """The association as GitHub spells it (upper case); empty or missing is ``NONE``."""
    return (value or "").strip().upper() or NONE


def permission(value: str | None) -> str:
    """The permission as GitHub spells it (lower case); empty or missing is ``""``, not
    looked up; anything GitHub does not define is ``none``."""
    value = (value or "").strip().lower()
    if not value:
        return ""
    return value if value in PERMISSIONS else "none"


def parse_repos(text: str | None, setting: str = REPOS_SETTING) -> tuple[str, ...]:
    """``owner/name, owner/*, ...`` -> the allow-list (empty: every repository).

    An entry is a repository as ``ccc issue publish --repo`` takes it (``owner/name``,
    or ``name`` owned by ``local``) or ``owner/*`` for all of an owner's repositories.
    Nothing fancier: a glob in the middle of a name is easy to get wrong in a security
    setting, and an owner wildcard covers the real need (an organisation)."""
    entries: list[str] = []
    for raw in (text or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        owner, _, name = entry.partition("/")
        probe = f"{owner}/x" if name == "*" else entry  # validate the owner of owner/*
        try:
            check_repo(probe)
        except ConfigError:
            raise ConfigError(f"{setting}: invalid repository {entry!r}: use 'owner/name' or 'owner/*', "
                              "comma-separated") from None
        if entry not in entries:
            entries.append(entry)
    return tuple(entries)


def _key(repo: str) -> tuple[str, str]:
    # GitHub compares owners and names case-insensitively; a bare name is local's
    owner, name = repo_parts(repo)
    return owner.lower(), name.lower()


class TrustPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Which author associations are trusted, and which repositories are served.

    The default trusts the repository's owner, members and collaborators on every
    repository, by association; with ``permission_required_for`` (or a permission on
    the fact) only those of them who may write to it."""

    associations: frozenset[str] = TRUSTED_ASSOCIATIONS
    repos: tuple[str, ...] = ()  # "owner/name" or "owner/*"; empty: every repository
    # sources whose authored facts must carry the author's permission (write or above);
    # {"github"} when the cluster has GitHub credentials to look it up
    permission_required_for: frozenset[str] = frozenset()

    def allows_repo(self, repo: str) -> bool:
        if not self.repos:
            return True
        owner, name = _key(repo)
        for entry in self.repos:
            want_owner, want_name = _key(entry)
            if want_owner == owner and want_name in ("*", name):
                return True
        return False

    def repo_refusal(self, repo: str) -> str:
        """Why facts about ``repo`` are refused, or "" if they are not."""
        if self.allows_repo(repo):
            return ""
        return f"repository {repo} is not in {REPOS_SETTING} ({', '.join(self.repos)})"

    def author_refusal(self, author: str, assoc: str | None, perm: str | None = None, *,
                       source: str = "") -> str:
        """Why this author is not listened to, or "" if they are: the association
        first, then the permission (``perm``, as the forge reported it; ``""`` or None:
        not looked up, which is refused only for the sources that require it)."""
        assoc, perm = association(assoc), permission(perm)
        who = author or "(unnamed)"
        if assoc not in self.associations:
            return f"untrusted author: {who} is {assoc}, not one of {', '.join(sorted(self.associations))}"
        if perm and perm not in WRITE_PERMISSIONS:
            return f"untrusted author: {who} has {perm} permission on the repository, not write"
        if not perm and source in self.permission_required_for:
            return (f"untrusted author: {who}'s permission on the repository is not on the fact "
                    f"(required for {source} facts: write or above; is the webhook receiver "
                    "running without GitHub credentials?)")
        return ""

    def refusal(self, event: IssueEvent) -> str:
        """Why the intake must not act on ``event``, or "" if it may: the repository
        first (it applies to every fact), then the author of the facts people write."""
        if why := self.repo_refusal(event.repo):
            return why
        if isinstance(event, AUTHORED):
            return self.author_refusal(event.author or event.actor, event.author_association,
                                       event.author_permission, source=event.source)
        return ""


__all__ = ["AUTHORED", "GITHUB", "NONE", "OPERATOR", "PERMISSIONS", "REPOS_SETTING", "TRUSTED_ASSOCIATIONS",
           "TrustPolicy", "WRITE_PERMISSIONS", "association", "parse_repos", "permission"]
