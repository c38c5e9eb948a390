"""GitHub webhook receiver: verify, translate into issue facts, publish to ``<NS>_ISSUES``.

    POST /webhook (or /)  a GitHub delivery; GET /health

Order of checks, each answered before the next is attempted:

0. A per-client-address rate limit (token bucket, :mod:`infra.adapters.http.ratelimit`):
   429 with ``Retry-After``, before the body is read or any HMAC is computed.
1. ``X-Hub-Signature-256`` must be ``sha256=<hex HMAC-SHA256(secret, raw body)>``,
   compared in constant time over the exact bytes received: else 401, nothing parsed.
2. ``X-GitHub-Event`` and ``X-GitHub-Delivery`` present and sane: else 400.
3. The body is JSON (or GitHub's form encoding, ``payload=<json>``): else 400.
4. :func:`~infra.adapters.http.webhook_translate.interpret` turns it into zero or more issue facts
   (pure; trust policy and freshness there: a delivery older than ``max_age`` by its own
   timestamp is stale). Nothing to do -> 202 with the reason; ``ping`` -> 200
   ``{"status": "pong"}`` (a ping starts nothing, so its age does not matter).
5. With ``permissions`` (a lookup of an author's permission on the repository: GitHub's
   collaborator-permission API, cached, see
   :meth:`infra.adapters.forge.github.GitHubForge.author_permission`), every fact a person
   wrote must come from someone with write access: the answer is written on the fact
   (``author_permission``, which the intake checks again), and a delivery from anyone
   else is answered 202 with the reason. The lookup failing -> 503 (nobody is trusted on
   a guess). Without it the association alone decides; the receiver says so when it starts.
5b. A CI delivery (a check run, check suite or workflow run of a task branch's commit
   finished) translates into a commit to read, not a fact: with ``checks`` (the GitHub
   checks collector, :class:`infra.adapters.forge.github_checks.GitHubChecks`) the API
   is asked whether every check of the commit has finished; the last delivery to find them
   all done publishes ``issue.checks_completed``, the others are answered 202 with what is
   still running. The API failing -> 503 (a later delivery of the commit, or the operator's
   redelivery, reads again); refusing (credentials, a vanished commit) -> 202 with why.
   Without ``checks`` such deliveries are answered 202: nothing can read them.
6. Each fact is published with ``Nats-Msg-Id`` = its ``event_id`` (derived from what
   happened, not from the delivery), so a redelivered webhook, or a captured one replayed
   with a new delivery id, is a no-op: 200, ``duplicate: true``. NATS unreachable -> 503;
   GitHub does not retry by itself, the operator redelivers.

Secrets: the shared secret comes from ``CCC_WEBHOOK_SECRET`` and is never logged; nor
are signatures or payloads (only event, delivery, action and the outcome).
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import parse_qs

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException

from events.errors import CccError, ConfigError, StoreUnavailable
from events.issue import IssueEvent
from events.trust import AUTHORED, TrustPolicy

from infra.adapters.http.ratelimit import RateLimit, RateLimitMiddleware, TokenBuckets
from infra.adapters.http.service import HttpService, Served
from infra.adapters.http.webhook_translate import (
    DEFAULT_MAX_AGE,
    DEFAULT_TRUST,
    BadPayload,
    CommitChecks,
    interpret,
    is_signed,
)
from infra.adapters.nats.issue_publisher import publish_issue

__all__ = [
    "ChecksCollector",
    "MAX_MAX_AGE",
    "Outcome",
    "PermissionLookup",
    "Published",
    "Publisher",
    "WEBHOOK_RATE_LIMIT",
    "ASSOCIATION_ONLY",
    "WebhookServer",
    "create_webhook_app",
    "nats_publisher",
    "webhook_secret",
]

log = structlog.get_logger("ccc.webhook")

SECRET_ENV = "CCC_WEBHOOK_SECRET"
ASSOCIATION_ONLY = ("no GitHub credentials: authors are trusted by author_association alone "
                    "(MEMBER and COLLABORATOR include people without write access); set GITHUB_TOKEN "
                    "or GITHUB_APP_* so the receiver checks each author's permission on the repository")
# GitHub sends a delivery per event, in bursts when many issues change at once; far
# below what would be an attack, far above what a repository's activity produces
WEBHOOK_RATE_LIMIT = RateLimit(rate=20.0, burst=100)
MAX_BODY_BYTES = 5 * 1024 * 1024  # real deliveries are tens of KB; GitHub caps at 25 MB
_DELIVERY = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")  # a GUID; it goes into a NATS header
_EVENT = re.compile(r"^[a-z_]{1,64}$")
NO_CHECKS_READER = ("a commit's checks are read through the GitHub API, and this receiver runs without "
                    "GitHub credentials (set GITHUB_TOKEN or GITHUB_APP_*)")
MAX_MAX_AGE = timedelta(hours=12)
"""The widest freshness window allowed: it must stay inside the issue stream's 24 h
dedup window, or a replay could be too old for dedup and still young enough to count."""


# -- the HTTP app -------------------------------------------------------------------------
Publisher = Callable[[IssueEvent], Awaitable[tuple[int, bool]]]
"""Publishes one fact with ``Nats-Msg-Id`` = ``event.event_id``; returns ``(seq, duplicate)``."""
PermissionLookup = Callable[[str, str], Awaitable[str]]
"""``(repo, login) -> permission`` (``admin``, ``maintain``, ``write``, ``triage``, ``read``
or ``none``); raises a :class:`~events.errors.CccError` when it cannot tell."""


class ChecksCollector(Protocol):
    """Reads a commit's checks through the forge's API (step 5b of the module docstring):
    the fact once they have all finished, else None and why not yet."""

    async def collect(self, commit: CommitChecks) -> tuple[IssueEvent | None, str]: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


class Published(msgspec.Struct, frozen=True):
    event_id: str
    type: str
    seq: int
    duplicate: bool


class Outcome(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: str  # "published" | "ignored" | "pong"
    event: str
    delivery: str
    action: str | None = None
    reason: str | None = None
    published: list[Published] = []
    zen: str | None = None


class WebhookError(msgspec.Struct, frozen=True):
    error: str
    detail: str


def _error(status: int, error: str, detail: str, **context: Any) -> Response:
    log.warning("webhook.rejected", status=status, error=error, detail=detail, **context)
    return Response(WebhookError(error, detail), status_code=status)


def nats_publisher(nc: Any, ns: Any, *, timeout: float = 5.0) -> Publisher:
    async def publish(event: IssueEvent) -> tuple[int, bool]:
        return await publish_issue(nc, ns, event, timeout=timeout)  # type: ignore[arg-type]

    return publish


def _payload(body: bytes, content_type: str) -> Any:
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        form = parse_qs(body.decode("utf-8", "strict"), strict_parsing=False)
        if "payload" not in form:
            raise BadPayload("form body without a payload field")
        body = form["payload"][0].encode()
    return msgspec.json.decode(body)


def create_webhook_app(
    publisher: Publisher, *, secret: str, trigger_label: str = "ccc", bot_name: str = "ccc",
    source: str = "github", trust: TrustPolicy = DEFAULT_TRUST,
    is_connected: Callable[[], bool] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
    rate_limit: RateLimit = WEBHOOK_RATE_LIMIT, max_age: timedelta = DEFAULT_MAX_AGE,
    permissions: PermissionLookup | None = None, clock: Callable[[], datetime] = utcnow,
    checks: ChecksCollector | None = None,
) -> Litestar:
    """The receiver. ``secret`` is the webhook's shared secret (never empty); ``trust``
    says whose facts, on which repositories, are published (the rest: 202 with why);
    ``max_age`` how old a delivery may be (by ``clock``); ``permissions`` looks up an
    author's permission on the repository (None: the association alone decides);
    ``checks`` reads a commit's checks when a CI delivery says one may be done (None:
    CI deliveries are answered 202)."""
    if not secret:
        raise ConfigError(f"{SECRET_ENV}: a webhook secret is required (unsigned deliveries are refused)")
    if not timedelta(0) < max_age <= MAX_MAX_AGE:
        raise ConfigError(f"webhook max age {max_age}: must be more than 0 and at most {MAX_MAX_AGE} "
                          "(inside the issue stream's 24 h dedup window)")
    key = secret.encode()

    async def with_permissions(facts: list[IssueEvent]) -> tuple[list[IssueEvent], str]:
        """The facts with their authors' permissions on them, or why the delivery is refused.
        One refused author refuses the delivery: its facts are one person's doing."""
        out: list[IssueEvent] = []
        for fact in facts:
            if permissions is not None and isinstance(fact, AUTHORED):
                perm = await permissions(fact.repo, fact.author)
                fact = msgspec.structs.replace(fact, author_permission=perm)
                why = trust.author_refusal(fact.author, fact.author_association, perm, source=fact.source)
                if why:
                    return [], why
            out.append(fact)
        return out, ""

    @post(["/", "/webhook"], status_code=200, summary="Receive a GitHub webhook delivery")
    async def webhook(request: Request) -> Response:
        headers = request.headers
        body = await request.body()
        if not is_signed(key, body, headers.get("x-hub-signature-256")):
            return _error(401, "unauthorized", "missing or invalid X-Hub-Signature-256")
        event, delivery = headers.get("x-github-event", ""), headers.get("x-github-delivery", "")
        if not _EVENT.match(event) or not _DELIVERY.match(delivery):
            return _error(400, "bad_request", "missing or invalid X-GitHub-Event / X-GitHub-Delivery",
                          github_event=event[:64], delivery=delivery[:100])
        ctx = {"github_event": event, "delivery": delivery}  # structlog's "event" is the message
        try:
            payload = _payload(body, headers.get("content-type", "application/json"))
        except (msgspec.DecodeError, UnicodeDecodeError, BadPayload) as e:
            return _error(400, "bad_request", f"malformed payload: {e}", **ctx)
        action = payload.get("action") if isinstance(payload, dict) else None
        action = action if isinstance(action, str) else None
        if event == "ping":
            zen = payload.get("zen") if isinstance(payload, dict) else None
            log.info("webhook.ping", **ctx)
            return Response(Outcome(status="pong", event=event, delivery=delivery,
                                    zen=zen if isinstance(zen, str) else None), status_code=200)
        try:
            result = interpret(event, payload, delivery, trigger_label=trigger_label, bot_name=bot_name,
                               source=source, trust=trust, now=clock(), max_age=max_age)
        except BadPayload as e:
            return _error(400, "bad_request", str(e), **ctx)
        facts, reason = result.events, result.reason
        if result.checks is not None:
            if checks is None:
                reason = NO_CHECKS_READER
            else:
                try:
                    fact, reason = await checks.collect(result.checks)
                except CccError as e:
                    if e.retryable:
                        return _error(503, "service_unavailable", f"cannot read the checks: {e}", **ctx)
                    log.warning("webhook.checks_unreadable", error=str(e), **ctx)
                    fact, reason = None, f"cannot read the checks: {e}"
                facts = [fact] if fact is not None else []
        if facts:
            try:
                facts, reason = await with_permissions(facts)
            except CccError as e:
                return _error(503, "service_unavailable", f"cannot check the author's permission: {e}", **ctx)
        if not facts:
            # a stale delivery is worth a warning: a replay, or a redelivery after an outage
            level = log.warning if result.stale else log.info
            level("webhook.ignored", action=action, reason=reason, **ctx)
            return Response(Outcome(status="ignored", event=event, delivery=delivery, action=action,
                                    reason=reason), status_code=202)
        done: list[Published] = []
        for fact in facts:
            try:
                seq, duplicate = await publisher(fact)
            except StoreUnavailable as e:
                # GitHub does not retry on its own: the sender redelivers, and what we
                # already published deduplicates by its event id
                return _error(503, "service_unavailable", str(e), published=len(done), **ctx)
            done.append(Published(fact.event_id, fact.__struct_config__.tag, seq, duplicate))
        log.info("webhook.published", action=action, facts=[p.type for p in done],
                 duplicate=all(p.duplicate for p in done), **ctx)
        return Response(Outcome(status="published", event=event, delivery=delivery, action=action,
                                published=done), status_code=200)

    @get("/health", summary="Liveness; 503 when NATS is unreachable")
    async def health() -> Response:
        ok = is_connected() if is_connected is not None else True
        return Response({"status": "ok" if ok else "degraded", "nats_connected": ok},
                        status_code=200 if ok else 503)

    def on_http(_: Request, exc: HTTPException) -> Response:
        slug = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
        return Response(WebhookError(slug, exc.detail), status_code=exc.status_code)

    def on_internal(request: Request, exc: Exception) -> Response:
        log.error("webhook.internal_error", path=request.url.path, error=repr(exc), exc_info=exc)
        return Response(WebhookError("internal_error", "internal error; see the server log"), status_code=500)

    # one set of buckets for the app: Litestar builds the middleware once per route
    limiter = RateLimitMiddleware.factory(TokenBuckets(rate_limit))
    return Litestar(route_handlers=[webhook, health], logging_config=None, middleware=[limiter],
                    exception_handlers={HTTPException: on_http, Exception: on_internal},
                    request_max_body_size=max_body_bytes, openapi_config=None)


