"""The spend ledger, pure: caps per task, repository, author and day, and the rules that
keep every cap whatever the number of agents calling the model at once.

**Scopes.** Every model call is charged to four scopes: its task (for the task's life),
its repository, its issue's author (when known) and the whole cluster, the last three
per UTC day (a new day is a new entry, so they reset at 00:00 UTC). A cap (:class:`Caps`)
may be set on each kind, with per-repository and per-author overrides; a scope without a
cap is still counted (``ccc budget`` shows it), it just never refuses.

**Reservations.** Before a call, an agent reserves the call's *maximum* cost (its
prompt's upper bound at the dearest input rate plus ``max_tokens`` of output, see
:func:`infra.adapters.coders.prices.max_call_cost`) against every capped scope; after
it, it settles the real cost, which replaces the hold. :func:`reserve` admits a hold only
if ``spent + reserved + amount <= cap``, so at every moment what is spent plus what may
still be spent stays within the cap: a cap can be exceeded only by a call that cost more
than its reservation (the bound is an upper bound, so in practice not at all), or by a
call still running after its hold expired (holds live as long as the call may: its
timeout plus a margin; an expired hold is a crashed agent's and is dropped, so a crash
never locks a scope).

* ``spent + amount > cap``: the scope is **exhausted** for this call — no new call
  starts in it; a running task stops at its next call and keeps its work (commit and
  draft pull request), a queued one waits (``budget:<scope>``) until the day resets or
  the cap is raised. The refused amount is remembered (:attr:`Entry.refused`), so the
  scheduler can tell an exhausted scope (headroom below what the last refused call
  needed) from one with room.
* ``spent + reserved + amount > cap`` but not the above: the scope is **busy** — other
  agents' calls hold the headroom; the caller waits for them to settle (their
  reservations are maxima: most of it comes back) and tries again.

**Why a KV counter with compare-and-set, not events on the log.** A reservation must be
decided against the scope's current total before the call starts, by whichever agent
asks, with no single writer in the way: the KV entry of a scope is that total, and
``update(last=revision)`` makes each reservation an atomic read-check-write that fails
and is retried when another agent wrote first. With events, the check needs the whole
scope folded at a known position and a single decider (the coordinator) — a round trip
through one process before every model call of the cluster, and no call at all while it
restarts. The ledger is also not task history: the cost of each call is already on the
task's events (``Usage``); the ledger is the cluster's running account of it, kept apart
so its write rate (two writes per call per capped scope) stays out of the event log.

Amounts are integer micro-dollars (:data:`MICRO` per dollar): sums never drift.
Everything here is a pure function of the entries, the caps and ``now`` (epoch seconds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import msgspec

MICRO = 1_000_000  # micro-dollars per dollar
ScopeKind = Literal["task", "repo", "author", "day"]
KINDS: tuple[ScopeKind, ...] = ("task", "repo", "author", "day")
MAX_CAP = 1_000_000.0  # dollars: a cap above this is a typo
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_/-]")
_NAME_MAX = 200


def to_micro(dollars: float) -> int:
    return int(math.ceil(round(dollars * MICRO, 6)))


def dollars(micro: int) -> str:
    """``$1.23`` (``$0.0042`` below a cent, so a small spend never reads as zero)."""
    d = micro / MICRO
    return f"${d:,.2f}" if d == 0 or abs(d) >= 0.01 else f"${d:.4f}"


def period_of(now: float | datetime) -> str:
    """The ledger's day (UTC) at ``now``: ``2026-12-02``."""
    at = now if isinstance(now, datetime) else datetime.fromtimestamp(now, UTC)
    return at.astimezone(UTC).date().isoformat()


def next_reset(now: float | datetime) -> datetime:
    """When the daily scopes start afresh: the next 00:00 UTC."""
    at = now if isinstance(now, datetime) else datetime.fromtimestamp(now, UTC)
    day = at.astimezone(UTC).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _key_part(name: str) -> str:
    """A name as KV key text: letters, digits, ``_``, ``-``, ``/`` kept, everything else
    (``.``, spaces, unicode) as ``=XX`` per UTF-8 byte, so the key is valid and unique."""
    return _KEY_SAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), name) or "="


