"""The dashboard in a real browser: Playwright for Python driving Debian's ``chromium``
(the system binary, headless; nothing is downloaded at run time) against real ``ccc up``
/ ``ccc api`` processes with the scripted coder.

Every page a test opens is watched: a console error (a CSP violation is one), an
uncaught page error, or a request to anywhere but the API's own origin (no CDN: the
dashboard works offline) fails the test. A test that restarts the API on purpose says
so with :meth:`BrowserWatch.api_down`, which lets the connection errors of that window
through and nothing else.

Screenshots go under the test's ``tmp_path``; ``--dashboard-png PATH`` (e.g.
``python -m pytest tests/browser --dashboard-png docs/dashboard.png``) also writes the
board's screenshot there, for the README."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import FIX, REPO_ROOT, Processes, ccc, make_repo, write_script

try:
    from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
except ModuleNotFoundError:  # pragma: no cover - a dev dependency (pip install -e '.[dev]')
    sync_playwright = None

NAV_TIMEOUT_MS = 15_000  # one page load or one expectation; the test's own timeout bounds the rest
VIEWPORT = {"width": 1360, "height": 860}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--dashboard-png", default=None, metavar="PATH",
                     help="Also write the board's screenshot here (the README's docs/dashboard.png).")


# -- the browser -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:  # never skipped: a machine without it is not set up
        pytest.fail("the system `chromium` is missing: run `bash .ci/system-deps.sh` (it installs Debian's "
                    "chromium, which these tests drive headless; nothing is downloaded at run time)",
                    pytrace=False)
    if sync_playwright is None:
        pytest.fail("Playwright for Python is missing: `pip install -e '.[dev]'`", pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser(chromium_path) -> Iterator[Browser]:
    # Module scope: the sync API runs its own event loop, kept apart from pytest-asyncio's
    # (every test in this package is synchronous), and stopped before other modules run.
    pw = sync_playwright().start()
    try:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses root
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


@dataclass
class BrowserWatch:
    """What went wrong in the browser, page by page: console errors, uncaught errors,
    requests that left the API's origin, and top-level navigations (a "live" update
    must not be a reload)."""

    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)
    navigations: list[str] = field(default_factory=list)
    _api_down: bool = False

    def attach(self, context: BrowserContext) -> None:
        context.on("page", self.watch)
        context.on("request", self._request)

    def watch(self, page: Page) -> None:
        page.on("console", lambda msg: self._console(page, msg))
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught error on {page.url}: {exc}"))
        page.on("framenavigated", lambda frame: frame == page.main_frame and self.navigations.append(frame.url))
        page.on("dialog", lambda dialog: dialog.accept())  # a confirm() before an action: yes

    # what a browser logs while nothing listens on the API's port (never an HTTP status)
    _NETWORK = re.compile(r"net::ERR_(CONNECTION_REFUSED|CONNECTION_RESET|CONNECTION_CLOSED|EMPTY_RESPONSE"
                          r"|INCOMPLETE_CHUNKED_ENCODING)\b")

    def _console(self, page: Page, msg: Any) -> None:
        if msg.type != "error":
            return
        loc = msg.location or {}
        text = f"console error on {page.url}: {msg.text} ({loc.get('url', '')}:{loc.get('lineNumber', '')})"
        if self._api_down and self._NETWORK.search(msg.text):
            self.tolerated.append(text)
        else:
            self.errors.append(text)

    def _request(self, request: Any) -> None:
        url = request.url
        if not (url.startswith((self.origin + "/", "data:", "about:")) or url == self.origin):
            self.foreign.append(url)

    @contextlib.contextmanager
    def api_down(self) -> Iterator[None]:
        """While the API is stopped on purpose, its connection errors are expected."""
        self._api_down = True
        try:
            yield
        finally:
            self._api_down = False

    def check(self) -> None:
        assert not self.errors, "errors in the browser:\n" + "\n".join(self.errors)
        assert not self.foreign, "requests beyond the API's origin (no CDN, offline):\n" + "\n".join(self.foreign)


class Dashboard:
    """One browser context on one API: pages, sign-in, screenshots."""

    def __init__(self, browser: Browser, base: str, shots: Path, *, javascript: bool = True) -> None:
        self.base = base.rstrip("/")
        self.shots = shots
        self.watch = BrowserWatch(self.base)
        self.context = browser.new_context(viewport=VIEWPORT, java_script_enabled=javascript)
        self.context.set_default_timeout(NAV_TIMEOUT_MS)
        self.context.set_default_navigation_timeout(NAV_TIMEOUT_MS)
        self.watch.attach(self.context)

    def open(self, path: str = "/", page: Page | None = None) -> Page:
        page = page or self.context.new_page()
        response = page.goto(self.base + path, wait_until="load")
        assert response is not None and response.status == 200, (path, response and response.status)
        return page

    def sign_in(self, token: str) -> Page:
        """``/ui/login``: the form with ``input[name=token]``; the cookie it sets is what
        the API's gate accepts from a browser."""
        page = self.open("/ui/login")
        page.locator("input[name=token]").fill(token)
        with page.expect_navigation():
            page.locator("form:has(input[name=token]) [type=submit]").first.click()
        return page

    def screenshot(self, page: Page, name: str, *, full_page: bool = True, down_to: str | None = None) -> Path:
        """``<tmp_path>/screenshots/<name>.png``: the whole page, the viewport
        (``full_page=False``), or the page down to the bottom of ``down_to`` (a selector)."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        if down_to is not None:
            box = page.locator(down_to).first.bounding_box()
            assert box is not None, f"{down_to} is not shown"
            width = page.evaluate("document.documentElement.scrollWidth")
            page.screenshot(path=str(path), full_page=True,
                            clip={"x": 0, "y": 0, "width": width, "height": box["y"] + box["height"] + 8})
        else:
            page.screenshot(path=str(path), full_page=full_page)
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()


@pytest.fixture
def dashboards(browser, tmp_path) -> Iterator[Any]:
    """``dashboards(base_url)`` -> a :class:`Dashboard` (a fresh browser context);
    every one is closed after the test, and its watch checked."""
    made: list[Dashboard] = []

    def make(base: str, *, javascript: bool = True) -> Dashboard:
        d = Dashboard(browser, base, tmp_path / "screenshots", javascript=javascript)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
    for d in made:
        d.watch.check()


@pytest.fixture
def dashboard_png(request) -> Path | None:
    """Where the README's screenshot goes, if this run was asked to write it."""
    value = request.config.getoption("--dashboard-png", default=None)
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


# -- the cluster (as tests/e2e/test_cli_flow.py runs it) -------------------------------------------
@pytest.fixture
def procs(tmp_path) -> Iterator[Processes]:
    owner = Processes(tmp_path)
    yield owner
    owner.close()
    print(owner.logs())  # pytest shows it only when the test failed


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    make_repo(d)
    return d


@pytest.fixture
def scripts(tmp_path) -> Path:
    s = tmp_path / "scripts"
    for n in range(1, 4):
        write_script(s, n, FIX)
    return s


def api_tokens(data_dir: Path) -> dict[str, str]:
    """``ccc secure init --json`` before the cluster starts: the API's read and write
    tokens (shown once; the API finds their hashes in the data dir)."""
    out = json.loads(ccc(data_dir, "secure", "init", "--json", check=True, timeout=60).stdout)
    tokens = out["api_tokens"]
    assert set(tokens) == {"read", "write"}, out
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_get(url: str, token: str | None = None) -> tuple[int, Any]:
    """GET JSON from the status API (with a bearer token if given)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None
