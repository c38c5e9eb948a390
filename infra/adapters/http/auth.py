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
"""

from __future__ import annotations

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
GRANTS: dict[str, tuple[str, ...]] = {READ: (READ,), WRITE: (READ, WRITE)}  # a write token reads too
API_TOKENS_FILE = "api-tokens.json"
API_TOKENS_DIR = "secure"  # under the data dir, with the rest of what `ccc secure init` writes
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/health"})
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
REALM = "ccc"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
    ``token_id=None`` for a request without a token (where one is not required)."""

    token_id: str | None
    scopes: frozenset[str]

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
    if needed in principal.scopes:
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
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (use {', '.join(SCOPES)})")

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
       (not for ``/health``);
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
        principal, problem = self._authenticate(headers.get("authorization"))
        wait = self.buckets.take(f"token:{principal.token_id}" if principal and principal.token_id
                                 else client_key(scope))
        path = scope.get("path", "")
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
            if principal is None and self.required:
                await send_json_error(send, 401, "a bearer token is required (Authorization: Bearer <token>)",
                                      headers=_challenge())
                return
        scope["auth"] = principal or ANONYMOUS
        await self.app(scope, receive, send)

    def _authenticate(self, header: str | None) -> tuple[Principal | None, str | None]:
        """(principal, None) for a valid token; (None, None) without one; (None, why) for
        a malformed header or a token nobody issued."""
        if header is None:
            return None, None
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return None, "malformed Authorization header (expected: Bearer <token>)"
        token = self.access.tokens.verify(credential)
        if token is None:
            return None, "invalid bearer token"
        return Principal(token.id, frozenset(token.scopes)), None


def _headers(scope: dict) -> dict[str, str]:
    """The request's headers we read, decoded (ASGI gives latin-1 bytes, names lowercased)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name in (b"host", b"authorization") and name.decode() not in found:
            found[name.decode()] = value.decode("latin-1")
    return found


__all__ = ["ANONYMOUS", "API_TOKENS_DIR", "API_TOKENS_FILE", "GRANTS", "OPEN_PATHS",
           "READ", "SCOPES", "WRITE", "ApiAccess", "ApiGate", "ApiToken", "ApiTokens", "HostAllowList",
           "Principal", "TokenFile", "api_tokens_path", "check_scope", "create_api_tokens", "hash_token",
           "host_name", "is_loopback", "load_api_tokens", "needed_scope", "require_scope", "scope_guard",
           "stored_token"]
