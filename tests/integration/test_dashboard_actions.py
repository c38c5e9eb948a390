"""The dashboard's actions over real HTTP: an ApiServer (uvicorn on a free port) over a
real nats-server, called with httpx as a browser would (cookies, forms, ``Origin``), and
an independent NATS connection subscribed to the namespace's issue subjects, which is
how the tests see what was published, and that nothing was.

Who may act (no token: 401, a read token: 403, the write token signed in: the fact), the
CSRF defences (the form's token, ``Origin``/``Referer``; each refusal 403 and nothing
published), signing in and out (cookie attributes, a stale cookie, a required token
sends a browser to the sign-in page), every action's fact (cancel, retry, new issue,
merge on the local forge, close) and hostile input (a huge title, control characters,
bidi overrides, a bad repository, markup echoed in an error page)."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import httpx
import msgspec
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from litestar import Response, post

from events import task_state as ts
from events.issue import (
    IssueCancelRequested,
    IssueEvent,
    IssueOpened,
    IssuePullRequestClosed,
    IssuePullRequestMerged,
    IssueRetryRequested,
)
from events.store import EventStore
from events.subjects import task_id_for
from events.task import IssueRef
from events.trust import OPERATOR
from infra.adapters.forge.local import FORGE_EMAIL, FORGE_NAME, LocalForge
from infra.adapters.git import gitops
from infra.adapters.http.auth import (
    API_TOKENS_FILE,
    SESSION_COOKIE,
    ApiAccess,
    create_api_tokens,
    load_api_tokens,
    new_session_cookie,
)
from infra.adapters.http.dashboard import csrf
from infra.adapters.http.dashboard.actions import task_actions
from infra.adapters.http.dashboard.csrf import FLASH_COOKIE, LOGIN_COOKIE
from infra.adapters.http.ratelimit import RateLimit
from infra.adapters.http.status_server import ApiServer
from infra.adapters.nats.connection import connect, connect_when_admitted
from infra.adapters.nats.provisioning import provision
from infra.adapters.nats.secure import SecureDir
from infra.adapters.nats.server import EmbeddedServer
from tests.support.domain import PATHS, cmd, run

pytestmark = pytest.mark.timeout(60)

NO_LIMIT = RateLimit(rate=0, burst=1)
REPO = "acme/app"
BRANCH = "ccc/7"  # the branch tests.support.domain's pull requests are opened on
HTML = {"Accept": "text/html,application/xhtml+xml"}
_decoder = msgspec.json.Decoder(IssueEvent)


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("secure")


@pytest.fixture(scope="module")
def tokens(secure_dir) -> dict[str, str]:
    return create_api_tokens(secure_dir)  # as `ccc secure init` does


@pytest.fixture(scope="module")
def access(tokens, secure_dir) -> ApiAccess:
    return ApiAccess(tokens=load_api_tokens(secure_dir / API_TOKENS_FILE), rate_limit=NO_LIMIT)


@pytest.fixture
def forge(tmp_path) -> LocalForge:
    """The local forge with ``acme/app``: ``main`` and the pull request's branch."""
    forge = LocalForge(tmp_path / "forge")
    bare = forge.create_repo(REPO, {"README.md": "app\n"})
    work = tmp_path / "work"
    gitops.run_git(tmp_path, "clone", "-q", str(bare), str(work))
    gitops.run_git(work, "checkout", "-q", "-b", BRANCH)
    (work / "feature.txt").write_text("the change\n")
    gitops.commit_all(work, "the change", FORGE_NAME, FORGE_EMAIL)
    gitops.run_git(work, "push", "-q", "origin", f"HEAD:refs/heads/{BRANCH}")
    return forge


