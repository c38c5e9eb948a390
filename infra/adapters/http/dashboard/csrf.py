"""The dashboard's browser session: CSRF tokens, the same-origin check, flash messages
and the attributes of every cookie the dashboard sets.

CSRF. Three layers, each enough against a page on another site that submits a form to
the dashboard with the user's cookies:

1. the session cookie is ``SameSite=Strict``: the browser does not send it with a
   request another site started (so such a request is anonymous, and actions need the
   write token);
2. every POST's ``Origin`` (or, without one, its ``Referer``) must be this server's own
   origin: the request's scheme and its ``Host`` (:func:`check_same_origin`);
3. every POST's form carries the session's CSRF token in its ``csrf`` field, compared in
   constant time with the one the gate derived from the credential the request came
   with (:func:`check_csrf`; :func:`infra.adapters.http.auth.csrf_token_for`: an HMAC
   keyed by the token, of the sign-in's session id). An attacker who cannot read the
   dashboard's pages cannot know it; a cookie planted by a sibling domain does not
   carry it.

Templates render the field with ``{{ csrf_field() }}``: the page handlers bind
:func:`csrf_field` to the request. The sign-in form has no session yet: its token is
a random nonce in the ``ccc_login`` cookie, repeated in the form (double submit).

Flash messages (the outcome of an action, shown once on the page the action redirects
to) ride in the ``ccc_flash`` cookie, signed with a key of this process (a flash
cannot be planted; one set before a restart is dropped, which costs nothing). A page
handler reads it with :func:`read_flash` and clears it with :func:`clear_flash` on
the response that shows it.

Every cookie here is ``HttpOnly``, ``SameSite=Strict``, ``Path=/`` (the login nonce:
``/ui/login``) and ``Secure`` when the request came over TLS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import unicodedata
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

import msgspec
from litestar.exceptions import PermissionDeniedException
from markupsafe import Markup

from infra.adapters.http.auth import LOGIN_PATH, Principal

# every dashboard response's headers: nothing but this server's own files (no inline script
# or style, no CDN), no framing (a framed page could be clicked through: the actions' forms
# are buttons), never cached (a page is the log at one position, and may hold a CSRF token)
CSP = ("default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
       "object-src 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # our own POSTs still carry a Referer (the origin check)
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cache-Control": "no-store",
}


CSRF_FIELD = "csrf"
LOGIN_COOKIE = "ccc_login"  # the sign-in form's double-submit nonce
LOGIN_COOKIE_MAX_AGE = 3600
FLASH_COOKIE = "ccc_flash"
FLASH_MAX_AGE = 120  # seconds: long enough for the redirect, short enough to not linger
MAX_FLASH_CHARS = 600
_FLASH_KEY = secrets.token_bytes(32)  # this process's; a restart drops unread flashes
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_NONCE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")

FlashKind = Literal["ok", "error"]


# -- CSRF ---------------------------------------------------------------------------------------
def csrf_token(request: Any) -> str:
    """The CSRF token of the request's credential ("" without one: an anonymous page's
    forms cannot act, and say so when submitted)."""
    principal = request.scope.get("auth")
    return principal.csrf if isinstance(principal, Principal) else ""


def csrf_field(request: Any) -> Markup:
    """The hidden ``<input name="csrf">`` a form of ``request``'s page carries."""
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, csrf_token(request))


def same_token(expected: str, presented: str | None) -> bool:
    """Constant-time comparison; an empty token never matches."""
    return bool(expected) and bool(presented) and hmac.compare_digest(
        expected.encode(), (presented or "").encode())


def check_csrf(request: Any, presented: str | None) -> None:
    """403 unless ``presented`` (the form's ``csrf`` field) is the session's token."""
    if not same_token(csrf_token(request), presented):
        raise PermissionDeniedException(
            detail="the form's CSRF token is missing or does not match your session: "
                   "reload the page and submit it again")


def _authority(scheme: str, netloc: str) -> str:
    """``host[:port]``, lowercased, without the scheme's default port (``[::1]:8080``
    keeps its brackets)."""
    host, port = netloc.strip().lower(), ""
    head, colon, tail = host.rpartition(":")
    if colon and tail.isdigit() and (head.endswith("]") or "[" not in head):
        host, port = head, tail
    host = host.rstrip(".")
    return host if not port or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"


def request_origin(request: Any) -> str:
    """This server's origin as the request addressed it: ``scheme://host[:port]``."""
    scheme = request.scope.get("scheme", "http")
    return f"{scheme}://{_authority(scheme, request.headers.get('host', ''))}"