class Scope(msgspec.Struct, frozen=True):
    """One account: ``kind`` and its name (a task id, ``owner/name``, a login; ``""`` for
    the day)."""

    kind: ScopeKind
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown budget scope {self.kind!r}; one of {', '.join(KINDS)}")
        if (self.kind == "day") != (not self.name) or len(self.name) > _NAME_MAX or "\n" in self.name:
            raise ValueError(f"bad budget scope name for {self.kind}: {self.name!r}")

    @property
    def label(self) -> str:
        """``day``, ``task:<id>``, ``repo:<owner/name>``, ``author:<login>`` — what a wait
        reason says after ``budget:``."""
        return self.kind if self.kind == "day" else f"{self.kind}:{self.name}"

    @property
    def daily(self) -> bool:
        return self.kind != "task"

    def key(self, period: str) -> str:
        """Its KV key: ``task.<id>``; ``<day>.day``, ``<day>.repo.<name>``, ``<day>.author.<name>``."""
        if self.kind == "task":
            return f"task.{_key_part(self.name)}"
        if self.kind == "day":
            return f"{period}.day"
        return f"{period}.{self.kind}.{_key_part(self.name)}"


def scopes_for(task_id: str, repo: str, author: str = "") -> tuple[Scope, ...]:
    """The scopes a call of this task is charged to, in the order they are reserved."""
    out = [Scope("task", task_id), Scope("repo", repo)]
    if author:
        out.append(Scope("author", author))
    out.append(Scope("day"))
    return tuple(out)