class Watch:
    """An independent connection's subscription to the namespace's issue subjects."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    async def next(self, timeout: float = 5.0) -> tuple[str, IssueEvent]:
        msg = await asyncio.wait_for(self.queue.get(), timeout)
        return msg.subject, _decoder.decode(msg.data)

    def assert_nothing(self) -> None:
        assert self.queue.empty(), f"published: {self.queue.get_nowait().subject}"


@pytest_asyncio.fixture
async def watch(nats_url, admin_kit, ns) -> AsyncIterator[Watch]:
    conn = await connect(nats_url, name="dashboard-actions-watch", kit=admin_kit)
    w = Watch()
    sub = await conn.subscribe(f"{ns.prefix}.issue.>", cb=w.queue.put)
    await conn.flush()
    try:
        yield w
    finally:
        await sub.unsubscribe()
        await conn.close()


class Browser:
    """httpx as a browser: keeps cookies, sends ``Origin`` with its POSTs (a browser's
    same-origin form does), asks for HTML, does not follow redirects."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.http = httpx.AsyncClient(base_url=base_url, timeout=10, headers=HTML)

    async def get(self, path: str, **kw) -> httpx.Response:
        return await self.http.get(path, **kw)

    async def post(self, path: str, data: dict | None = None, *, origin: str | None = "own",
                   headers: dict | None = None, **kw) -> httpx.Response:
        sent = dict(headers or {})
        if origin == "own":
            sent["Origin"] = self.base
        elif origin is not None:
            sent["Origin"] = origin
        return await self.http.post(path, data=data or {}, headers=sent, **kw)

    async def sign_in(self, token: str, next_page: str = "/") -> httpx.Response:
        page = await self.get("/ui/login")
        assert page.status_code == 200, page.text
        r = await self.post("/ui/login", {"token": token, "csrf": form_csrf(page.text, "login-form"),
                                          "next": next_page})
        return r

    async def csrf(self) -> str:
        """The session's CSRF token, as a page's form carries it."""
        page = await self.get("/ui/issues/new")
        assert page.status_code == 200, page.text
        return form_csrf(page.text, "issue-form")

    async def act(self, path: str, data: dict | None = None, **kw) -> httpx.Response:
        return await self.post(path, {"csrf": await self.csrf(), **(data or {})}, **kw)

    def session_cookie(self) -> str | None:
        return self.http.cookies.get(SESSION_COOKIE)

    async def aclose(self) -> None:
        await self.http.aclose()


def form_csrf(page: str, form_id: str) -> str:
    form = re.search(rf'<form id="{form_id}".*?</form>', page, re.DOTALL)
    assert form, f"no form {form_id} in the page"
    token = re.search(r'name="csrf" value="([^"]*)"', form.group(0))
    assert token, f"no csrf field in {form_id}"
    return html.unescape(token.group(1))


def set_cookies(r: httpx.Response) -> dict[str, str]:
    """``Set-Cookie`` headers by cookie name (the whole header, attributes included)."""
    return {h.split("=", 1)[0]: h for h in r.headers.get_list("set-cookie")}


def flash_of(r: httpx.Response) -> str:
    return set_cookies(r).get(FLASH_COOKIE, "")


@asynccontextmanager
async def serving(store, access: ApiAccess, *, forge_root: Path | None = None,
                  host: str = "127.0.0.1") -> AsyncIterator[ApiServer]:
    server = ApiServer(store, host, 0, materialize=False, access=access, forge_root=forge_root)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def browser(server: ApiServer) -> AsyncIterator[Browser]:
    b = Browser(server.url)
    try:
        yield b
    finally:
        await b.aclose()


async def given_task(store, number: int, status: str, *, source: str = "local") -> str:
    """A task of ``acme/app#number`` in ``status``, written as the coordinator would."""
    task_id = task_id_for(REPO, number, source)
    issue = IssueRef(source=source, repo=REPO, number=number, title=f"issue {number}")
    events = run([cmd(ts.CreateTask, task_id=task_id, issue=issue), *PATHS[status]])
    await store.append(events, expected_last_seq=0)
    return task_id


