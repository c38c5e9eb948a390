"""Publishing issue facts from the CLI (the local forge's intake), with issue numbers
allocated on the log itself.

``allocate_number`` proposes ``max + 1`` for a repository and returns the stream
sequence of the repository's last ``opened`` message; the publish then carries
``Nats-Expected-Last-Subject-Sequence`` scoped to ``<ns>.issue.<source>.<repo>.*.opened``.
If anyone opened an issue on that repository in between, the server refuses the
publish (10071) and we allocate again: two concurrent publishers never get the same
number, with no lock and no counter outside the log.

The event id is derived from the issue (``local:owner/name#7:opened``), so publishing
the same issue number twice is a no-op that reports the first message's sequence.
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone
from typing import NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from events.errors import ConcurrencyConflict, ConfigError, StoreUnavailable
from events.issue import IssueOpened
from events.secrets import masked_json
from events.store import EXPECTED_SEQ, EXPECTED_SEQ_SUBJECT, MSG_ID, WRONG_LAST_SEQUENCE
from events.subjects import Namespace, check_id, check_repo, repo_token, task_id_for, token
from events.trust import OPERATOR

MAX_ALLOCATION_ATTEMPTS = 32  # each lost race means someone else got a number: progress


class Allocation(NamedTuple):
    number: int
    expected_last_seq: int  # 0: no issue opened on this repository yet
    scope: str  # the wildcard the expectation is about


class Published(NamedTuple):
    event: IssueOpened
    subject: str
    stream: str
    seq: int
    duplicate: bool

    @property
    def task_id(self) -> str:
        return task_id_for(self.event.repo, self.event.number, self.event.source)


# -- validation ---------------------------------------------------------------------
def check_title(title: str | None) -> str:
    title = (title or "").strip()
    if not title:
        raise ConfigError("the issue needs a non-empty title")
    return title


def opened_scope(ns: Namespace, source: str, repo: str) -> str:
    return f"{ns.prefix}.issue.{token(source)}.{repo_token(repo)}.*.opened"


def opened_event_id(source: str, repo: str, number: int) -> str:
    return f"{source}:{repo}#{number}:opened"


def new_issue(
    *,
    repo: str,
    title: str,
    number: int,
    body: str = "",
    labels: tuple[str, ...] = (),
    source: str = "local",
    actor: str = "cli",
    at: datetime | None = None,
) -> IssueOpened:
    """A validated :class:`IssueOpened` with its deterministic event id, published as
    the local operator: ``author_association`` is set (to ``OWNER``) explicitly, since a
    fact without it is trusted with nothing at intake."""
    repo, title = check_repo(repo), check_title(title)
    check_id(source, "source")
    if number < 1:
        raise ConfigError(f"invalid issue number {number}: must be 1 or more")
    task_id_for(repo, number, source)  # a source the cluster knows, an owner its task ids allow
    labels = tuple(lbl.strip() for lbl in labels)
    if any(not lbl for lbl in labels):
        raise ConfigError("labels must be non-empty")
    return IssueOpened(
        event_id=opened_event_id(source, repo, number), source=source, repo=repo,
        number=number, occurred_at=at or datetime.now(timezone.utc), actor=actor,
        title=title, body=body, labels=labels, author=actor, author_association=OPERATOR,
    )


# -- NATS ---------------------------------------------------------------------------
async def publish_issue(
    nc: Client, ns: Namespace, event: IssueOpened, *, expect: Allocation | None = None,
    timeout: float = 5.0,
) -> tuple[int, bool]:
    """Publish one issue event to ``<NS>_ISSUES``; returns ``(seq, duplicate)``.

    ``Nats-Msg-Id`` is the event id, so a repeat within the stream's duplicate window
    returns the original sequence with ``duplicate=True``. With ``expect`` the publish
    is refused with :class:`ConcurrencyConflict` if the scope moved on."""
    js = nc.jetstream(timeout=timeout)
    subject = ns.subject(event.rel_subject)
    headers = {MSG_ID: event.event_id}
    if expect is not None:
        headers[EXPECTED_SEQ] = str(expect.expected_last_seq)
        headers[EXPECTED_SEQ_SUBJECT] = expect.scope
    try:
        # masked like every event (events.secrets): an issue body may carry a pasted token
        ack = await js.publish(subject, masked_json(event), headers=headers, stream=ns.issues_stream)
    except nats.js.errors.APIError as e:
        if e.err_code == WRONG_LAST_SEQUENCE:
            raise ConcurrencyConflict(f"{expect.scope if expect else subject}: {e.description}") from None
        raise StoreUnavailable(f"publish {subject}: {e.description or e}") from None
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
        raise StoreUnavailable(f"publish {subject}: {type(e).__name__}: {e}") from None
    return ack.seq, bool(ack.duplicate)


async def allocate_number(js, ns: Namespace, source: str, repo: str) -> Allocation:
    """Propose the next issue number of ``repo`` and the expectation that guards it.

    The last ``opened`` message of the repository gives the sequence to expect; the
    number is one more than the highest ever opened (read from the stream's subject
    index, so an explicit ``--number 100`` published earlier is respected). The
    sequence is read first: anything published after it makes our publish fail."""
    scope = opened_scope(ns, source, repo)
    try:
        try:
            last = await js.get_last_msg(ns.issues_stream, scope, direct=True)
            last_seq = last.seq or 0
        except nats.js.errors.NotFoundError:
            return Allocation(1, 0, scope)
        info = await js.stream_info(ns.issues_stream, subjects_filter=scope)
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as e:
        raise StoreUnavailable(f"allocate an issue number for {repo}: {type(e).__name__}: {e}") from None
    highest = 0
    for subject in (info.state.subjects or {}):
        try:
            highest = max(highest, int(subject.rsplit(".", 2)[-2]))
        except ValueError:  # not ours (e.g. a hand-published odd subject)
            continue
    return Allocation(highest + 1, last_seq, scope)


async def open_issue(
    nc: Client,
    ns: Namespace,
    *,
    repo: str,
    title: str,
    body: str = "",
    labels: tuple[str, ...] = (),
    number: int | None = None,
    source: str = "local",
    actor: str = "cli",
    at: datetime | None = None,
    timeout: float = 5.0,
) -> Published:
    """Open an issue: with ``number`` an idempotent publish of that issue, without it
    a new number allocated under optimistic concurrency (bounded retries)."""
    fields = dict(repo=repo, title=title, body=body, labels=labels, source=source, actor=actor, at=at)
    if number is not None:
        event = new_issue(number=number, **fields)
        seq, dup = await publish_issue(nc, ns, event, timeout=timeout)
        return Published(event, ns.subject(event.rel_subject), ns.issues_stream, seq, dup)
    new_issue(number=1, **fields)  # validate before touching NATS
    js = nc.jetstream(timeout=timeout)
    for attempt in range(MAX_ALLOCATION_ATTEMPTS):
        alloc = await allocate_number(js, ns, source, repo)
        event = new_issue(number=alloc.number, **fields)
        try:
            seq, dup = await publish_issue(nc, ns, event, expect=alloc, timeout=timeout)
        except ConcurrencyConflict:
            pass  # lost the race: someone opened an issue on this repo meanwhile
        else:
            if not dup:
                return Published(event, ns.subject(event.rel_subject), ns.issues_stream, seq, False)
            # a duplicate id here means a concurrent publisher holds this number (the
            # dedup check runs before the sequence check): not ours, allocate again
        await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
    raise ConcurrencyConflict(
        f"could not allocate an issue number for {repo} after {MAX_ALLOCATION_ATTEMPTS} attempts"
    )