# -- the runner ---------------------------------------------------------------------------
def webhook_secret(env: Mapping[str, str] | None = None) -> str:
    """The shared secret from ``CCC_WEBHOOK_SECRET``; refuse to run without one."""
    secret = (os.environ if env is None else env).get(SECRET_ENV, "")
    if not secret.strip():
        raise ConfigError(f"{SECRET_ENV} is not set: the webhook receiver refuses unsigned deliveries")
    return secret


class WebhookServer(Served):
    """The receiver on ``host:port`` (0: any free port), publishing to ``ns`` over ``nc``.
    Provisions nothing: the caller provisions the namespace first. Same lifecycle as
    :class:`infra.adapters.http.status_server.ApiServer`: ``start() -> port``, ``url``, ``stop()``,
    ``serve_forever()``; the process owner handles signals."""

    def __init__(self, nc: Any, ns: Any, host: str = "127.0.0.1", port: int = 0, *,
                 secret: str | None = None, trigger_label: str = "ccc", bot_name: str = "ccc",
                 source: str = "github", trust: TrustPolicy = DEFAULT_TRUST,
                 publish_timeout: float = 5.0, rate_limit: RateLimit = WEBHOOK_RATE_LIMIT,
                 max_age: timedelta = DEFAULT_MAX_AGE, permissions: PermissionLookup | None = None,
                 clock: Callable[[], datetime] = utcnow, checks: ChecksCollector | None = None) -> None:
        self.http = HttpService(host, port, name="webhook receiver")
        self.checks_permissions = permissions is not None
        self.app = create_webhook_app(
            nats_publisher(nc, ns, timeout=publish_timeout), secret=secret or webhook_secret(),
            trigger_label=trigger_label, bot_name=bot_name, source=source, trust=trust,
            is_connected=lambda: bool(nc.is_connected), rate_limit=rate_limit, max_age=max_age,
            permissions=permissions, clock=clock, checks=checks,
        )

    async def start(self) -> int:
        """Bind (a port in use is an ``OSError`` here), start serving; returns the port."""
        if not self.checks_permissions:
            log.warning("webhook.trust_by_association", detail=ASSOCIATION_ONLY)
        return await self.http.start(self.app)

    async def stop(self) -> None:
        """Stop serving; in-flight deliveries get the grace period. Idempotent."""
        await self.http.stop()