# -- who may act -----------------------------------------------------------------------------------
async def test_actions_need_the_write_token(store, access, tokens, watch):
    task_id = await given_task(store, 1, "in_progress")
    async with serving(store, access) as server, browser(server) as anonymous, browser(server) as reader, \
            browser(server) as writer:
        cancel = f"/ui/tasks/{task_id}/cancel"
        # no token (reads are open on localhost, actions never are): 401, an HTML page with a way in
        r = await anonymous.act(cancel)
        assert r.status_code == 401, r.text
        assert r.headers["content-type"].startswith("text/html")
        assert 'id="sign-in-link"' in r.text and "write scope" in r.text
        # the same for a script: the API's JSON error
        r = await anonymous.http.post(cancel, data={"csrf": "x"}, headers={"Accept": "application/json",
                                                                           "Origin": server.url})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        # a read token, signed in or as a bearer header: 403
        assert (await reader.sign_in(tokens["read"])).status_code == 303
        r = await reader.act(cancel)
        assert r.status_code == 403 and "lacks the write scope" in r.text, r.text
        r = await reader.post(cancel, {"csrf": "x"}, headers={"Authorization": f"Bearer {tokens['read']}"})
        assert r.status_code == 403
        watch.assert_nothing()

        # the write token, signed in: the fact, and back to the task's page with a flash
        assert (await writer.sign_in(tokens["write"])).status_code == 303
        r = await writer.act(cancel, {"reason": "not needed any more"})
        assert r.status_code == 303, r.text
        assert r.headers["location"] == f"/tasks/{task_id}"
        assert flash_of(r)  # the outcome, shown on that page (the next test reads it there)
        subject, event = await watch.next()
        assert subject == f"{store.ns.prefix}.issue.local.acme_app.1.cancel_requested"
        assert isinstance(event, IssueCancelRequested)
        assert event.reason == "not needed any more" and event.author_association == OPERATOR
        assert event.actor == event.author == f"dashboard:{access.tokens.verify(tokens['write']).id}"
        watch.assert_nothing()  # the refusals before it published nothing: it is the first


async def test_the_task_pages_forms_act_and_the_outcome_shows_once(store, access, tokens, watch):
    """The forms the task page renders (DA's template, this module's macros) carry the
    session's token and post where they say; the flash shows on the page the action
    sends the browser back to, once."""
    task_id = await given_task(store, 1, "in_progress")
    async with serving(store, access) as server, browser(server) as b:
        await b.sign_in(tokens["write"])
        page = await b.get(f"/tasks/{task_id}")
        assert page.status_code == 200, page.text[:500]
        form = re.search(r'<form id="cancel-form"[^>]*action="([^"]+)"', page.text)
        assert form and html.unescape(form.group(1)) == f"/ui/tasks/{task_id}/cancel"
        assert form_csrf(page.text, "cancel-form") == await b.csrf()
        assert 'id="retry-form"' not in page.text  # nothing to retry while it runs
        r = await b.post(html.unescape(form.group(1)), {"csrf": form_csrf(page.text, "cancel-form"),
                                                        "reason": "from the page"})
        assert r.status_code == 303 and r.headers["location"] == f"/tasks/{task_id}", r.text
        _, event = await watch.next()
        assert isinstance(event, IssueCancelRequested) and event.reason == "from the page"
        shown = await b.get(r.headers["location"])
        flash = re.search(r'<div id="flash"[^>]*>(.*?)</div>', shown.text, re.DOTALL)
        assert flash and f"cancellation of {task_id} requested" in flash.group(1), shown.text[:2000]
        assert 'class="flash flash-ok"' in flash.group(1)
        assert "max-age=0" in set_cookies(shown)[FLASH_COOKIE].lower()  # shown: cleared
        again = await b.get(f"/tasks/{task_id}")
        assert "cancellation of" not in again.text


