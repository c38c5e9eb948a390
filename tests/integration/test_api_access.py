"""Who may call the status API, over real HTTP: the API served by uvicorn on a free port
over a real nats-server, called with httpx. Bearer tokens and their scopes (401/403,
``/metrics`` included, ``/health`` open), the Host allow-list (403), the per-client
rate limit (429 + ``Retry-After``), refusing to start without a token where one is
required (also through ``ccc api`` / ``ccc up``), and the webhook receiver's rate limit."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from litestar import get, post

from events.errors import ConfigError
from infra.adapters.http.auth import (
    API_TOKENS_FILE,
    ApiAccess,
    ApiTokens,
    create_api_tokens,
    load_api_tokens,
    require_scope,
)
from infra.adapters.http.ratelimit import RateLimit
from infra.adapters.http.status_server import ApiServer
from infra.adapters.http.webhook import WebhookServer
from infra.adapters.nats.provisioning import provision
from infra.shell.cli.main import cli
from tests.support.session import nats_args
from tests.support.webhooks import SECRET

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_LIMIT = RateLimit(rate=0, burst=1)


# test-only routes: what the dashboard's actions will look like
@post("/api/v1/test/actions", opt={"scope": "write"}, status_code=200, sync_to_thread=False)
def declared_action() -> dict:
    return {"done": True}


@post("/api/v1/test/undeclared", status_code=200, sync_to_thread=False)
def undeclared_action() -> dict:  # no scope declared: a POST needs write all the same
    return {"done": True}


@get("/api/v1/test/guarded", guards=[require_scope("write")], sync_to_thread=False)
def guarded_read() -> dict:  # a GET that a handler guard raises to write
    return {"secret": True}


TEST_ROUTES = [declared_action, undeclared_action, guarded_read]


@pytest.fixture(scope="module")
def secure_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("secure")


@pytest.fixture(scope="module")
def tokens(secure_dir) -> dict[str, str]:
    return create_api_tokens(secure_dir)  # as `ccc secure init` does


@pytest.fixture(scope="module")
def verifier(tokens, secure_dir) -> ApiTokens:
    return load_api_tokens(secure_dir / API_TOKENS_FILE)  # as the server does


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def serving(store, access: ApiAccess, host: str = "127.0.0.1"):
    server = ApiServer(store, host, 0, materialize=False, access=access, route_handlers=TEST_ROUTES)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            yield http
    finally:
        await server.stop()


def assert_error(r: httpx.Response, status: int, error: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == error and body["detail"], body
    return body


# -- tokens and scopes ---------------------------------------------------------------------------
async def test_required_tokens_guard_every_route_but_health(store, tokens, verifier):
    access = ApiAccess(tokens=verifier, require_token=True, rate_limit=NO_LIMIT)
    async with serving(store, access) as http:
        for path in ("/api/v1/tasks", "/api/v1/cluster", "/metrics", "/schema/openapi.json", "/no/such/path"):
            r = await http.get(path)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer realm=")
        wrong = await http.get("/api/v1/tasks", headers=bearer("x" * 43))
        assert_error(wrong, 401, "unauthorized")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = await http.get("/api/v1/tasks", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert "malformed Authorization" in assert_error(basic, 401, "unauthorized")["detail"]
        assert (await http.get("/health")).status_code == 200  # the load balancer's probe

        read = bearer(tokens["read"])
        for path in ("/api/v1/tasks", "/api/v1/agents", "/api/v1/cluster", "/schema/openapi.json"):
            assert (await http.get(path, headers=read)).status_code == 200, path
        assert_error(await http.get("/no/such/path", headers=read), 404, "not_found")
        metrics = await http.get("/metrics", headers=read)
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        # the refusals are counted (never routed, so under <unmatched>)
        assert 'claude_api_requests_total{endpoint="<unmatched>",method="GET",status="401"}' in metrics.text

        for method, path in (("POST", "/api/v1/test/actions"), ("POST", "/api/v1/test/undeclared"),
                             ("GET", "/api/v1/test/guarded")):
            r = await http.request(method, path, headers=read)
            assert "lacks the write scope" in assert_error(r, 403, "forbidden")["detail"], path
            assert 'error="insufficient_scope", scope="write"' in r.headers["www-authenticate"]
            assert_error(await http.request(method, path), 401, "unauthorized")

        write = bearer(tokens["write"])
        for method, path in (("POST", "/api/v1/test/actions"), ("POST", "/api/v1/test/undeclared"),
                             ("GET", "/api/v1/test/guarded")):
            assert (await http.request(method, path, headers=write)).status_code == 200, path
        assert (await http.get("/api/v1/tasks", headers=write)).status_code == 200  # write reads too


async def test_on_localhost_reading_needs_no_token_but_a_wrong_one_is_refused(store, tokens, verifier):
    async with serving(store, ApiAccess(tokens=verifier, rate_limit=NO_LIMIT)) as http:
        for path in ("/api/v1/tasks", "/metrics", "/health", "/schema/openapi.json"):
            assert (await http.get(path)).status_code == 200, path
        wrong = await http.get("/api/v1/tasks", headers=bearer("wrong-but-long-enough"))
        assert_error(wrong, 401, "unauthorized")
        assert_error(await http.get("/metrics", headers=bearer(tokens["read"] + "x")), 401, "unauthorized")
        # actions always need a write token, even from this host
        r = await http.post("/api/v1/test/actions")
        assert "needs a bearer token with the write scope" in assert_error(r, 401, "unauthorized")["detail"]
        assert 'scope="write"' in r.headers["www-authenticate"]
        read_only = await http.post("/api/v1/test/actions", headers=bearer(tokens["read"]))
        assert_error(read_only, 403, "forbidden")
        assert (await http.post("/api/v1/test/actions", headers=bearer(tokens["write"]))).status_code == 200
    async with serving(store, ApiAccess(rate_limit=NO_LIMIT)) as http:  # no tokens at all: reads only
        assert (await http.get("/api/v1/tasks")).status_code == 200
        assert_error(await http.post("/api/v1/test/actions"), 401, "unauthorized")


async def test_beyond_localhost_a_token_is_required_and_without_one_the_server_refuses(store, tokens,
                                                                                       verifier):
    for host, access in (("0.0.0.0", ApiAccess()), ("127.0.0.1", ApiAccess(require_token=True))):
        with pytest.raises(ConfigError, match="needs a token.*ccc secure init.*CCC_API_TOKEN"):
            ApiServer(store, host, 0, access=access)
    env_token = "e" * 32
    access = ApiAccess(tokens=verifier | ApiTokens.from_plaintext(read=env_token), rate_limit=NO_LIMIT)
    async with serving(store, access, host="0.0.0.0") as http:
        assert_error(await http.get("/api/v1/tasks"), 401, "unauthorized")
        assert (await http.get("/api/v1/tasks", headers=bearer(tokens["read"]))).status_code == 200
        assert (await http.get("/metrics", headers=bearer(env_token))).status_code == 200
        assert (await http.get("/health")).status_code == 200


# -- Host ------------------------------------------------------------------------------------------
async def test_a_host_not_on_the_allow_list_is_refused(store, tokens, verifier):
    access = ApiAccess(tokens=verifier, allowed_hosts=("api.example.com",), rate_limit=NO_LIMIT)
    async with serving(store, access) as http:
        port = http.base_url.port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            r = await http.get("/api/v1/tasks", headers={"Host": host, **bearer(tokens["read"])})
            assert "not allowed" in assert_error(r, 403, "forbidden")["detail"]
        assert_error(await http.get("/metrics", headers={"Host": "evil.example"}), 403, "forbidden")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "api.example.com", f"API.example.com:{port}"):
            assert (await http.get("/api/v1/tasks", headers={"Host": host})).status_code == 200, host
        # the probe is answered whatever name the balancer uses
        assert (await http.get("/health", headers={"Host": "10.1.2.3:8080"})).status_code == 200


# -- rate limit -----------------------------------------------------------------------------------
async def test_a_client_past_its_burst_gets_429_with_retry_after(store, tokens, verifier):
    access = ApiAccess(tokens=verifier, rate_limit=RateLimit(rate=0.2, burst=4))
    async with serving(store, access) as http:
        for _ in range(3):
            assert (await http.get("/api/v1/tasks")).status_code == 200
        invalid = await http.get("/api/v1/tasks", headers=bearer("not-a-valid-token"))
        assert_error(invalid, 401, "unauthorized")
        r = await http.get("/api/v1/tasks")  # the invalid token was counted against the address
        assert_error(r, 429, "too_many_requests")
        assert int(r.headers["retry-after"]) >= 1
        assert_error(await http.get("/health"), 429, "too_many_requests")  # open, but limited
        # an authenticated client has its own bucket: the token, not the address
        assert (await http.get("/api/v1/tasks", headers=bearer(tokens["read"]))).status_code == 200
        metrics = await http.get("/metrics", headers=bearer(tokens["read"]))
        assert 'endpoint="<unmatched>",method="GET",status="429"' in metrics.text


# -- the command line ------------------------------------------------------------------------------
def test_cli_refuses_to_serve_beyond_localhost_without_a_token(tmp_path):
    env = {"CCC_API_TOKEN": None, "CCC_API_WRITE_TOKEN": None, "CCC_API_TOKENS_FILE": None, "NATS_URL": None}
    d = str(tmp_path / "data")
    for args in (["api", "--host", "0.0.0.0", "--port", "0"], ["api", "--port", "0", "--require-token"],
                 ["up", "--api-host", "0.0.0.0", "--agents", "0"]):
        r = CliRunner().invoke(cli, ["--data-dir", d, *args], env=env)
        assert r.exit_code == 2, r.output
        # (in-process, later invocations also log that tracing is already set up)
        [error] = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert error.startswith("error: the status API needs a token") and "ccc secure init" in error
        assert "Traceback" not in r.output
    assert not (tmp_path / "data" / "nats.url").exists()  # nothing was started


class Proc:
    """A ``ccc`` subprocess whose stdout lines are on a queue; always killed."""

    def __init__(self, *args: str, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "infra.shell.cli.main", *args], cwd=REPO_ROOT,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **env})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.rstrip("\n")) for x in self.proc.stdout],
                         daemon=True).start()

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15), self.proc.stderr.read()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


async def test_ccc_api_takes_its_token_from_the_environment(nats_url, ns, store):
    token = "t" * 40
    p = Proc(*nats_args(nats_url), "--namespace", ns.prefix, "api", "--port", "0", "--require-token",
             env={"CCC_API_TOKEN": token})
    try:
        line = await asyncio.to_thread(p.lines.get, True, 30)
        assert line.startswith("status API at http://127.0.0.1:"), line
        async with httpx.AsyncClient(base_url=line.split()[3], timeout=5) as http:
            assert_error(await http.get("/api/v1/tasks"), 401, "unauthorized")
            assert (await http.get("/api/v1/tasks", headers=bearer(token))).status_code == 200
    finally:
        code, err = p.stop()
    assert code == 0 and "Traceback" not in err, err
    assert token not in err  # never logged


# -- the webhook receiver ------------------------------------------------------------------------
async def test_webhook_rate_limit_answers_before_any_signature_work(nc, ns):
    await provision(nc, ns)
    server = WebhookServer(nc, ns, "127.0.0.1", 0, secret=SECRET, rate_limit=RateLimit(rate=0.2, burst=3))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            for _ in range(3):  # unsigned: refused by the signature check while under the limit
                assert (await http.post("/webhook", content=b"{}")).status_code == 401
            r = await http.post("/webhook", content=b"{}")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"] == "too_many_requests"
            assert (await http.get("/health")).status_code == 429
    finally:
        await server.stop()
