"""The dashboard's actions: cancel or retry a task, publish an issue on the local forge,
merge or close a task's pull request there; and signing in with a token.

Each action publishes the fact the CLI publishes for it (``ccc tasks cancel``, ``ccc
issue publish``, ``ccc pr merge|close``; a retry is what ``@ccc retry`` on an issue says),
as the operator (``author_association`` ``OWNER``, :data:`events.trust.OPERATOR`), with
``actor`` ``dashboard:<token id>`` so the log says which token asked. Nothing here
writes a task event: the coordinator's intake decides, as it does for the CLI and the
forge's webhooks, and the dashboard shows the outcome when the log has it.

    handlers = action_handlers(store, access, forge_root=data_dir / "forge")
    ApiServer(store, ..., access=access, route_handlers=[*pages, *handlers])

Routes (all POSTs answer 303 to the form's ``next`` page, default the task's page or
the board, with a flash message; refusals a person can act on are an error flash
there):

=======================================  ======================================================
``POST /ui/tasks/{id}/cancel``           ``issue.cancel_requested`` (``reason`` optional)
``POST /ui/tasks/{id}/retry``            ``issue.retry_requested`` (a failed task with attempts
                                         left, or one that needs a human: its checks re-run)
``POST /ui/tasks/{id}/merge``            merge the branch on the local forge, then
                                         ``issue.pr_merged``
``POST /ui/tasks/{id}/close``            ``issue.pr_closed`` (``reason`` optional)
``POST /ui/issues``                      ``issue.opened`` on the local forge (``repo``, ``title``,
                                         ``body``, ``labels`` comma-separated)
``GET /ui/issues/new``                   the form for it
``GET|POST /ui/login``                   sign in with a token (sets ``ccc_session``)
``GET|POST /ui/logout``                  sign out (GET only leads to the sign-in page and its
                                         button: a link must not act)
=======================================  ======================================================

Who may: the actions declare ``opt={"scope": "write"}`` (the gate and the app's scope
guard answer 401 without a token, 403 with a read token); signing in is public. Every
POST must come from the dashboard's own pages (:func:`csrf.check_same_origin`) and
carry the session's CSRF token (:func:`csrf.check_csrf`), else 403 and nothing is
published. Input is bounded and checked before anything is published: a title of at
most 256 characters with no control or bidi-override characters, a body of at most
65,536 (tabs and line breaks allowed), at most 20 labels of 50; a request body past
its route's limit is 413. Errors answer in HTML to a browser and in the API's JSON
shape otherwise.
"""

from __future__ import annotations

import asyncio
import unicodedata
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import structlog
from litestar import Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.enums import MediaType
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.params import FromPath
from litestar.response import Redirect
from nats.aio.client import Client

from events.errors import ConfigError, StoreUnavailable
from events.issue import (
    IssueCancelRequested,
    IssueEventBase,
    IssuePullRequestClosed,
    IssueRetryRequested,
)
from events.store import EventStore
from events.subjects import check_id, check_repo
from events.task_state import PR_OPEN, TaskState
from events.trust import OPERATOR
from projections.status_views import ErrorBody

from infra.adapters.forge.errors import ForgeError
from infra.adapters.forge.local import LocalForge, merged_fact
from infra.adapters.http.auth import (
    LOGIN_PATH,
    PUBLIC,
    SESSION_COOKIE,
    SESSION_MAX_AGE,
    WRITE,
    ApiAccess,
    Principal,
    new_session_cookie,
)
from infra.adapters.http.dashboard import csrf
from infra.adapters.http.errors import error_slug
from infra.adapters.nats.issue_publisher import open_issue, publish_issue

log = structlog.get_logger("ccc.dashboard")

TEMPLATES = Path(__file__).parent / "templates"
LOCAL = "local"
MAX_TITLE = 256  # GitHub's limit
MAX_BODY = 65_536  # GitHub's limit
MAX_LABELS = 20
MAX_LABEL = 50  # GitHub's limit
MAX_REASON = 500
MAX_NEXT = 2_000
ACTION_BODY_LIMIT = 64 * 1024  # a task action's form: a token, a reason, a path
ISSUE_BODY_LIMIT = 1024 * 1024  # 65,536 characters, URL-encoded UTF-8 at worst 12 bytes each, roughly
PAGE_HEADERS = csrf.PAGE_HEADERS
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