async def test_a_cookie_acts_only_under_ui(store, access, tokens):
    """A signed-in browser's cookie reads anywhere, but drives no write route outside
    ``/ui/`` (where every form is CSRF-checked): there it counts as no token."""

    @post("/api/v1/test/cookie-action", opt={"scope": "write"}, status_code=200, sync_to_thread=False)
    def elsewhere() -> dict:
        return {"done": True}

    server = ApiServer(store, "127.0.0.1", 0, materialize=False, access=access, route_handlers=[elsewhere])
    await server.start()
    try:
        async with browser(server) as b:
            await b.sign_in(tokens["write"])
            r = await b.post("/api/v1/test/cookie-action", {"csrf": await b.csrf()})
            assert r.status_code == 401, r.text
            r = await b.post("/api/v1/test/cookie-action",
                             headers={"Authorization": f"Bearer {tokens['write']}"})
            assert r.status_code == 200  # the bearer header is no cookie: a browser cannot forge it
    finally:
        await server.stop()


# -- CSRF ---------------------------------------------------------------------------------------------
async def test_csrf_token_and_origin_are_checked(store, access, tokens, watch):
    task_id = await given_task(store, 2, "in_progress")
    cancel = f"/ui/tasks/{task_id}/cancel"
    async with serving(store, access) as server, browser(server) as writer, browser(server) as other:
        await writer.sign_in(tokens["write"])
        await other.sign_in(tokens["write"])  # the same token, another sign-in: another CSRF token
        mine, theirs = await writer.csrf(), await other.csrf()
        assert mine and theirs and mine != theirs

        refusals = {
            "no csrf field": await writer.post(cancel, {}),
            "an empty one": await writer.post(cancel, {"csrf": ""}),
            "a wrong one": await writer.post(cancel, {"csrf": mine[:-2] + "xx"}),
            "another session's": await writer.post(cancel, {"csrf": theirs}),
            "a foreign Origin": await writer.post(cancel, {"csrf": mine}, origin="https://evil.example"),
            "another port": await writer.post(cancel, {"csrf": mine},
                                              origin=server.url.rsplit(":", 1)[0] + ":1"),
            "Origin: null": await writer.post(cancel, {"csrf": mine}, origin="null",
                                              headers={"Referer": f"{server.url}/tasks/{task_id}"}),
            "https for http": await writer.post(cancel, {"csrf": mine},
                                                origin=server.url.replace("http://", "https://")),
            "no Origin or Referer": await writer.post(cancel, {"csrf": mine}, origin=None),
            "a foreign Referer": await writer.post(cancel, {"csrf": mine}, origin=None,
                                                   headers={"Referer": "https://evil.example/page"}),
            "a text/plain form": await writer.http.post(
                cancel, content=f"csrf={mine}", headers={"Content-Type": "text/plain", "Origin": server.url}),
        }
        for why, r in refusals.items():
            assert r.status_code == 403, (why, r.status_code, r.text)
            assert "CSRF" in r.text or "cross-origin" in r.text or "Origin" in r.text, (why, r.text)
        watch.assert_nothing()

        # the same-origin Referer where a browser sends no Origin is enough
        r = await writer.post(cancel, {"csrf": mine}, origin=None,
                              headers={"Referer": f"{server.url}/tasks/{task_id}"})
        assert r.status_code == 303, r.text
        _, event = await watch.next()
        assert isinstance(event, IssueCancelRequested)
        watch.assert_nothing()


async def test_the_csrf_token_is_bound_to_the_credential(store, access, tokens, watch):
    """A bearer-header client's token is not a signed-in browser's, and a browser's
    cookie session ends with sign-out: its old token no longer acts."""
    task_id = await given_task(store, 3, "in_progress")
    cancel = f"/ui/tasks/{task_id}/cancel"
    async with serving(store, access) as server, browser(server) as writer:
        await writer.sign_in(tokens["write"])
        old = await writer.csrf()
        r = await writer.post("/ui/logout", {"csrf": old})
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        assert writer.session_cookie() is None
        r = await writer.post(cancel, {"csrf": old})
        assert r.status_code == 401  # signed out
        await writer.sign_in(tokens["write"])
        r = await writer.post(cancel, {"csrf": old})
        assert r.status_code == 403, r.text  # the old session's token
        watch.assert_nothing()