def check_same_origin(request: Any) -> None:
    """403 unless the POST names this server as its origin: the ``Origin`` header, or
    the ``Referer`` where a browser sends no ``Origin``. Neither (or ``Origin: null``,
    an opaque origin such as a sandboxed frame's) is refused: every browser sends one of
    them with a form's POST."""
    origin = (request.headers.get("origin") or "").strip()
    if origin.lower() == "null":
        raise PermissionDeniedException(detail="cross-origin form refused: its Origin is opaque (null)")
    if origin:
        claimed, what = origin, "Origin"
    elif referer := (request.headers.get("referer") or "").strip():
        claimed, what = referer, "Referer"
    else:
        raise PermissionDeniedException(detail="a form must be posted from the dashboard's own pages "
                                               "(no Origin or Referer header)")
    try:
        parts = urlsplit(claimed)
    except ValueError:  # e.g. an unbalanced "[" in the netloc
        parts = None
    theirs = f"{parts.scheme.lower()}://{_authority(parts.scheme.lower(), parts.netloc)}" if parts else ""
    if not parts or not parts.netloc or theirs != request_origin(request):
        raise PermissionDeniedException(
            detail=f"cross-origin form refused: its {what} is not {request_origin(request)}"[:300])


# -- the sign-in form's nonce ---------------------------------------------------------------------
def login_nonce(request: Any) -> str:
    """The sign-in form's nonce: the browser's ``ccc_login`` cookie if it has a
    well-formed one (so two open sign-in tabs both work), else a new one that the
    response must set (:func:`set_login_cookie`)."""
    current = request.cookies.get(LOGIN_COOKIE, "")
    if _NONCE.match(current):
        return current
    return secrets.token_urlsafe(32)


def check_login_nonce(request: Any, presented: str | None) -> None:
    if not same_token(request.cookies.get(LOGIN_COOKIE, ""), presented):
        raise PermissionDeniedException(
            detail="the sign-in form expired or was not sent from this server: load it again")


# -- cookies ------------------------------------------------------------------------------------
def is_tls(request: Any) -> bool:
    return request.scope.get("scheme") == "https"


def set_cookie(response: Any, request: Any, key: str, value: str, *, max_age: int | None,
               path: str = "/") -> None:
    """One of the dashboard's cookies: HttpOnly, SameSite=Strict, Secure over TLS."""
    response.set_cookie(key=key, value=value, max_age=max_age, path=path, httponly=True,
                        samesite="strict", secure=is_tls(request))


def delete_cookie(response: Any, request: Any, key: str, *, path: str = "/") -> None:
    set_cookie(response, request, key, "", max_age=0, path=path)


def set_login_cookie(response: Any, request: Any, nonce: str) -> None:
    set_cookie(response, request, LOGIN_COOKIE, nonce, max_age=LOGIN_COOKIE_MAX_AGE, path=LOGIN_PATH)


# -- flash messages -------------------------------------------------------------------------------
class Flash(NamedTuple):
    kind: FlashKind  # "ok" or "error": the page styles them apart
    text: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _flash_mac(payload: str) -> str:
    return _b64(hmac.new(_FLASH_KEY, payload.encode(), hashlib.sha256).digest()[:16])


def printable(text: str) -> str:
    """``text`` with control and format characters (bidi overrides included) replaced by
    spaces: what a one-line message may show of a user's input."""
    return "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def set_flash(response: Any, request: Any, kind: FlashKind, text: str) -> None:
    """Show ``text`` once on the next page the browser loads."""
    payload = _b64(msgspec.json.encode([kind, printable(text)[:MAX_FLASH_CHARS]]))
    set_cookie(response, request, FLASH_COOKIE, f"{payload}.{_flash_mac(payload)}", max_age=FLASH_MAX_AGE)


def read_flash(request: Any) -> Flash | None:
    """The flash message waiting for this page, if any (and signed by this process)."""
    value = request.cookies.get(FLASH_COOKIE, "")
    payload, _, mac = value.partition(".")
    if not payload or not hmac.compare_digest(mac.encode(), _flash_mac(payload).encode()):
        return None
    try:
        kind, text = msgspec.json.decode(_unb64(payload), type=tuple[str, str])
    except (msgspec.DecodeError, binascii.Error, ValueError):
        return None
    return Flash("error" if kind == "error" else "ok", text)


def clear_flash(response: Any, request: Any) -> None:
    """Drop the flash message (on the response that showed it)."""
    delete_cookie(response, request, FLASH_COOKIE)


__all__ = ["CSRF_FIELD", "FLASH_COOKIE", "LOGIN_COOKIE", "Flash", "check_csrf", "check_login_nonce",
           "check_same_origin", "clear_flash", "csrf_field", "csrf_token", "delete_cookie", "is_tls",
           "login_nonce", "printable", "read_flash", "request_origin", "same_token", "set_cookie",
           "set_flash", "set_login_cookie"]
