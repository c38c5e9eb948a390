"""Who may call the status API (and its ``/metrics``): bearer tokens with scopes, a Host
allow-list, and a per-client rate limit, in front of every route.

Tokens. Two scopes: ``read`` (every GET, ``/metrics`` included) and ``write`` (the
actions a dashboard will need; a write token can read too). A token is
``secrets.token_urlsafe(32)`` (256 random bits); only its SHA-256 is stored, in
``api-tokens.json`` (0600, in a 0700 dir), so reading the file does not let anyone in.
A salted slow hash buys nothing for 256 random bits: there is no dictionary to try.

    tokens = create_api_tokens(data_dir / "secure")   # {"read": ..., "write": ...}, shown once
    verifier = load_api_tokens(data_dir / "secure" / "api-tokens.json")

Deployments can instead pass tokens in ``CCC_API_TOKEN`` (read) and
``CCC_API_WRITE_TOKEN`` (read + write), read by :mod:`infra.adapters.nats.settings`;
both kinds are accepted together (:meth:`ApiAccess.from_settings`).

When a token is needed. Always when the API binds beyond loopback (anything but
127.0.0.0/8, ::1, ``localhost``), and whenever ``require_token`` says so; then a
server without any token configured refuses to start (:meth:`ApiAccess.check`). On
loopback without ``require_token``, a request without a token may read (so the CLI,
the demo and the tests need nothing), but a token that is presented must be valid,
and ``write`` always needs a write token: a process the coder runs on this host is
not trusted with actions.

Answers, all in the API's JSON error shape: 401 with ``WWW-Authenticate: Bearer``
(no token where one is needed, or a wrong one), 403 (a valid token without the
route's scope, or a ``Host`` header not on the allow-list), 429 with ``Retry-After``.

``/health`` stays open (no token, any Host): it is what a load balancer probes, and it
tells only liveness and log positions. It is rate limited like everything else.

Where each check lives: :class:`ApiGate`, an ASGI middleware around the whole app
(before routing, so paths with no route are covered too), rate-limits, checks the
Host and authenticates, and leaves a :class:`Principal` in ``scope["auth"]``;
:func:`scope_guard`, a Litestar guard on every route, compares the principal's scopes
with the route's: ``opt={"scope": "write"}`` on a handler, else ``read`` for GET/HEAD
and ``write`` for any other method (a new POST is never readable-by-default). Route
handlers outside the app factory can declare it with ``guards=[require_scope("write")]``.

Signing in from a browser. A browser cannot send the bearer header when it follows a
link or submits a form, so the dashboard's ``/ui/login`` takes a token once (validated
here, against the same tokens) and sets the ``ccc_session`` cookie, which the gate
accepts like the header: ``<session id>.<the token, base64url>``, ``HttpOnly`` (no script
reads it), ``SameSite=Strict`` (no other site's page sends it, not even through a link),
``Secure`` when served over TLS, ``Path=/``, for :data:`SESSION_MAX_AGE`. The cookie holds
the token itself rather than a server-side session: the API keeps no state a restart
would lose, and rotating the tokens signs every browser out, as it does every script.
A header wins over the cookie; a cookie whose token is no longer valid counts as no
cookie (so a stale sign-in never locks a browser out of what it may read anonymously,
nor out of ``/ui/logout``). Each credential has a CSRF token derived from it
(:func:`csrf_token_for`: an HMAC keyed by the token, of the session id), which the gate
puts on the :class:`Principal`; the dashboard's forms carry it and its actions compare
it (:mod:`infra.adapters.http.dashboard.csrf`). Where a token is required, the sign-in
paths and the static files stay reachable without one (:data:`SIGN_IN_PATHS`,
:data:`PUBLIC_PREFIXES`; routes there declare ``opt={"scope": "public"}``), and a
browser asking for a page without one is sent to ``/ui/login`` (303) rather than
shown the JSON 401.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import structlog
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from events.errors import ConfigError

from infra.adapters.http.errors import send_json_error
from infra.adapters.http.ratelimit import RateLimit, TokenBuckets, client_key, send_too_many

log = structlog.get_logger("ccc.api.auth")

READ, WRITE = "read", "write"
SCOPES = (READ, WRITE)
PUBLIC = "public"  # a route's declared scope: anyone the gate let through (signing in)
GRANTS: dict[str, tuple[str, ...]] = {READ: (READ,), WRITE: (READ, WRITE)}  # a write token reads too
API_TOKENS_FILE = "api-tokens.json"
API_TOKENS_DIR = "secure"  # under the data dir, with the rest of what `ccc secure init` writes
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/health"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
REALM = "ccc"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# signing in from a browser (the dashboard)
SESSION_COOKIE = "ccc_session"
SESSION_MAX_AGE = 12 * 3600  # seconds; then the browser asks for the token again
UI_PREFIX = "/ui/"  # the dashboard's own routes: sign-in, actions, live stream
LOGIN_PATH = "/ui/login"
SIGN_IN_PATHS = frozenset({LOGIN_PATH, "/ui/logout"})  # reachable without a token (Host still checked)
PUBLIC_PREFIXES = ("/static/",)  # the dashboard's CSS and scripts: shipped in the package, no secret
MAX_TOKEN_CHARS = 1024  # a presented token longer than this is no token of ours
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


# -- tokens ---------------------------------------------------------------------------------
class ApiToken(msgspec.Struct, frozen=True, kw_only=True):
    """One token as stored: its SHA-256 (hex) and what it may do. ``id`` names it in
    logs and rate-limit keys (a prefix of the hash: it tells nothing of the token)."""

    id: str
    scopes: tuple[str, ...]
    sha256: str
    created_at: datetime | None = None


class TokenFile(msgspec.Struct, kw_only=True):
    version: int = 1
    tokens: list[ApiToken] = []


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def stored_token(token: str, scope: str, *, created_at: datetime | None = None) -> ApiToken:
    digest = hash_token(token)
    return ApiToken(id=digest[:12], scopes=GRANTS[scope], sha256=digest, created_at=created_at)


def new_session_cookie(token: str) -> str:
    """The ``ccc_session`` cookie's value for a sign-in with ``token``: a fresh session
    id (each sign-in gets its own CSRF token) and the token, base64url (cookie-safe
    whatever characters a deployment's token has)."""
    encoded = base64.urlsafe_b64encode(token.encode()).rstrip(b"=").decode()
    return f"{secrets.token_urlsafe(16)}.{encoded}"


def parse_session_cookie(value: str) -> tuple[str, str] | None:
    """``(session id, token)`` from a ``ccc_session`` value; None if it is malformed."""
    session, dot, encoded = value.strip().strip('"').partition(".")
    if not dot or not _SESSION_ID.match(session) or not encoded or len(encoded) > 2 * MAX_TOKEN_CHARS:
        return None
    try:
        token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, ValueError):
        return None
    return (session, token) if token else None