# -- signing in and out ------------------------------------------------------------------------------
async def test_sign_in_sets_a_strict_http_only_cookie(store, access, tokens):
    async with serving(store, access) as server, browser(server) as b:
        page = await b.get("/ui/login?next=/board%3Fstate%3Dfailed")
        assert page.status_code == 200
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        nonce_cookie = set_cookies(page)[LOGIN_COOKIE]
        assert "httponly" in nonce_cookie.lower() and "samesite=strict" in nonce_cookie.lower()
        assert "Path=/ui/login" in nonce_cookie
        assert 'name="token" type="password"' in page.text
        nonce = form_csrf(page.text, "login-form")

        # a wrong token: 401, the form again with why, no session
        r = await b.post("/ui/login", {"token": "x" * 43, "csrf": nonce})
        assert r.status_code == 401 and 'id="login-error"' in r.text
        assert b.session_cookie() is None
        # the form's nonce must match the cookie's (double submit)
        r = await b.post("/ui/login", {"token": tokens["write"], "csrf": "forged"})
        assert r.status_code == 403 and b.session_cookie() is None
        # and come from our own origin
        r = await b.post("/ui/login", {"token": tokens["write"], "csrf": nonce},
                         origin="https://evil.example")
        assert r.status_code == 403 and b.session_cookie() is None

        r = await b.post("/ui/login", {"token": tokens["write"], "csrf": nonce,
                                       "next": "/board?state=failed"})
        assert r.status_code == 303 and r.headers["location"] == "/board?state=failed"
        session = set_cookies(r)[SESSION_COOKIE]
        for attribute in ("httponly", "samesite=strict", "path=/", "max-age=43200"):
            assert attribute in session.lower(), session
        assert "secure" not in session.lower()  # plain HTTP on localhost; over TLS it is Secure
        assert tokens["write"] not in session  # encoded, not shown as is (it is in there, base64)
        assert "Max-Age=0" in set_cookies(r)[LOGIN_COOKIE]  # the nonce is spent

        page = await b.get("/ui/login")
        assert 'id="signed-in"' in page.text and "read, write" in page.text
        assert 'id="logout-form"' in page.text
        # signing out needs the session's CSRF token
        r = await b.post("/ui/logout", {})
        assert r.status_code == 403 and b.session_cookie() is not None
        r = await b.post("/ui/logout", {"csrf": form_csrf(page.text, "logout-form")})
        assert r.status_code == 303 and b.session_cookie() is None
        assert "Max-Age=0" in set_cookies(r)[SESSION_COOKIE]
        assert (await b.get("/ui/logout")).headers["location"] == "/ui/login"  # a link never signs out


def test_cookies_are_secure_over_tls():
    """The server here speaks plain HTTP; behind TLS (the request's scheme ``https``)
    every cookie of the dashboard is ``Secure`` too."""
    for scheme, secure in (("https", True), ("http", False)):
        response = Response(b"")
        csrf.set_cookie(response, SimpleNamespace(scope={"scheme": scheme}), SESSION_COOKIE, "v", max_age=60)
        (cookie,) = response.cookies
        assert (cookie.secure, cookie.httponly, cookie.samesite, cookie.path) == (secure, True, "strict", "/")


async def test_next_stays_on_this_server(store, access, tokens):
    async with serving(store, access) as server, browser(server) as b:
        for hostile in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)",
                        "/ok\r\nSet-Cookie: x=y", "evil"):
            page = await b.get("/ui/login")
            r = await b.post("/ui/login", {"token": tokens["read"], "next": hostile,
                                           "csrf": form_csrf(page.text, "login-form")})
            assert r.status_code == 303 and r.headers["location"] == "/", (hostile, r.headers["location"])
            assert "set-cookie: x" not in str(r.headers).lower()