class Caps(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The cluster's caps, in dollars (``None``: no cap). ``repos``/``authors`` override
    ``repo``/``author`` for the names they hold. Kept in the cluster's config bucket
    (``ccc up`` flags, ``ccc budget set``); every agent watches it."""

    task: float | None = None
    repo: float | None = None
    author: float | None = None
    day: float | None = None
    repos: dict[str, float] = msgspec.field(default_factory=dict)
    authors: dict[str, float] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, value in (("task", self.task), ("repo", self.repo), ("author", self.author), ("day", self.day),
                            *((f"repo {k}", v) for k, v in self.repos.items()),
                            *((f"author {k}", v) for k, v in self.authors.items())):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= MAX_CAP:
                raise ValueError(f"budget cap for {what} must be a number of dollars from 0 to {MAX_CAP:g}, "
                                 f"got {value!r}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.task, self.repo, self.author, self.day)) \
            or bool(self.repos) or bool(self.authors)

    def dollars_for(self, scope: Scope) -> float | None:
        match scope.kind:
            case "task":
                return self.task
            case "repo":
                return self.repos.get(scope.name, self.repo)
            case "author":
                return self.authors.get(scope.name, self.author)
            case _:
                return self.day

    def cap(self, scope: Scope) -> int | None:
        d = self.dollars_for(scope)
        return None if d is None else to_micro(d)


def parse_caps(
    *, task: str | None = None, day: str | None = None, repo: Iterable[str] = (), author: Iterable[str] = (),
    base: Caps | None = None,
) -> Caps:
    """Caps from CLI text: ``task``/``day`` a number of dollars (``off``: no cap);
    ``repo``/``author`` repeatable ``N`` (the default) or ``NAME=N`` (``NAME=off`` drops
    that override). Applied on top of ``base``. Bad input: ValueError naming it."""
    b = base or Caps()

    def amount(text: str, what: str) -> float | None:
        t = text.strip().lstrip("$")
        if t.lower() in ("off", "none", ""):
            return None
        try:
            return float(t)
        except ValueError:
            raise ValueError(f"{what} {text!r}: expected dollars (e.g. 25 or 2.50) or 'off'") from None

    fields: dict = {"task": b.task, "day": b.day, "repo": b.repo, "author": b.author,
                    "repos": dict(b.repos), "authors": dict(b.authors)}
    if task is not None:
        fields["task"] = amount(task, "--budget-task")
    if day is not None:
        fields["day"] = amount(day, "--budget-day")
    for kind, values in (("repo", repo), ("author", author)):
        for raw in values:
            name, sep, number = raw.rpartition("=")
            value = amount(number, f"--budget-{kind}")
            if not sep:
                fields[kind] = value
            elif not name.strip():
                raise ValueError(f"--budget-{kind} {raw!r}: expected N or NAME=N")
            elif value is None:
                fields[f"{kind}s"].pop(name.strip(), None)
            else:
                fields[f"{kind}s"][name.strip()] = value
    return Caps(**fields)


class Hold(msgspec.Struct, frozen=True, gc=False):
    amount: int  # micro-dollars
    until: float  # epoch seconds: after this the hold is a dead agent's and is dropped


class Entry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One scope's account (its KV value)."""

    scope: str  # the label, for people reading the bucket (``nats kv get``)
    period: str = ""  # the UTC day of a daily scope
    spent: int = 0  # micro-dollars, settled
    calls: int = 0  # calls settled
    holds: dict[str, Hold] = msgspec.field(default_factory=dict)  # reservations of calls in flight
    refused: int = 0  # the last call refused as exhausted needed this much (0: none since)

    def live(self, now: float) -> dict[str, Hold]:
        return {k: h for k, h in self.holds.items() if h.until > now}

    def reserved(self, now: float) -> int:
        return sum(h.amount for h in self.live(now).values())


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """Why a reservation was refused: ``busy`` (other calls hold the headroom: wait and
    try again) or exhausted (no call of this size fits until a reset or a raise)."""

    scope: str  # label
    cap: int
    spent: int
    reserved: int
    amount: int
    busy: bool = False
    period: str = ""

    @property
    def reason(self) -> str:
        when = " today" if self.period else ""
        if self.busy:
            return (f"budget:{self.scope} busy: {dollars(self.spent)} spent{when} and {dollars(self.reserved)} held "
                    f"by calls in flight, of {dollars(self.cap)}; the next call may cost up to {dollars(self.amount)}")
        return (f"budget:{self.scope} exhausted: {dollars(self.spent)} spent{when} of {dollars(self.cap)}; "
                f"the next call may cost up to {dollars(self.amount)}")


def reserve(entry: Entry, cap: int | None, amount: int, hold_id: str, now: float, ttl: float) -> Entry | Refusal:
    """The entry with a hold of ``amount`` for ``ttl`` seconds, or why not. Expired holds
    are dropped on the way."""
    if amount < 0 or ttl <= 0:
        raise ValueError("a reservation needs an amount >= 0 and a ttl > 0")
    live = entry.live(now)
    if cap is not None:
        reserved = sum(h.amount for h in live.values())
        if entry.spent + amount > cap:
            return Refusal(scope=entry.scope, cap=cap, spent=entry.spent, reserved=reserved, amount=amount,
                           period=entry.period)
        if entry.spent + reserved + amount > cap:
            return Refusal(scope=entry.scope, cap=cap, spent=entry.spent, reserved=reserved, amount=amount,
                           busy=True, period=entry.period)
    return msgspec.structs.replace(entry, holds={**live, hold_id: Hold(amount, now + ttl)}, refused=0)


def refused(entry: Entry, refusal: Refusal, now: float) -> Entry:
    """The entry remembering an exhausted refusal (what the scheduler reads)."""
    return msgspec.structs.replace(entry, holds=entry.live(now), refused=max(refusal.amount, 1))


def settle(entry: Entry, hold_id: str, cost: int, now: float) -> Entry:
    """The call's real cost replaces its hold (which may have been dropped as expired:
    the cost counts all the same)."""
    live = entry.live(now)
    live.pop(hold_id, None)
    return msgspec.structs.replace(entry, holds=live, spent=entry.spent + max(cost, 0), calls=entry.calls + 1)


def release(entry: Entry, hold_id: str, now: float) -> Entry:
    """The hold given back unused (another scope refused the call)."""
    live = entry.live(now)
    live.pop(hold_id, None)
    return msgspec.structs.replace(entry, holds=live)


def exhausted(entry: Entry | None, cap: int | None) -> bool:
    """No call can start in this scope: its cap is spent, or less is left than the last
    call it refused needed. Raising the cap (or a new day) lifts it."""
    if cap is None:
        return False
    spent = entry.spent if entry is not None else 0
    if spent >= cap:
        return True
    return entry is not None and entry.refused > 0 and cap - spent < entry.refused


# -- a snapshot of the whole ledger: the scheduler's, the board's and `ccc budget`'s view ----
class Row(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    kind: ScopeKind
    period: str
    cap: int | None
    spent: int
    reserved: int
    calls: int
    exhausted: bool

    @property
    def headroom(self) -> int | None:
        return None if self.cap is None else self.cap - self.spent - self.reserved


class Book:
    """Every entry of the ledger (by KV key) and the caps, at one moment."""

    def __init__(self, entries: Mapping[str, Entry] | None = None, caps: Caps | None = None,
                 version: int = 0) -> None:
        self.entries: dict[str, Entry] = dict(entries or {})
        self.caps = caps or Caps()
        self.version = version  # bumped by a follower whenever a scope may have changed its state

    def entry(self, scope: Scope, now: float) -> Entry | None:
        return self.entries.get(scope.key(period_of(now)))

    def blocked(self, scopes: Sequence[Scope], now: float) -> tuple[Scope, Entry | None, int] | None:
        """The first of ``scopes`` that is exhausted, with its entry and cap."""
        if not self.caps.any:
            return None
        for scope in scopes:
            cap = self.caps.cap(scope)
            if cap is None:
                continue
            entry = self.entry(scope, now)
            if exhausted(entry, cap):
                return scope, entry, cap
        return None

    def wait_reason(self, scopes: Sequence[Scope], now: float) -> str:
        """``budget:<scope> …`` for a queued task held back by an exhausted scope, else ``""``."""
        hit = self.blocked(scopes, now)
        if hit is None:
            return ""
        scope, entry, cap = hit
        spent = entry.spent if entry is not None else 0
        if scope.daily:
            reset = next_reset(now).strftime("%Y-%m-%d %H:%M UTC")
            return (f"budget:{scope.label} — {dollars(spent)} of {dollars(cap)} spent today; "
                    f"resumes at {reset} or when the cap is raised")
        return f"budget:{scope.label} — {dollars(spent)} of {dollars(cap)} spent; resumes when the cap is raised"

    def holds_back(self, task_id: str, repo: str, author: str, now: datetime) -> str:
        """The wait reason of a queued task of ``repo`` by ``author`` (``""``: none)."""
        return self.wait_reason(scopes_for(task_id, repo, author), now.timestamp())

    def rows(self, now: float, *, period: str | None = None) -> list[Row]:
        """One row per scope of ``period`` (today by default) and per task scope, plus a
        row for each capped daily scope nothing was spent in yet."""
        day = period or period_of(now)
        rows: list[Row] = []
        seen: set[str] = set()
        for key, e in sorted(self.entries.items()):
            scope = entry_scope(key, e)
            if scope is None or (scope.daily and e.period != day):
                continue
            kind = scope.kind
            cap = self.caps.cap(scope)
            seen.add(e.scope)
            rows.append(Row(scope=e.scope, kind=kind, period=e.period, cap=cap, spent=e.spent,
                            reserved=e.reserved(now), calls=e.calls, exhausted=exhausted(e, cap)))
        wanted = [Scope("day")] if self.caps.day is not None else []
        wanted += [Scope("repo", r) for r in self.caps.repos] + [Scope("author", a) for a in self.caps.authors]
        for scope in wanted:
            if scope.label not in seen:
                cap = self.caps.cap(scope)
                rows.append(Row(scope=scope.label, kind=scope.kind, period=day, cap=cap, spent=0, reserved=0,
                                calls=0, exhausted=exhausted(None, cap)))
        order = {k: i for i, k in enumerate(("day", "repo", "author", "task"))}
        return sorted(rows, key=lambda r: (order[r.kind], r.scope))


def entry_scope(key: str, entry: Entry) -> Scope | None:
    """The scope of a ledger entry (from its key's kind and its label); None for a key
    that is not the ledger's."""
    parts = key.split(".")
    kind = "task" if parts[0] == "task" else (parts[1] if len(parts) >= 2 else "")
    try:
        if kind == "day":
            return Scope("day")
        if kind in ("task", "repo", "author") and entry.scope.startswith(f"{kind}:"):
            return Scope(kind, entry.scope.split(":", 1)[1])  # type: ignore[arg-type]
    except ValueError:
        pass
    return None


# -- what a coder needs of the ledger --------------------------------------------------------
class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """Holds taken for one call (``keys``: the KV keys of the capped scopes held, with
    their entries' labels), and every scope the call's cost is settled on."""

    hold_id: str
    amount: int
    period: str
    scopes: tuple[Scope, ...]
    held: tuple[str, ...] = ()  # KV keys holding ``amount``


class SpendLedger(Protocol):
    """The cluster's ledger as a coder uses it: reserve before each model call, settle
    after it (also with 0 when the call failed)."""

    async def reserve(self, scopes: Sequence[Scope], amount: int, *, ttl: float) -> Reservation | Refusal: ...

    async def settle(self, reservation: Reservation, cost: int) -> None: ...