def csrf_token_for(token: str, session: str | None) -> str:
    """The CSRF token of a credential: HMAC-SHA256 keyed by the token, of the sign-in's
    session id (``None``: a bearer header). Unguessable without the token, the same for
    every page of one sign-in (so several tabs work), different for the next sign-in,
    and it survives an API restart (nothing is kept on the server)."""
    mac = hmac.new(token.encode(), b"ccc-dashboard-csrf\x00" + (session or "").encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


class ApiTokens:
    """The tokens the API accepts (their hashes), and :meth:`verify`."""

    def __init__(self, tokens: Iterable[ApiToken] = ()) -> None:
        self.tokens = tuple(tokens)
        self._digests = [(bytes.fromhex(t.sha256), t) for t in self.tokens]

    @classmethod
    def from_plaintext(cls, *, read: str | None = None, write: str | None = None) -> ApiTokens:
        """Tokens given in full (the environment): hashed here, like the file's."""
        return cls(stored_token(tok, scope) for scope, tok in ((READ, read), (WRITE, write)) if tok)

    def verify(self, presented: str) -> ApiToken | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, token in self._digests:  # every one, in constant time: no early exit
            if hmac.compare_digest(stored, digest):
                found = token
        return found

    def __or__(self, other: ApiTokens) -> ApiTokens:
        return ApiTokens((*self.tokens, *other.tokens))

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


def api_tokens_path(data_dir: str | Path) -> Path:
    """Where the tokens file of ``data_dir`` is: ``<data_dir>/secure/api-tokens.json``."""
    return Path(data_dir) / API_TOKENS_DIR / API_TOKENS_FILE


def create_api_tokens(directory: str | Path, *, overwrite: bool = False) -> dict[str, str]:
    """Generate one token per scope, store their hashes in ``<directory>/api-tokens.json``
    (0600; ``directory`` is created or tightened to 0700) and return the tokens:
    ``{"read": ..., "write": ...}``. This is the only time they exist in plaintext.

    An existing file is kept (``ConfigError``): its tokens may be deployed. Rotate with
    ``overwrite=True``, which invalidates the old ones at the API's next start."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(directory.stat().st_mode) & 0o077:
        directory.chmod(0o700)  # a group- or world-readable dir would let others swap the file
    path = directory / API_TOKENS_FILE
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: its tokens stay valid (pass overwrite=True to rotate them)")
    now = datetime.now(UTC).replace(microsecond=0)
    plain = {scope: secrets.token_urlsafe(32) for scope in SCOPES}
    content = msgspec.json.format(msgspec.json.encode(TokenFile(
        tokens=[stored_token(tok, scope, created_at=now) for scope, tok in plain.items()])))
    tmp = path.with_name(f".{API_TOKENS_FILE}.{os.getpid()}.tmp")
    # created 0600 (never readable by others, not even for a moment), then renamed over
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return plain


def load_api_tokens(path: str | Path) -> ApiTokens:
    """The tokens stored in ``path`` (as :func:`create_api_tokens` writes it);
    ``ConfigError`` naming the file if it is missing or malformed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"API tokens file {path} does not exist (`ccc secure init` creates it)") from None
    except OSError as e:
        raise ConfigError(f"API tokens file {path}: {e.strerror or e}") from None
    try:
        content = msgspec.json.decode(data, type=TokenFile)
    except msgspec.DecodeError as e:
        raise ConfigError(f"API tokens file {path} is malformed: {e}") from None
    for token in content.tokens:
        unknown = set(token.scopes).difference(SCOPES)
        if unknown or not token.scopes:
            raise ConfigError(f"API tokens file {path}: token {token.id} has scopes {list(token.scopes)} "
                              f"(use {', '.join(SCOPES)})")
        if not _HEX64.match(token.sha256):
            raise ConfigError(f"API tokens file {path}: token {token.id} has no SHA-256 hex digest")
    return ApiTokens(content.tokens)