async def test_a_stale_cookie_is_no_sign_in(store, access, tokens):
    """A session whose token is not (or no longer) valid counts as none: pages still
    read on localhost, sign-out clears it, and it cannot act."""
    task_id = await given_task(store, 4, "in_progress")
    async with serving(store, access) as server, browser(server) as b:
        b.http.cookies.set(SESSION_COOKIE, new_session_cookie("rotated-away-" + "x" * 30), domain="127.0.0.1")
        assert (await b.get("/ui/issues/new")).status_code == 200
        assert (await b.http.get("/api/v1/tasks", headers={"Accept": "application/json"})).status_code == 200
        r = await b.act(f"/ui/tasks/{task_id}/cancel")
        assert r.status_code == 401
        r = await b.post("/ui/logout", {})  # no session, so no CSRF token to give: cleared all the same
        assert r.status_code == 303 and b.session_cookie() is None


async def test_a_required_token_sends_a_browser_to_sign_in(store, access, tokens):
    required = ApiAccess(tokens=access.tokens, require_token=True, rate_limit=NO_LIMIT)
    async with serving(store, required) as server, browser(server) as b:
        r = await b.get("/ui/issues/new?x=1")
        assert r.status_code == 303
        location = urlsplit(r.headers["location"])
        assert location.path == "/ui/login" and parse_qs(location.query)["next"] == ["/ui/issues/new?x=1"]
        api = await b.http.get("/api/v1/tasks", headers={"Accept": "application/json"})
        assert api.status_code == 401 and api.json()["error"] == "unauthorized"  # scripts get the JSON
        assert (await b.http.get("/api/v1/tasks", headers=HTML)).status_code == 401  # the API is not a page
        # signing in is reachable without a token, and the cookie then counts as the bearer header
        signed_in = await b.sign_in(tokens["read"], "/ui/issues/new?x=1")
        assert signed_in.headers["location"] == "/ui/issues/new?x=1"
        assert (await b.get("/ui/issues/new?x=1")).status_code == 200
        assert (await b.http.get("/api/v1/tasks", headers={"Accept": "application/json"})).status_code == 200


# -- the actions --------------------------------------------------------------------------------------
async def test_publish_an_issue_on_the_local_forge(store, access, tokens, watch, forge):
    async with serving(store, access, forge_root=forge.root) as server, browser(server) as b:
        await b.sign_in(tokens["write"])
        page = await b.get("/ui/issues/new")
        assert '<option value="acme/app">' in page.text  # the forge's repositories are offered
        r = await b.act("/ui/issues", {"repo": REPO, "title": "Add <b>bold</b> to the README",
                                       "body": "line one\r\nline two\twith a tab",
                                       "labels": "backend, docs,,"})
        assert r.status_code == 303 and r.headers["location"] == "/board", r.text
        subject, event = await watch.next()
        assert subject == f"{store.ns.prefix}.issue.local.acme_app.1.opened"
        assert isinstance(event, IssueOpened)
        assert event.title == "Add <b>bold</b> to the README"  # text, stored as written; pages escape it
        assert event.body == "line one\nline two\twith a tab"
        assert event.labels == ("backend", "docs") and event.author_association == OPERATOR
        r = await b.act("/ui/issues", {"repo": REPO, "title": "second", "next": "/ui/issues/new"})
        assert r.status_code == 303
        _, second = await watch.next()
        assert second.number == 2  # numbers allocated on the log, as `ccc issue publish` does
        shown = await b.get("/ui/issues/new")
        assert f"task {task_id_for(REPO, 2)}" in shown.text


