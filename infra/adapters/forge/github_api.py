"""The GitHub forge's request plumbing: the check of an ``owner/name`` repository
argument, and :class:`GitHubCalls`, which runs blocking PyGithub calls on a dedicated
thread pool and translates PyGithub's and requests' exceptions into the forge's errors
(:mod:`infra.adapters.forge.errors`): network trouble, 5xx and rate limits ->
:class:`ForgeUnavailable`, retryable; 401/403 -> :class:`ForgeAuthError`, 404 ->
:class:`ForgeNotFound`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests
import urllib3
from github import Github, GithubException, RateLimitExceededException

from events.errors import CccError
from events.subjects import check_repo

from infra.adapters.forge.errors import ForgeAuthError, ForgeError, ForgeNotFound, ForgeUnavailable
from infra.adapters.obs.masking import mask_secrets

T = TypeVar("T")


def check_github_repo(repo: str) -> str:
    """``owner/name``, checked by the one repository-name validator
    (:func:`events.subjects.check_repo`) and returned as checked; GitHub has no bare
    ``name``."""
    checked = check_repo(repo, "GitHub repository", error=ForgeError)
    if "/" not in checked:
        raise ForgeError(f"invalid GitHub repository {repo!r}: expected owner/name")
    return checked


class GitHubCalls:
    """Runs PyGithub calls off the event loop and turns their failures into forge
    errors. :class:`~infra.adapters.forge.github.GitHubForge` sets ``_executor``, ``_token``
    and ``_gh``; :meth:`call` lends the client to adapters built on the forge."""

    _executor: ThreadPoolExecutor
    _token: str | None
    _gh: Github

    # -- for adapters built on a forge (infra.adapters.forge.github_checks) ---------
    async def call(self, what: str, fn: Callable[[Github], T]) -> T:
        """``fn(client)`` on the forge's thread pool, with the forge's PyGithub client,
        its failures translated into forge errors (``what`` names the call in them)."""
        return await self._run(what, lambda: fn(self._gh))

    def mask(self, text: str) -> str:
        """``text`` with the forge's credentials masked (for an error message)."""
        return self._mask(text)

    # -- plumbing -------------------------------------------------------------------
    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        with self._translating(what):
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @contextlib.contextmanager
    def _translating(self, what: str) -> Iterator[None]:
        try:
            yield
        except GithubException as e:
            raise self._translate(what, e) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise ForgeUnavailable(self._mask(f"{what}: GitHub unreachable: {type(e).__name__}: {e}")) from None

    def _translate(self, what: str, e: GithubException) -> CccError:
        status, msg = e.status, error_message(e)
        if isinstance(e, RateLimitExceededException) or status == 429 or "rate limit" in msg.lower():
            return ForgeUnavailable(self._mask(f"{what}: GitHub rate limit ({status} {msg})"),
                                    retry_after=getattr(e, "wait", None) or _retry_after(e.headers))
        if status == 401:
            return ForgeAuthError(self._mask(
                f"{what}: GitHub rejected the credentials (401 {msg}); check GITHUB_TOKEN or the App settings"))
        if status == 403:
            return ForgeAuthError(self._mask(
                f"{what}: permission denied (403 {msg}); the token needs issues, pull requests and contents write"))
        if status == 404:
            return ForgeNotFound(self._mask(
                f"{what}: not found (404); it does not exist or these credentials cannot see it"))
        if status >= 500 or status == 408:
            return ForgeUnavailable(self._mask(f"{what}: GitHub failed ({status} {msg})"))
        return ForgeError(self._mask(f"{what}: GitHub refused the request ({status} {msg})"))

    def _mask(self, text: str) -> str:
        return mask_secrets(text, [self._token] if self._token else [])


def _retry_after(headers: Mapping[str, Any] | None) -> float | None:
    h = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    if h.get("retry-after", "").isdigit():
        return float(h["retry-after"])
    if h.get("x-ratelimit-reset", "").isdigit():
        return max(0.0, int(h["x-ratelimit-reset"]) - time.time()) + 1.0
    return None


def error_message(e: GithubException) -> str:
    """What GitHub said, from the error body: its ``message`` and each error's."""
    data: Any = e.data
    if isinstance(data, dict):
        parts = [str(data.get("message") or "")]
        parts += [str(x.get("message") or x.get("code") or "") if isinstance(x, dict) else str(x)
                  for x in data.get("errors") or ()]
        return "; ".join(p for p in parts if p)
    return e.message or str(data or "")