# -- hosts --------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Is ``host`` (a bind address) reachable only from this machine?"""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def host_name(header: str) -> str | None:
    """The name in a ``Host`` header, lowercased, without the port or brackets:
    ``Example.com:8080`` -> ``example.com``, ``[::1]:8080`` -> ``::1``; None if malformed."""
    h = header.strip().lower()
    if h.startswith("["):
        name, close, rest = h[1:].partition("]")
        if not close or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = h.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.rstrip(".")  # "localhost." is the same name
    return name or None


class HostAllowList:
    """The ``Host`` names the API answers to: a browser tricked by DNS rebinding sends
    the attacker's name, so answering only to known names keeps a page on another site
    from reading the API through the user's browser. Entries are names or addresses,
    ``*.example.com`` for subdomains, ``*`` for any."""

    def __init__(self, names: Iterable[str]) -> None:
        normalised = {n.strip().strip("[]").lower().rstrip(".") for n in names if n.strip()}
        self.any = "*" in normalised
        self.suffixes = tuple(n[1:] for n in normalised if n.startswith("*."))  # ".example.com"
        self.names = frozenset(n for n in normalised if not n.startswith("*"))

    @classmethod
    def for_bind(cls, host: str, extra: Iterable[str] = ()) -> HostAllowList:
        """localhost, 127.0.0.1, ::1, the bind address and ``extra``; on a wildcard bind
        (0.0.0.0, ::) also this machine's host name (not its FQDN: finding that is a DNS
        lookup, which can stall start-up; other names go in ``extra``)."""
        names = [*LOCAL_HOSTS, *extra]
        if host.strip() in WILDCARD_HOSTS:
            names.append(socket.gethostname())
        else:
            names.append(host)
        return cls(names)

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        name = host_name(header) if header else None
        if name is None:
            return False
        return name in self.names or bool(self.suffixes) and name.endswith(self.suffixes)