@pytest.mark.parametrize(("fields", "status", "says"), [
    ({"title": "x" * 10_000}, 400, "the title is too long: 10,000 characters, at most 256"),
    ({"title": "   "}, 400, "the title is empty"),
    ({"title": "red \x1b[31malert"}, 400, "control characters (U+001B)"),
    ({"title": "null \x00 byte"}, 400, "control characters (U+0000)"),
    ({"title": "fix\nnewline"}, 400, "control characters (U+000A)"),
    ({"title": "txt.exe\u202egnp.js"}, 400, "control characters (U+202E)"),
    ({"body": "ok\x07bell"}, 400, "the body contains control characters (U+0007)"),
    ({"body": "b" * 70_000}, 400, "the body is too long: 70,000 characters, at most 65,536"),
    ({"labels": ",".join(f"l{i}" for i in range(30))}, 400, "too many labels: 30, at most 20"),
    ({"labels": "x" * 51}, 400, "the label is too long"),
    ({"repo": "../../etc"}, 400, "invalid repo"),
    ({"repo": "acme/missing"}, 400, "the local forge has no repository acme/missing"),
    ({"repo": "<script>alert(1)</script>"}, 400, "invalid repo"),
    ({"body": "x" * 2_000_000}, 413, ""),
])
async def test_hostile_issue_input_is_refused_clearly(store, access, tokens, watch, forge, fields, status,
                                                      says):
    async with serving(store, access, forge_root=forge.root) as server, browser(server) as b:
        await b.sign_in(tokens["write"])
        r = await b.act("/ui/issues", {"repo": REPO, "title": "fine", **fields})
        assert r.status_code == status, r.text[:500]
        if says:
            assert r.headers["content-type"].startswith("text/html")
            detail = re.search(r'<p class="flash flash-error" id="error-detail">(.*?)</p>', r.text, re.DOTALL)
            assert detail and says in html.unescape(detail.group(1)), r.text[:1000]
            assert "<script>alert" not in r.text  # what the input said is escaped in the page
        watch.assert_nothing()


async def test_cancel_retry_and_their_refusals(store, access, tokens, watch):
    running = await given_task(store, 1, "in_progress")
    failed = await given_task(store, 2, "failed")
    stuck = await given_task(store, 3, "needs_human")
    done = await given_task(store, 4, "completed")
    async with serving(store, access) as server, browser(server) as b:
        await b.sign_in(tokens["write"])
        # refusals a person can act on: back to the page, an error flash, nothing published
        for path in (f"/ui/tasks/{done}/cancel", f"/ui/tasks/{running}/retry", f"/ui/tasks/{done}/retry"):
            r = await b.act(path, {"next": "/ui/issues/new"})
            assert r.status_code == 303, (path, r.text)
            shown = await b.get("/ui/issues/new")
            assert 'class="flash flash-error"' in shown.text, path
        assert "already completed" in shown.text or "cannot be retried" in shown.text
        assert (await b.act("/ui/tasks/acme_app-99/cancel")).status_code == 404
        assert (await b.act("/ui/tasks/no.such..id/cancel")).status_code in (400, 404)
        watch.assert_nothing()

        assert (await b.act(f"/ui/tasks/{failed}/retry")).status_code == 303
        subject, event = await watch.next()
        assert isinstance(event, IssueRetryRequested) and subject.endswith(".acme_app.2.retry_requested")
        assert event.author_association == OPERATOR
        assert (await b.act(f"/ui/tasks/{stuck}/retry")).status_code == 303  # its checks run again
        _, event = await watch.next()
        assert isinstance(event, IssueRetryRequested) and event.number == 3
        watch.assert_nothing()


async def test_merge_and_close_on_the_local_forge(store, access, tokens, watch, forge):
    to_merge = await given_task(store, 5, "review")
    to_close = await given_task(store, 6, "review")
    github = await given_task(store, 7, "review", source="github")
    queued = await given_task(store, 8, "queued")
    async with serving(store, access, forge_root=forge.root) as server, browser(server) as b:
        await b.sign_in(tokens["write"])
        before = forge.branch_sha(REPO, "main")
        r = await b.act(f"/ui/tasks/{to_merge}/merge")
        assert r.status_code == 303 and r.headers["location"] == f"/tasks/{to_merge}", r.text
        assert forge.branch_sha(REPO, "main") != before
        assert forge.read_file(REPO, "main", "feature.txt") == "the change\n"  # merged for real
        subject, event = await watch.next()
        assert isinstance(event, IssuePullRequestMerged) and subject.endswith(".acme_app.5.pr_merged")
        assert event.event_id == f"local:{REPO}#5:merged:1" and event.branch == BRANCH  # as `ccc pr merge`

        r = await b.act(f"/ui/tasks/{to_close}/close", {"reason": "wrong approach"})
        assert r.status_code == 303
        _, event = await watch.next()
        assert isinstance(event, IssuePullRequestClosed)
        assert event.reason == "wrong approach" and event.event_id == f"local:{REPO}#6:closed:1"

        for path in (f"/ui/tasks/{github}/merge", f"/ui/tasks/{queued}/merge", f"/ui/tasks/{queued}/close"):
            assert (await b.act(path)).status_code == 303  # an error flash: nothing to merge there
        watch.assert_nothing()

    # without a local forge served here, no merge at all
    async with serving(store, access) as server, browser(server) as b:
        await b.sign_in(tokens["write"])
        r = await b.act(f"/ui/tasks/{to_close}/merge")
        assert r.status_code == 400 and "serves none" in r.text
        r = await b.act("/ui/issues", {"repo": REPO, "title": "t"})
        assert r.status_code == 400
        watch.assert_nothing()