# -- what a task offers -----------------------------------------------------------------------
def task_actions(task: TaskState, *, local_forge: bool) -> tuple[str, ...]:
    """The actions that apply to ``task`` now (the forms its page shows): ``cancel``
    unless it is final; ``retry`` when it failed with attempts left or needs a human;
    ``merge`` and ``close`` while its pull request is open on the local forge (served by
    this dashboard: ``local_forge``)."""
    actions = []
    if not task.final:
        actions.append("cancel")
    if task.status == "needs_human" or task.can_retry:
        actions.append("retry")
    if local_forge and task.issue.source == LOCAL and task.status in PR_OPEN and task.branch:
        actions += ["merge", "close"]
    return tuple(actions)


# -- input --------------------------------------------------------------------------------------
def _bad(detail: str) -> ClientException:
    return ClientException(status_code=400, detail=detail)


def _controls(text: str, allowed: str = "") -> list[str]:
    return sorted({f"U+{ord(c):04X}" for c in text
                   if c not in allowed and (unicodedata.category(c) == "Cc" or c in _BIDI)})


def check_text(value: str, what: str, *, limit: int, multiline: bool = False, required: bool = False) -> str:
    """``value`` stripped (line breaks normalised to ``\\n``), or a 400 saying what is
    wrong: too long, empty where required, or control characters (bidi overrides too:
    they make a title read as something it is not) other than tabs and line breaks in
    a multi-line field."""
    value = value.replace("\r\n", "\n").replace("\r", "\n").strip()
    if required and not value:
        raise _bad(f"the {what} is empty")
    if len(value) > limit:
        raise _bad(f"the {what} is too long: {len(value):,} characters, at most {limit:,}")
    if bad := _controls(value, "\t\n" if multiline else ""):
        raise _bad(f"the {what} contains control characters ({', '.join(bad[:5])}): remove them")
    return value


def check_labels(text: str) -> tuple[str, ...]:
    labels = tuple(dict.fromkeys(lbl.strip() for lbl in text.split(",") if lbl.strip()))
    if len(labels) > MAX_LABELS:
        raise _bad(f"too many labels: {len(labels)}, at most {MAX_LABELS}")
    for label in labels:
        check_text(label, "label", limit=MAX_LABEL)
    return labels


def check_next(value: str, default: str) -> str:
    """Where to send the browser after the action: a path on this server (no scheme,
    no host, not ``//`` or ``/\\``, which browsers read as another host), else
    ``default``."""
    value = value.strip()
    if not value or len(value) > MAX_NEXT or _controls(value) or "\\" in value:
        return default
    try:
        parts = urlsplit(value)
    except ValueError:
        return default
    if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
        return default
    return value