# -- who is asking ------------------------------------------------------------------------
class Principal(msgspec.Struct, frozen=True):
    """What :class:`ApiGate` leaves in ``scope["auth"]``: the token's id and scopes, or
    ``token_id=None`` for a request without a token (where one is not required).
    ``session``: the sign-in's id when the token came in the ``ccc_session`` cookie
    (None for a bearer header); ``csrf``: the credential's CSRF token
    (:func:`csrf_token_for`; empty without a token)."""

    token_id: str | None
    scopes: frozenset[str]
    session: str | None = None
    csrf: str = ""

    @property
    def anonymous(self) -> bool:
        return self.token_id is None


ANONYMOUS = Principal(None, frozenset({READ}))


def _challenge(error: str | None = None, scope: str | None = None) -> dict[str, str]:
    params = [f'realm="{REALM}"']
    if error:
        params.append(f'error="{error}"')
    if scope:
        params.append(f'scope="{scope}"')
    return {"WWW-Authenticate": "Bearer " + ", ".join(params)}


def needed_scope(handler: BaseRouteHandler, method: str) -> str:
    declared = (handler.opt or {}).get("scope")
    return declared if declared else READ if method.upper() in SAFE_METHODS else WRITE


def check_scope(connection: ASGIConnection, needed: str) -> None:
    principal = connection.scope.get("auth")
    if not isinstance(principal, Principal):  # the app is not behind ApiGate: fail closed
        raise PermissionDeniedException(detail="no authentication in front of this route")
    if needed == PUBLIC or needed in principal.scopes:
        return
    if principal.anonymous:
        raise NotAuthorizedException(detail=f"this needs a bearer token with the {needed} scope",
                                     headers=_challenge(scope=needed))
    raise PermissionDeniedException(detail=f"token {principal.token_id} lacks the {needed} scope",
                                    headers=_challenge("insufficient_scope", needed))


def scope_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """App-level Litestar guard: the route's declared scope (``opt={"scope": ...}``), else
    read for GET/HEAD/OPTIONS and write for anything else."""
    check_scope(connection, needed_scope(handler, connection.scope.get("method", "GET")))


def require_scope(scope: str):
    """A guard for one route handler: ``@post(..., guards=[require_scope("write")])``."""
    if scope not in (*SCOPES, PUBLIC):
        raise ValueError(f"unknown scope {scope!r} (use {', '.join((*SCOPES, PUBLIC))})")

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        check_scope(connection, scope)

    return guard