async def test_what_a_task_offers(store):
    states = {status: ts.fold(run([cmd(ts.CreateTask, task_id="acme_app-1", issue=IssueRef(
        source="local", repo=REPO, number=1, title="t")), *PATHS[status]])) for status in PATHS}
    assert task_actions(states["in_progress"], local_forge=True) == ("cancel",)
    assert task_actions(states["failed"], local_forge=True) == ("cancel", "retry")
    assert task_actions(states["needs_human"], local_forge=True) == ("cancel", "retry", "merge", "close")
    assert task_actions(states["review"], local_forge=True) == ("cancel", "merge", "close")
    assert task_actions(states["review"], local_forge=False) == ("cancel",)
    assert task_actions(states["completed"], local_forge=True) == ()
    assert task_actions(states["cancelled"], local_forge=True) == ()


async def test_on_a_secure_bus_the_actions_publish_as_the_cli_role(tmp_path, ns, access, tokens, forge):
    """As ``ccc up`` serves it: the API reads the log with the read-only ``status``
    role's credentials, which may not publish an issue fact, and the actions publish
    through the ``publisher`` connection (the ``cli`` role's, which may)."""
    secure = SecureDir(tmp_path / "nats" / "secure")
    secure.init(ns)
    server = EmbeddedServer(tmp_path / "nats", secure=secure, js_key=secure.js_key())
    url = server.start()
    conns = []
    try:
        for role in ("admin", "status", "cli"):
            kit = secure.kit(role, None if role == "admin" else ns)
            conns.append(await connect_when_admitted(url, name=f"test-{role}", kit=kit, reconnect=False,
                                                     quiet=True))
        admin, status, cli = conns
        await provision(admin, ns)
        store = EventStore(status, ns)
        task_id = await given_task(EventStore(admin, ns), 1, "review")  # the coordinator's to write
        seen: asyncio.Queue = asyncio.Queue()
        await admin.subscribe(f"{ns.prefix}.issue.>", cb=seen.put)
        with pytest.raises((TimeoutError, nats.errors.Error, nats.js.errors.Error)):  # denied: no ack comes
            await status.jetstream(timeout=0.5).publish(f"{ns.prefix}.issue.local.acme_app.1.closed", b"{}")

        api = ApiServer(store, "127.0.0.1", 0, materialize=False, access=access, forge_root=forge.root,
                        publisher=cli)
        await api.start()
        try:
            async with browser(api) as b:
                await b.sign_in(tokens["write"])
                r = await b.act(f"/ui/tasks/{task_id}/merge")
                assert r.status_code == 303, r.text
                msg = await asyncio.wait_for(seen.get(), 5)
                assert isinstance(_decoder.decode(msg.data), IssuePullRequestMerged)
                r = await b.act("/ui/issues", {"repo": REPO, "title": "published as the cli role"})
                assert r.status_code == 303, r.text
                msg = await asyncio.wait_for(seen.get(), 5)
                assert _decoder.decode(msg.data).title == "published as the cli role"
        finally:
            await api.stop()
    finally:
        for conn in conns:
            await conn.close()
        server.stop()