def _field(form: FormMultiDict, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _task_id(task_id: str) -> str:
    try:
        return check_id(task_id, "task id")
    except ConfigError as e:
        raise _bad(str(e)) from None


def _now() -> datetime:
    return datetime.now(UTC)


# -- responses ------------------------------------------------------------------------------------
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_ISSUE_PAGE = _env.from_string(
    '{% from "_actions.html" import shell, issue_form with context %}'
    '{% call shell("New issue", "new-issue") %}{{ issue_form(repos, forge, next) }}{% endcall %}')
_ERROR_PAGE = _env.from_string(
    '{% from "_actions.html" import shell, error_panel with context %}'
    '{% call shell(title, "error") %}{{ error_panel(status, title, detail, sign_in, back) }}{% endcall %}')


def _render(template: jinja2.Template, request: Request, status_code: int = 200, **context: Any) -> Response:
    flash = csrf.read_flash(request)
    principal = request.scope.get("auth")
    html = template.render(csrf_field=lambda: csrf.csrf_field(request), flash=flash,
                           principal=principal if isinstance(principal, Principal) else None, **context)
    response = Response(html, status_code=status_code, media_type=MediaType.HTML, headers=PAGE_HEADERS)
    if flash is not None:
        csrf.clear_flash(response, request)
    return response


def _back(request: Request, default: str) -> str:
    """The page a refused form was posted from (its Referer, if ours), else ``default``."""
    referer = request.headers.get("referer", "")
    try:
        parts = urlsplit(referer)
    except ValueError:
        return default
    if f"{parts.scheme}://{parts.netloc}".lower() != csrf.request_origin(request).lower():
        return default
    return check_next(parts.path + (f"?{parts.query}" if parts.query else ""), default)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def on_error(request: Request, exc: HTTPException) -> Response:
    """The actions' errors: an HTML page for a browser (with a way to sign in where a
    token is missing or too weak), the API's JSON error otherwise."""
    status, detail = exc.status_code, str(exc.detail)
    headers = dict(exc.headers or {})
    if not _wants_html(request):
        return Response(ErrorBody(error=error_slug(status), detail=detail), status_code=status,
                        headers=headers)
    back = _back(request, "/")
    sign_in = None
    if isinstance(exc, NotAuthorizedException) or (isinstance(exc, PermissionDeniedException)
                                                   and "scope" in headers.get("WWW-Authenticate", "")):
        sign_in = f"/ui/login?next={quote(back, safe='')}"
    title = {400: "Invalid input", 401: "Sign in to act", 403: "Refused", 404: "Not found",
             413: "Too large", 503: "Unavailable"}.get(status, "Error")
    response = _render(_ERROR_PAGE, request, status, title=title, status=status, detail=detail,
                       sign_in=sign_in, back=back)
    response.headers.update(headers)
    return response


def on_unavailable(request: Request, exc: StoreUnavailable) -> Response:
    log.warning("dashboard.action_unavailable", path=request.url.path, error=str(exc))
    return on_error(request, HTTPException(status_code=503, detail=f"the event log is unavailable: {exc}"))


EXCEPTION_HANDLERS: dict[Any, Callable[..., Response]] = {HTTPException: on_error,
                                                          StoreUnavailable: on_unavailable}


def _done(request: Request, next_page: str, kind: csrf.FlashKind, text: str) -> Redirect:
    response = Redirect(path=next_page, status_code=303, headers={"Cache-Control": "no-store"})
    csrf.set_flash(response, request, kind, text)
    return response


# -- the actions -----------------------------------------------------------------------------------
class DashboardActions:
    """What the actions need: ``store`` (reading a task's history), ``publisher`` (a
    NATS connection allowed to publish local issue facts: the ``cli`` role's; default
    the store's own), the API's ``access`` (to check a sign-in's token), and
    ``forge_root``, the local forge's directory on this host (None: no local forge
    here, so no issue, merge or close)."""

    def __init__(self, store: EventStore, access: ApiAccess, *, forge_root: Path | str | None = None,
                 publisher: Client | None = None, timeout: float = 5.0) -> None:
        self.store = store
        self.ns = store.ns
        self.access = access
        self.forge = LocalForge(forge_root) if forge_root is not None else None
        self.publisher = publisher or store.nc
        self.timeout = timeout

    # -- shared steps --------------------------------------------------------------------------
    async def form(self, request: Request) -> FormMultiDict:
        """The POST's form, after the same-origin and CSRF checks (403 and nothing done)."""
        csrf.check_same_origin(request)
        form = await request.form()
        csrf.check_csrf(request, _field(form, csrf.CSRF_FIELD))
        return form

    async def task(self, task_id: str) -> TaskState:
        task, _ = await self.store.load_task(task_id)
        if task is None:
            raise NotFoundException(detail=f"no task {task_id}")
        return task

    async def publish(self, event: IssueEventBase) -> int:
        seq, _ = await publish_issue(self.publisher, self.ns, event, timeout=self.timeout)
        return seq

    def local_forge(self, what: str) -> LocalForge:
        if self.forge is None:
            raise _bad(f"{what} needs the local forge, and this dashboard serves none")
        return self.forge

    @staticmethod
    def actor(request: Request) -> str:
        principal = request.scope.get("auth")
        return f"dashboard:{principal.token_id}" if isinstance(principal, Principal) else "dashboard"

    # -- the task actions ------------------------------------------------------------------------
    async def cancel(self, request: Request, task_id: str) -> Redirect:
        form = await self.form(request)
        task_id = _task_id(task_id)
        next_page = check_next(_field(form, "next"), f"/tasks/{task_id}")
        reason = (check_text(_field(form, "reason"), "reason", limit=MAX_REASON)
                  or "cancelled from the dashboard")
        task = await self.task(task_id)
        if task.final:
            return _done(request, next_page, "error", f"task {task_id} is already {task.status}")
        actor = self.actor(request)
        seq = await self.publish(IssueCancelRequested(
            event_id=f"dashboard:{task_id}:cancel:{uuid.uuid4().hex}", source=task.issue.source,
            repo=task.issue.repo, number=task.issue.number, occurred_at=_now(), reason=reason,
            actor=actor, author=actor, author_association=OPERATOR))
        log.info("dashboard.cancel", task_id=task_id, actor=actor, seq=seq)
        return _done(request, next_page, "ok", f"cancellation of {task_id} requested (seq {seq})")

    async def retry(self, request: Request, task_id: str) -> Redirect:
        form = await self.form(request)
        task_id = _task_id(task_id)
        next_page = check_next(_field(form, "next"), f"/tasks/{task_id}")
        task = await self.task(task_id)
        if task.status != "needs_human" and not task.can_retry:
            return _done(request, next_page, "error",
                         f"task {task_id} cannot be retried: {_why_not_retry(task)}")
        actor = self.actor(request)
        seq = await self.publish(IssueRetryRequested(
            event_id=f"dashboard:{task_id}:retry:{uuid.uuid4().hex}", source=task.issue.source,
            repo=task.issue.repo, number=task.issue.number, occurred_at=_now(),
            reason="retry requested from the dashboard", actor=actor, author=actor,
            author_association=OPERATOR))
        log.info("dashboard.retry", task_id=task_id, actor=actor, seq=seq)
        what = "a re-run of its checks" if task.status == "needs_human" else "a retry"
        return _done(request, next_page, "ok", f"{what} of {task_id} requested (seq {seq})")

    async def _open_pr(self, request: Request, task_id: str,
                       what: str) -> tuple[FormMultiDict, str, TaskState]:
        form = await self.form(request)
        task_id = _task_id(task_id)
        next_page = check_next(_field(form, "next"), f"/tasks/{task_id}")
        self.local_forge(f"{what} a pull request")
        task = await self.task(task_id)
        return form, next_page, task

    @staticmethod
    def _pr_refusal(task: TaskState, task_id: str) -> str | None:
        if task.issue.source != LOCAL:
            return f"task {task_id}'s pull request is on {task.issue.source}: act on it there"
        if task.status not in PR_OPEN or not task.branch:
            return f"task {task_id} has no open pull request (it is {task.status})"
        return None

    async def merge(self, request: Request, task_id: str) -> Redirect:
        _, next_page, task = await self._open_pr(request, task_id, "merging")
        if why := self._pr_refusal(task, task_id):
            return _done(request, next_page, "error", why)
        forge = self.local_forge("merging a pull request")
        try:
            sha = await asyncio.to_thread(forge.merge, task.issue.repo, task.branch,
                                          message=f"Merge {task.branch}: {task.issue.title}")
        except ForgeError as e:  # a conflict, a branch gone: the person decides what next
            return _done(request, next_page, "error", f"could not merge {task.branch}: {e}")
        seq = await self.publish(merged_fact(task, _now(), self.actor(request)))
        log.info("dashboard.merge", task_id=task.task_id, actor=self.actor(request), sha=sha, seq=seq)
        return _done(request, next_page, "ok",
                     f"merged {task.branch} into {task.issue.repo} ({sha[:12]}); seq {seq}")

    async def close(self, request: Request, task_id: str) -> Redirect:
        form, next_page, task = await self._open_pr(request, task_id, "closing")
        reason = (check_text(_field(form, "reason"), "reason", limit=MAX_REASON)
                  or "pull request closed without merging")
        if why := self._pr_refusal(task, task_id):
            return _done(request, next_page, "error", why)
        seq = await self.publish(IssuePullRequestClosed(
            event_id=f"local:{task.issue.repo}#{task.issue.number}:closed:{task.attempt}",
            source=task.issue.source, repo=task.issue.repo, number=task.issue.number, occurred_at=_now(),
            actor=self.actor(request), pr_number=task.pr_number, branch=task.branch, reason=reason))
        log.info("dashboard.close", task_id=task.task_id, actor=self.actor(request), seq=seq)
        return _done(request, next_page, "ok", f"closed the pull request of {task.task_id}; seq {seq}")

    # -- issues -------------------------------------------------------------------------------------
    def repos(self) -> list[str]:
        """The local forge's repositories (``owner/name``), for the form's suggestions."""
        if self.forge is None or not self.forge.root.is_dir():
            return []
        return [f"{p.parent.name}/{p.name[:-4]}" for p in sorted(self.forge.root.glob("*/*.git"))]

    def new_issue_page(self, request: Request) -> Response:
        next_page = check_next(request.query_params.get("next", ""), "/board")
        return _render(_ISSUE_PAGE, request, repos=self.repos(), forge=self.forge is not None, next=next_page)

    async def open_issue(self, request: Request) -> Redirect:
        form = await self.form(request)
        next_page = check_next(_field(form, "next"), "/board")
        forge = self.local_forge("publishing an issue")
        try:
            repo = check_repo(_field(form, "repo"))
        except ConfigError as e:
            raise _bad(str(e)) from None
        title = check_text(_field(form, "title"), "title", limit=MAX_TITLE, required=True)
        body = check_text(_field(form, "body"), "body", limit=MAX_BODY, multiline=True)
        labels = check_labels(_field(form, "labels"))
        if not forge.exists(repo):
            raise _bad(f"the local forge has no repository {repo} (add it with `ccc repo import`)")
        actor = self.actor(request)
        try:
            published = await open_issue(self.publisher, self.ns, repo=repo, title=title, body=body,
                                         labels=labels, source=LOCAL, actor=actor, timeout=self.timeout)
        except ConfigError as e:  # what the CLI's validation refuses too
            raise _bad(str(e)) from None
        e = published.event
        log.info("dashboard.issue", repo=repo, number=e.number, actor=actor, seq=published.seq)
        return _done(request, next_page, "ok",
                     f"opened {e.source}:{e.repo}#{e.number}: task {published.task_id} (seq {published.seq})")

    # -- signing in -----------------------------------------------------------------------------------
    def login_page(self, request: Request, *, error: str = "", status_code: int = 200,
                   next_page: str | None = None) -> Response:
        nonce = csrf.login_nonce(request)
        if next_page is None:
            next_page = check_next(request.query_params.get("next", ""), "/")
        principal = request.scope.get("auth")
        scopes = sorted(principal.scopes) if isinstance(principal, Principal) and principal.token_id else []
        response = _render(_env.get_template("login.html"), request, status_code, login_nonce=nonce,
                           next=next_page, error=error, scopes=", ".join(scopes),
                           tokens_configured=bool(self.access.tokens))
        csrf.set_login_cookie(response, request, nonce)
        return response

    async def login(self, request: Request) -> Response:
        csrf.check_same_origin(request)
        form = await request.form()
        csrf.check_login_nonce(request, _field(form, csrf.CSRF_FIELD))
        next_page = check_next(_field(form, "next"), "/")
        presented = _field(form, "token").strip()
        token = self.access.verify(presented)
        if token is None:
            log.info("dashboard.sign_in_refused", client=request.client.host if request.client else None)
            return self.login_page(request, error="that token is not valid here", status_code=401,
                                   next_page=next_page)
        response = _done(request, next_page, "ok",
                         f"signed in: {' and '.join(token.scopes)} (token {token.id})")
        csrf.set_cookie(response, request, SESSION_COOKIE, new_session_cookie(presented),
                        max_age=SESSION_MAX_AGE)
        csrf.delete_cookie(response, request, csrf.LOGIN_COOKIE, path=LOGIN_PATH)
        log.info("dashboard.signed_in", token_id=token.id, scopes=list(token.scopes))
        return response

    async def logout(self, request: Request) -> Response:
        """Sign out. With a valid session the form's CSRF token is checked (a page
        elsewhere cannot sign you out); a stale cookie is cleared without one."""
        csrf.check_same_origin(request)
        form = await request.form()
        principal = request.scope.get("auth")
        if isinstance(principal, Principal) and principal.session is not None:
            csrf.check_csrf(request, _field(form, csrf.CSRF_FIELD))
        response = _done(request, LOGIN_PATH, "ok", "signed out")
        csrf.delete_cookie(response, request, SESSION_COOKIE)
        return response


def _why_not_retry(task: TaskState) -> str:
    if task.status != "failed":
        return f"it is {task.status}"
    if not task.failure_retryable:
        return "its failure is not retryable"
    if task.cancel_requested:
        return "its cancellation was requested"
    return f"its attempts are used up ({task.attempt}/{task.max_attempts})"


def action_handlers(store: EventStore, access: ApiAccess, *, forge_root: Path | str | None = None,
                    publisher: Client | None = None, timeout: float = 5.0) -> list:
    """The dashboard's action and sign-in routes, to serve beside the status API behind
    its gate (``ApiServer(..., route_handlers=[*pages, *action_handlers(...)])``).
    ``publisher``: a connection that may publish local issue facts (on a secure cluster
    the ``cli`` role's; the ``status`` role may not); default ``store``'s."""
    actions = DashboardActions(store, access, forge_root=forge_root, publisher=publisher, timeout=timeout)
    write = {"scope": WRITE}
    common: dict[str, Any] = {"exception_handlers": EXCEPTION_HANDLERS, "include_in_schema": False}

    @post("/ui/tasks/{task_id:str}/cancel", opt=write, request_max_body_size=ACTION_BODY_LIMIT, **common)
    async def cancel_task(request: Request, task_id: FromPath[str]) -> Redirect:
        return await actions.cancel(request, task_id)

    @post("/ui/tasks/{task_id:str}/retry", opt=write, request_max_body_size=ACTION_BODY_LIMIT, **common)
    async def retry_task(request: Request, task_id: FromPath[str]) -> Redirect:
        return await actions.retry(request, task_id)

    @post("/ui/tasks/{task_id:str}/merge", opt=write, request_max_body_size=ACTION_BODY_LIMIT, **common)
    async def merge_pr(request: Request, task_id: FromPath[str]) -> Redirect:
        return await actions.merge(request, task_id)

    @post("/ui/tasks/{task_id:str}/close", opt=write, request_max_body_size=ACTION_BODY_LIMIT, **common)
    async def close_pr(request: Request, task_id: FromPath[str]) -> Redirect:
        return await actions.close(request, task_id)

    @post("/ui/issues", opt=write, request_max_body_size=ISSUE_BODY_LIMIT, **common)
    async def publish_issue_form(request: Request) -> Redirect:
        return await actions.open_issue(request)

    @get("/ui/issues/new", **common)
    async def new_issue(request: Request) -> Response:
        return actions.new_issue_page(request)

    @get("/ui/login", opt={"scope": PUBLIC}, **common)
    async def login_form(request: Request) -> Response:
        return actions.login_page(request)

    @post("/ui/login", opt={"scope": PUBLIC}, request_max_body_size=ACTION_BODY_LIMIT, **common)
    async def login(request: Request) -> Response:
        return await actions.login(request)

    @get("/ui/logout", opt={"scope": PUBLIC}, **common)
    async def logout_form(request: Request) -> Response:
        return Redirect(path=LOGIN_PATH, status_code=303)

    @post("/ui/logout", opt={"scope": PUBLIC}, request_max_body_size=ACTION_BODY_LIMIT, **common)
    async def logout(request: Request) -> Response:
        return await actions.logout(request)

    return [cancel_task, retry_task, merge_pr, close_pr, publish_issue_form, new_issue, login_form, login,
            logout_form, logout]


__all__ = ["ACTION_BODY_LIMIT", "EXCEPTION_HANDLERS", "ISSUE_BODY_LIMIT", "MAX_BODY", "MAX_LABEL",
           "MAX_LABELS", "MAX_REASON", "MAX_TITLE", "PAGE_HEADERS", "DashboardActions", "action_handlers",
           "check_labels", "check_next", "check_text", "on_error", "task_actions"]