# -- the policy and the gate -----------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ApiAccess:
    """How the status API is guarded. ``tokens_source``: where tokens were looked for,
    named when a required token is missing."""

    tokens: ApiTokens = field(default_factory=ApiTokens)
    require_token: bool = False
    allowed_hosts: tuple[str, ...] = ()
    rate_limit: RateLimit = field(default_factory=RateLimit)
    tokens_source: str = "CCC_API_TOKEN"

    @classmethod
    def from_settings(cls, settings: Any) -> ApiAccess:
        """Tokens from the settings' tokens file (if it exists; an explicitly configured
        one must) and from ``CCC_API_TOKEN`` / ``CCC_API_WRITE_TOKEN``; the rest from
        the settings as they are."""
        path = settings.api_tokens_file or api_tokens_path(settings.data_dir)
        tokens = ApiTokens()
        if settings.api_tokens_file is not None or path.is_file():
            tokens = load_api_tokens(path)
        tokens |= ApiTokens.from_plaintext(read=settings.api_token, write=settings.api_write_token)
        return cls(tokens=tokens, require_token=settings.api_require_token,
                   allowed_hosts=tuple(settings.api_allowed_hosts),
                   rate_limit=RateLimit(settings.api_rate_limit, settings.api_rate_burst),
                   tokens_source=f"{path} or CCC_API_TOKEN")

    def verify(self, token: str) -> ApiToken | None:
        """The stored token ``token`` is (None: none of ours), in constant time; what the
        gate checks a bearer token with, and the dashboard a sign-in."""
        return self.tokens.verify(token) if token and len(token) <= MAX_TOKEN_CHARS else None

    def token_required(self, host: str) -> bool:
        return self.require_token or not is_loopback(host)

    def check(self, host: str) -> None:
        """Refuse (``ConfigError``, one line) to serve on ``host`` if a token is
        required there and none is configured."""
        if self.token_required(host) and not self.tokens:
            why = "--require-token is set" if self.require_token else f"it binds {host}, beyond localhost"
            raise ConfigError(f"the status API needs a token ({why}) and none is configured in "
                              f"{self.tokens_source}: run `ccc secure init`, or set CCC_API_TOKEN")


