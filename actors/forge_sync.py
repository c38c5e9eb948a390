"""Forge sync: reflect each GitHub-sourced task's state back on its issue, as one
``ccc:*`` state label and one tracking comment per task, edited in place.

It follows the task events (a durable consumer on ``<ns>.task.>``); for each event it
takes the task's *current* state (folded from the store, or from a live read model)
and renders it. Rendering is a pure function of the state, so a redelivery, a replay
from sequence 0 or a second sync process all converge on the same label and the same
comment body. The renderings last sent are cached by task, so an event that changes
nothing visible costs no API call.

Ordering: events of one task are handled one at a time in a process (a lock per task),
and after writing, the sync checks whether the task moved on meanwhile (another
process may have rendered a newer state and then been overtaken by this older
write); if so it renders again, so the issue always ends at the latest state. For
the same reason the cache of renderings is trusted only when this process rendered
the task's previous version; otherwise everything is written again (the forge reads
labels before changing them, and edits a comment it already knows in one request).

Plugins (:mod:`actors.plugins`): each hook plugin's ``tracking_comment`` text is added to
the comment, under the plugin's name (a plugin that cannot answer is left out: the
comment goes without it). Its text is the plugin's, so the rendering stays a function of
the state only as far as the plugins' answers are.

Failures: a retryable forge error (network, 5xx, rate limit) naks the event and it is
redelivered with backoff; a permanent one (no such issue, no permission) is logged
and the event acked: the issue cannot be updated, and retrying would not change that.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events.errors import CccError, StoreUnavailable
from events.store import EventStore
from events.subjects import Namespace
from events.task_state import AWAITING_CHECKS, PR_OPEN, WITH_AGENT, TaskState
from projections.live import LiveReadModel

from actors.plugins import NO_PLUGINS, PluginHooks
from actors.ports import NO_TELEMETRY, IssueForge, SecretMasker, Telemetry
from actors.runtime import ConsumerLoop

log = structlog.get_logger("ccc.forge_sync")

LABEL_OF_STATUS: dict[str, str] = {
    "pending": "ccc:queued", "analyzing": "ccc:queued", "queued": "ccc:queued",
    "assigned": "ccc:in-progress", "in_progress": "ccc:in-progress", "testing": "ccc:in-progress",
    "checking": "ccc:checking", "checks_failed": "ccc:checks-failed", "review": "ccc:review",
    "needs_human": "ccc:needs-human", "conflicted": "ccc:conflicted",
    "merge_queued": "ccc:merge-queue", "merging": "ccc:merge-queue",
    "completed": "ccc:done", "failed": "ccc:failed", "cancelled": "ccc:cancelled",
}
_PHASE: dict[str, str] = {
    "pending": "received, waiting for analysis",
    "analyzing": "analysing the issue",
    "queued": "queued, waiting for an agent",
    "assigned": "assigned to an agent",
    "in_progress": "in progress: implementing",
    "testing": "in progress: running the tests",
    "checking": "pull request open, checks running",
    "checks_failed": "pull request open, checks failed",
    "review": "checks passed, waiting for review",
    "needs_human": "needs a human",
    "conflicted": "the pull request conflicts with its base branch",
    "merge_queued": "approved, in the merge queue",
    "merging": "in the merge queue: testing the merge with the latest base",
    "completed": "done",
    "failed": "failed",
    "cancelled": "cancelled",
}
_CLASSIFIED: dict[str, str] = {  # events.checks.CLASSIFICATIONS, in words
    "change": "caused by the change",
    "flaky": "flaky (passed on the base commit, or on a re-run)",
    "infrastructure": "the CI infrastructure (runner lost, never started)",
    "base": "the base branch is red too",
    "action_required": "a workflow waits for a maintainer's approval",
}
# task.requeued's reasons: the Attempt row says it already
_QUIET_REASONS = frozenset({"retry", "agent_lost", "handed_back"})
MAX_REASON = 600
MAX_CHECK_ROWS = 20
MAX_FILES = 10
MAX_NOTE = 2000  # characters of one plugin's text on the comment
_SAFE_URL = re.compile(r"https?://[^\s()<>\[\]`'\"\\|]+")


# -- pure rendering ----------------------------------------------------------------
def state_label(state: TaskState) -> str:
    return LABEL_OF_STATUS[state.status]


def tracking_marker(task_id: str) -> str:
    return f"<!-- ccc:task:{task_id} -->"


def _text(value: str, mask: SecretMasker, limit: int = MAX_REASON) -> str:
    """Free text from events, safe inside one line of Markdown on a public issue:
    secrets masked, whitespace collapsed, no HTML (so no forged marker), bounded."""
    text = re.sub(r"\s+", " ", mask(value)).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(value: str, mask: SecretMasker, limit: int = 128) -> str:
    """A name or commit as inline code (a backtick in it cannot end the span)."""
    return f"`{_text(value.replace('`', ''), mask, limit)}`"


def _url(value: str, mask: SecretMasker) -> str:
    """``value`` if it is a plain http(s) URL, masked, that cannot break out of a
    Markdown link; else "" (the caller shows no link)."""
    url = mask(value)
    return url if len(url) <= 2000 and _SAFE_URL.fullmatch(url) else ""


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _fixes(s: TaskState) -> str:
    return f"{s.ci_fixes} of {s.max_ci_fixes}" if s.max_ci_fixes >= s.ci_fixes else str(s.ci_fixes)


def _round(s: TaskState) -> str:
    """What the current (or queued) round on the pull request's branch is, if not the
    first implementation: shown after the status."""
    if s.status not in WITH_AGENT and s.status != "queued":
        return ""
    if s.work == "ci_fix":
        return f" (CI fix {_fixes(s)})"
    if s.work == "rebase":
        return f" (rebase {s.rebases} on {s.base_branch or 'the base'})"
    return ""


def _rows(s: TaskState, mask: SecretMasker) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if s.agent_id:
        rows.append(("Agent", _code(s.agent_id, mask)))
    rows.append(("Attempt", f"{s.attempt} of {s.max_attempts}"))
    if s.tests_passed or s.tests_failed or s.status in PR_OPEN or s.status == "completed":
        rows.append(("Tests", f"{s.tests_passed} passed, {s.tests_failed} failed"))
    if s.dollars or s.input_tokens or s.output_tokens:
        rows.append(("Cost", f"${s.dollars:.4f} ({s.input_tokens:,} input / {s.output_tokens:,} "
                             "output tokens)"))
    if s.pr_url or s.pr_number:
        url = _url(s.pr_url, mask)
        name = f"#{s.pr_number}" if s.pr_number else "pull request"
        rows.append(("Pull request", (f"[{name}]({url})" if url else name) + (" (draft)" if s.draft else "")))
    if s.head_sha:
        rows.append(("Head commit", _code(s.head_sha[:12], mask)))
    if s.ci_fixes:
        rows.append(("CI fixes", _fixes(s)))
    if s.rebases:
        rows.append(("Rebases", str(s.rebases)))
    if s.reruns:
        rows.append(("Check re-runs", str(s.reruns)))
    if s.classification:
        word = _CLASSIFIED.get(s.classification, "")
        rows.append(("Last CI failure", _code(s.classification, mask, 32) + (f": {word}" if word else "")))
    if s.conflict_files:
        files = ", ".join(_code(f, mask) for f in s.conflict_files[:MAX_FILES])
        more = f" and {len(s.conflict_files) - MAX_FILES} more" if len(s.conflict_files) > MAX_FILES else ""
        rows.append(("Conflicts", f"{files}{more} with {_code(s.base_branch or 'the base', mask)}"))
    if s.approved:
        rows.append(("Approved", f"by {_code(s.approved_by, mask)}" if s.approved_by else "yes"))
    if s.status == "merge_queued":
        rows.append(("Merge queue", "queued, waiting for its turn"))
    elif s.status == "merging":
        latest = _code(s.base_branch or "base", mask)
        testing = _code(s.queue_sha[:12], mask)
        rows.append(("Merge queue", f"testing {testing} (the pull request on the latest {latest})"))
    elif s.merge_sha:
        rows.append(("Merge queue", f"merged as {_code(s.merge_sha[:12], mask)}"))
    return rows


def _checks(s: TaskState, mask: SecretMasker) -> list[str]:
    lines: list[str] = []
    awaiting = s.status in AWAITING_CHECKS and s.checks_since is not None
    if awaiting:
        sha = s.queue_sha if s.status == "merging" else s.head_sha
        rerun = f" (re-run {s.reruns})" if s.reruns else ""
        commit = _code(sha[:12] or "(no commit)", mask)
        lines += [f"**Checks** running on {commit} since {_when(s.checks_since)}{rerun}", ""]
    if not s.checks:
        return lines
    lines += ["**Previous checks:**" if awaiting else "**Checks:**", "",
              "| Check | Result | Details |", "|---|---|---|"]
    ordered = sorted(s.checks, key=lambda c: c.passed)  # failing first, else in the forge's order
    for c in ordered[:MAX_CHECK_ROWS]:
        url = _url(c.url, mask)
        result = _text(c.conclusion, mask, 32) + ("" if c.started else " (never started)")
        lines.append(f"| {_text(c.name, mask, 100)} | {result} | {f'[details]({url})' if url else '-'} |")
    if len(ordered) > MAX_CHECK_ROWS:
        lines.append(f"| … and {len(ordered) - MAX_CHECK_ROWS} more | | |")
    return [*lines, ""]


def _note(value: str, mask: SecretMasker) -> str:
    """A plugin's Markdown, safe on a public issue: secrets masked, no HTML (so no forged
    marker), bounded; its lines kept."""
    text = mask(value).strip()[:MAX_NOTE]
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_comment(state: TaskState, mask: SecretMasker, notes: Sequence[tuple[str, str]] = ()) -> str:
    """The tracking comment for ``state``: deterministic (no clock), so equal states
    give byte-equal bodies. ``mask`` removes secrets from the free text of events.
    ``notes``: ``(plugin, text)`` the hook plugins add (:mod:`actors.plugins`)."""
    s = state
    status = _PHASE[s.status] + _round(s)
    if s.cancel_requested and s.status in WITH_AGENT:
        status += " (cancellation requested)"
    lines = [
        tracking_marker(s.task_id),
        f"**claude-code-cluster** · task `{s.task_id}`",
        "",
        f"**Status:** {status}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _rows(s, mask)),
        "",
        *_checks(s, mask),
    ]
    if s.status == "needs_human":
        lines += [f"**Needs a human:** {_text(s.needed or 'see the reason below', mask)}", ""]
    phase = f" in `{_text(s.failure_phase, mask, 64)}`" if s.failure_phase else ""
    if s.status == "failed":
        lines += [f"**Failed**{phase}: {_text(s.failure_reason or s.status_reason, mask)}", ""]
    elif s.failure_reason and s.status != "completed":
        lines += [f"Previous attempt failed{phase}: {_text(s.failure_reason, mask)}", ""]
    if s.status != "failed" and s.status_reason and s.status_reason not in _QUIET_REASONS:
        lines += [f"Reason: {_text(s.status_reason, mask)}", ""]
    for plugin, text in notes:
        lines += [f"**{_code(plugin, mask, 64)}:** {_note(text, mask)}", ""]
    lines.append("<sub>Kept up to date from the task's event log by claude-code-cluster; "
                 "edits to this comment are overwritten.</sub>")
    return "\n".join(lines)


class Rendered(NamedTuple):
    version: int
    label: str
    body: str


# -- the actor -----------------------------------------------------------------------
class ForgeSync:
    def __init__(
        self,
        nc: Client,
        ns: Namespace,
        forge: IssueForge,
        *,
        mask: SecretMasker,
        name: str = "forge-sync",
        source: str = "github",
        live: LiveReadModel | None = None,
        concurrency: int = 8,
        cache_size: int = 10_000,
        telemetry: Telemetry = NO_TELEMETRY,
        plugins: PluginHooks = NO_PLUGINS,
    ) -> None:
        self.nc = nc
        self.ns = ns
        self.forge = forge
        self.plugins = plugins  # tracking-comment text of the hook plugins
        self.mask = mask
        self.telemetry = telemetry
        self.name = name
        self.source = source
        self.live = live
        self.store = live.store if live is not None else EventStore(nc, ns)
        self.concurrency = concurrency
        self.cache_size = cache_size
        self._rendered: OrderedDict[str, Rendered] = OrderedDict()
        self._other_source: set[str] = set()  # tasks of other forges: never loaded again
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._loop: ConsumerLoop | None = None
        self.api_writes = 0  # label/comment calls made (not skipped)
        self.skipped_errors = 0  # permanent forge errors logged and acked

    async def start(self) -> None:
        self._loop = ConsumerLoop(
            self.nc, stream=self.ns.events_stream, durable=self.name,
            filter_subjects=[f"{self.ns.prefix}.task.>"], handler=self._on_task_event,
            concurrency=self.concurrency, ack_wait=60.0, telemetry=self.telemetry,
        )
        await self._loop.start()
        log.info("forge_sync.started", name=self.name, source=self.source)

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()

    @property
    def handled(self) -> int:
        return self._loop.handled if self._loop is not None else 0

    async def _on_task_event(self, msg: Msg) -> None:
        task_id = self.ns.rel(msg.subject).split(".")[1]
        if task_id in self._other_source:
            return
        try:
            await self.sync_task(task_id, min_seq=msg.metadata.sequence.stream)
        except CccError as e:
            if e.retryable:
                raise  # nak: the loop redelivers with backoff
            self.skipped_errors += 1
            log.warning("forge_sync.skipped", task_id=task_id, error=str(e))

    async def sync_task(self, task_id: str, *, min_seq: int = 0) -> bool:
        """Reflect the task's current state on its issue; returns whether the forge
        was written to."""
        lock = self._locks.get(task_id)
        if lock is None:
            lock = self._locks[task_id] = asyncio.Lock()
        wrote = False
        async with lock:
            for _ in range(5):  # bounded: a task has only so many events
                state, seq = await self._current(task_id, min_seq)
                if state is None:
                    return wrote
                if state.issue.source != self.source:
                    self._other_source.add(task_id)
                    return wrote
                wrote |= await self._reflect(state)
                latest = await self.store.last_seq(self.ns.task_filter(task_id))
                if latest <= seq:
                    return wrote
                min_seq = latest  # the task moved on while we wrote: render the newer state
        return wrote

    async def _current(self, task_id: str, min_seq: int) -> tuple[TaskState | None, int]:
        if self.live is not None:
            try:
                await self.live.wait_for_seq(min_seq)
            except TimeoutError:
                raise StoreUnavailable(f"read model has not reached sequence {min_seq}") from None
            model = self.live.model
            return model.tasks.get(task_id), model.task_seq.get(task_id, 0)
        return await self.store.load_task(task_id)

    async def _reflect(self, state: TaskState) -> bool:
        prev = self._rendered.get(state.task_id)
        if prev is not None and prev.version >= state.version:
            return False  # this state (or a newer one) is already on the issue
        # The cache may only say "unchanged" if we rendered the version just before:
        # then every other writer has finished with that version or an older one
        # followed by it (see the module docstring). Otherwise another process may
        # have rendered the versions in between, and everything is written again.
        if prev is not None and prev.version != state.version - 1:
            prev = None
        notes = await self.plugins.tracking_comment(state) if self.plugins.comments else ()
        label, body = state_label(state), render_comment(state, self.mask, notes)
        repo, number = state.issue.repo, state.issue.number
        wrote = False
        if prev is None or prev.label != label:
            await self.forge.set_state_label(repo, number, label)
            wrote = True
        if prev is None or prev.body != body:
            await self.forge.upsert_tracking_comment(repo, number, tracking_marker(state.task_id), body)
            wrote = True
        self.api_writes += wrote
        self._rendered[state.task_id] = Rendered(state.version, label, body)
        self._rendered.move_to_end(state.task_id)
        while len(self._rendered) > self.cache_size:
            self._rendered.popitem(last=False)
        if wrote:
            log.info("forge_sync.reflected", task_id=state.task_id, repo=repo, issue=number,
                     status=state.status, label=label)
        return wrote