class ApiGate:
    """ASGI middleware around the whole status API. Per request, in this order:

    1. identify: a valid bearer token names the client, else its address;
    2. rate limit per client (429 + ``Retry-After``), before any other work;
    3. ``Host`` on the allow-list, else 403 (not for ``/health``);
    4. a presented token must be valid, and one is needed where required, else 401
       (not for ``/health``, the sign-in paths and the static files; a browser asking
       for a page is sent to ``/ui/login`` instead). The token comes in the
       ``Authorization`` header or, from a signed-in browser, the ``ccc_session``
       cookie (a cookie whose token is not valid counts as none; for a method other
       than GET/HEAD/OPTIONS only under ``/ui/``, where every form is CSRF-checked);
    then the app runs with ``scope["auth"]`` set, and :func:`scope_guard` checks the
    route's scope."""

    def __init__(self, app: Any, access: ApiAccess, host: str, *,
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        access.check(host)
        self.app = app
        self.access = access
        self.required = access.token_required(host)
        self.hosts = HostAllowList.for_bind(host, access.allowed_hosts)
        self.buckets = TokenBuckets(access.rate_limit)
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind == "websocket":  # the API has none; refuse rather than let one skip the checks
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path = scope.get("path", "")
        # a signed-in browser's cookie: for reading anywhere, for acting only under /ui/,
        # whose every POST checks the form's CSRF token (a write route added elsewhere
        # later cannot be driven by a cookie, whatever it checks)
        cookies = headers.get("cookie") if scope.get("method") in SAFE_METHODS or path.startswith(UI_PREFIX) \
            else None
        principal, problem = self._authenticate(headers.get("authorization"), cookies)
        wait = self.buckets.take(f"token:{principal.token_id}" if principal and principal.token_id
                                 else client_key(scope))
        if wait > 0:
            log.debug("api.rate_limited", client=client_key(scope), path=path)
            await send_too_many(send, wait)
            return
        if path not in self.open_paths:
            if not self.hosts.allows(headers.get("host")):
                shown = (headers.get("host") or "")[:100]  # the caller's text: bounded
                log.debug("api.host_refused", host=shown, client=client_key(scope))
                await send_json_error(send, 403, f"Host {shown!r} is not allowed: add it with "
                                                 "--allowed-host (CCC_API_ALLOWED_HOSTS)")
                return
            if problem is not None:
                log.info("api.auth_refused", reason=problem, client=client_key(scope), path=path)
                await send_json_error(send, 401, problem, headers=_challenge(
                    "invalid_token" if problem.startswith("invalid") else "invalid_request"))
                return
            if principal is None and self.required and not _public(path):
                if _wants_page(scope, headers):  # a browser following a link: sign in first
                    await _send_redirect(send, f"{LOGIN_PATH}?next={quote(_path_and_query(scope), safe='')}")
                    return
                await send_json_error(send, 401, "a bearer token is required (Authorization: Bearer <token>)",
                                      headers=_challenge())
                return
        scope["auth"] = principal or ANONYMOUS
        await self.app(scope, receive, send)

    def _authenticate(self, header: str | None, cookies: str | None) -> tuple[Principal | None, str | None]:
        """(principal, None) for a valid token; (None, None) without one; (None, why) for
        a malformed header or a token nobody issued. The header first; else the first
        ``ccc_session`` cookie whose token is valid (one planted beside it by a sibling
        domain cannot push the real one out)."""
        if header is not None:
            scheme, _, credential = header.strip().partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential:
                return None, "malformed Authorization header (expected: Bearer <token>)"
            token = self.access.verify(credential)
            if token is None:
                return None, "invalid bearer token"
            return Principal(token.id, frozenset(token.scopes), csrf=csrf_token_for(credential, None)), None
        for value in cookie_values(cookies, SESSION_COOKIE):
            parsed = parse_session_cookie(value)
            if parsed is None:
                continue
            session, credential = parsed
            token = self.access.verify(credential)
            if token is not None:
                return Principal(token.id, frozenset(token.scopes), session=session,
                                 csrf=csrf_token_for(credential, session)), None
            log.debug("api.stale_session_cookie")  # rotated tokens: as if signed out
        return None, None


def cookie_values(header: str | None, name: str) -> list[str]:
    """Every value of cookie ``name`` in a ``Cookie`` header, in order (a browser may
    send several of one name: different paths or domains)."""
    values = []
    for part in (header or "").split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            values.append(value.strip())
    return values


def _public(path: str) -> bool:
    return path in SIGN_IN_PATHS or path.startswith(PUBLIC_PREFIXES)


def _wants_page(scope: dict, headers: dict[str, str]) -> bool:
    """A browser navigating to a page: a GET that accepts HTML, not the JSON API."""
    path = scope.get("path", "")
    return (scope.get("method") == "GET" and "text/html" in headers.get("accept", "")
            and not path.startswith(("/api/", "/metrics", "/schema")))


def _path_and_query(scope: dict) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    return scope.get("path", "/") + (f"?{query}" if query else "")


async def _send_redirect(send: Any, location: str) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0"),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": b""})


_READ_HEADERS = (b"host", b"authorization", b"accept")


def _headers(scope: dict) -> dict[str, str]:
    """The request's headers we read, decoded (ASGI gives latin-1 bytes, names lowercased).
    Cookies may come in several headers (HTTP/2 splits them): joined as one."""
    found: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            cookies.append(value.decode("latin-1"))
        elif name in _READ_HEADERS and name.decode() not in found:
            found[name.decode()] = value.decode("latin-1")
    if cookies:
        found["cookie"] = "; ".join(cookies)
    return found


__all__ = ["ANONYMOUS", "API_TOKENS_DIR", "API_TOKENS_FILE", "GRANTS", "LOGIN_PATH", "MAX_TOKEN_CHARS",
           "OPEN_PATHS", "PUBLIC", "PUBLIC_PREFIXES", "READ", "SCOPES", "SESSION_COOKIE", "SESSION_MAX_AGE",
           "SIGN_IN_PATHS", "UI_PREFIX", "WRITE", "ApiAccess", "ApiGate", "ApiToken", "ApiTokens",
           "HostAllowList", "Principal", "TokenFile", "api_tokens_path", "check_scope", "cookie_values",
           "create_api_tokens", "csrf_token_for", "hash_token", "host_name", "is_loopback", "load_api_tokens",
           "needed_scope", "new_session_cookie", "parse_session_cookie", "require_scope", "scope_guard",
           "stored_token"]
