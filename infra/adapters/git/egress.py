"""The way out of a sandbox that has no network: a filtering HTTP proxy outside it.

A sandboxed command runs in its own network namespace, which has a loopback interface
and nothing else. When a repository lists hosts it needs (``.ccc/sandbox.toml``:
``network = ["pypi.org", "files.pythonhosted.org"]``), the agent runs an
:class:`EgressProxy` for that command on a unix socket in a fresh directory, and the
sandbox gets that directory bound in read-only. A unix socket crosses a network
namespace; a TCP port on the host's loopback does not (and sharing the host's loopback
would also share the NATS port). Tools only speak to proxies over TCP, so a tiny
forwarder (:data:`FORWARDER`, standard library only, run by the system Python inside
the sandbox) listens on ``127.0.0.1:3128`` in the sandbox's own loopback and carries each
connection to the socket. ``HTTP(S)_PROXY`` point there.

What the proxy lets through, and why:

* ``CONNECT host:port`` (HTTPS, git over https, pip, npm): only to a listed host and
  port; the bytes after it are opaque TLS.
* Plain ``http://`` requests in absolute form: only to a listed host; the connection to
  the origin is then fixed, so a client that reuses its proxy connection for another
  host can only ever reach the first one (never a host that is not listed).
* Every name is resolved here, once, and the connection goes to the address that was
  checked (no second lookup a DNS rebinding could answer differently). Addresses that
  are not globally routable (loopback, private, link-local: the NATS port, a cloud
  metadata service) are refused unless the entry is *trusted*: named by the operator,
  not by the repository (the coder's model API on a local gateway, a test server).
* Everything else gets a ``403`` that says which host was refused and where the allow-list
  lives, and the refusal is kept for the command's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import structlog

from events.errors import ConfigError

log = structlog.get_logger("ccc.sandbox.egress")

__all__ = ["FORWARDER", "INNER_PORT", "EgressProxy", "check_host_entry", "host_allowed"]

INNER_PORT = 3128  # the forwarder's port on the sandbox's own loopback
_HEAD_LIMIT = 16 * 1024
_HEAD_TIMEOUT = 30.0
_CONNECT_TIMEOUT = 15.0
_HOST = re.compile(r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}"
                   r"[A-Za-z0-9_])?)*$")
DEFAULT_PORTS = (443, 80)  # an entry without a port: HTTPS and plain HTTP

# Runs inside the sandbox (system Python with -I -S: no environment, no site: a
# repository's PYTHON* variables cannot change it; standard library only): binds
# 127.0.0.1:PORT, forks, and the parent exits once the port is bound, so the command that
# follows can connect at once. The child carries each connection to the proxy's unix
# socket, two threads per connection (threads start in ~10 ms where asyncio takes ~50,
# and this start-up is paid by every command with an allow-list); it dies with the
# sandbox (the PID namespace ends with the command).
FORWARDER = r"""
import os, socket, sys, threading
path, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(128)
if os.fork():
    os._exit(0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(conn):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(path)
    except OSError:
        conn.close()
        return
    t = threading.Thread(target=pump, args=(conn, up), daemon=True)
    t.start()
    pump(up, conn)
    t.join()
    conn.close()
    up.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def check_host_entry(entry: str, source: str) -> str:
    """An allow-list entry: ``host``, ``host:port``, ``*.domain`` or ``*.domain:port``
    (a lower-case host name; IP literals are host names here too). Returns it normalised;
    a bad entry is a :class:`ConfigError` naming ``source``."""
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"{source}: a network entry must be a host name, got {entry!r}")
    text = entry.strip().lower()
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if "://" not in text and "/" not in text and port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{source}: {entry!r}: the port must be 1..65535")
    if "://" in text or "/" in text or not _HOST.match(host):
        raise ConfigError(f"{source}: {entry!r} is not a host name (use e.g. pypi.org, "
                          "*.githubusercontent.com or registry.npmjs.org:443, without a scheme or path)")
    return f"{host}:{port}" if port else host


def host_allowed(host: str, port: int, entries: Iterable[str]) -> str | None:
    """The entry that allows ``host:port``, or None."""
    host = host.lower().rstrip(".")
    for entry in entries:
        name, _, p = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        ports = (int(p),) if p else DEFAULT_PORTS
        if port not in ports:
            continue
        if name == host or (name.startswith("*.") and host.endswith(name[1:])):
            return entry
    return None


class EgressProxy:
    """An HTTP proxy on a unix socket that only connects to the allowed hosts.
    ``trusted``: entries (of ``allowed``) that may resolve to non-global addresses."""

    def __init__(self, allowed: Iterable[str], trusted: Iterable[str] = (), *,
                 connect_timeout: float = _CONNECT_TIMEOUT) -> None:
        self.allowed = tuple(allowed)
        self.trusted = frozenset(trusted)
        self.connect_timeout = connect_timeout
        self.refused: list[str] = []  # "host:port: why", for the command's result
        self.dir: Path | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def socket_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "proxy.sock"

    async def start(self) -> None:
        # a short path (sun_path holds 108 bytes): its own directory under the system
        # temp dir, 0700, outside every sandbox except as the one read-only bind
        self.dir = Path(tempfile.mkdtemp(prefix="ccc-egress-"))
        self._server = await asyncio.start_unix_server(self._track, path=str(self.socket_path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one client connection ------------------------------------------------------------
    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or sent garbage: nothing to report back
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT)
        if len(head) > _HEAD_LIMIT:
            return await self._deny(writer, 431, "request head too large")
        line, _, rest = head.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            return await self._deny(writer, 400, "not an HTTP proxy request")
        method, target, version = parts
        if method.upper() == "CONNECT":
            host, port = _split_host_port(target, 443)
            forward = b""
        else:
            m = re.match(r"(?i)^http://([^/?#]+)(.*)$", target)
            if not m:
                return await self._deny(writer, 400, f"{method} {target[:100]}: only CONNECT and "
                                                     "absolute http:// requests go through this proxy")
            host, port = _split_host_port(m.group(1), 80)
            path = m.group(2) or "/"
            headers = [h for h in rest.split(b"\r\n") if h and not h.lower().startswith(
                (b"connection:", b"proxy-connection:", b"keep-alive:", b"proxy-authorization:"))]
            forward = (f"{method} {path} {version}\r\n".encode("latin-1") + b"\r\n".join(headers)
                       + b"\r\nConnection: close\r\n\r\n")
        if host is None:
            return await self._deny(writer, 400, f"bad target {target[:100]!r}")
        entry = host_allowed(host, port, self.allowed)
        if entry is None:
            return await self._refuse(writer, host, port, "not in the repository's network allow-list "
                                                          "(.ccc/sandbox.toml)")
        try:
            address = await self._resolve(host, port, trusted=entry in self.trusted)
        except PermissionError as exc:
            return await self._refuse(writer, host, port, str(exc))
        except OSError as exc:
            return await self._deny(writer, 502, f"{host}: cannot resolve ({exc})")
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(address, port), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            return await self._deny(writer, 502, f"{host}:{port}: cannot connect ({exc})")
        try:
            if forward:
                up_w.write(forward)
            else:
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await asyncio.gather(_pump(reader, up_w), _pump(up_r, writer))
        finally:
            up_w.close()

    async def _resolve(self, host: str, port: int, *, trusted: bool) -> str:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        if not addresses:
            raise OSError("no address")
        if not trusted:
            for a in addresses:
                if not ipaddress.ip_address(a.split("%", 1)[0]).is_global:
                    # one private answer is enough to refuse: the client cannot choose
                    raise PermissionError(f"resolves to {a}, which is not a public address")
        return addresses[0]

    async def _refuse(self, writer: asyncio.StreamWriter, host: str, port: int, why: str) -> None:
        self.refused.append(f"{host}:{port}: {why}")
        log.info("sandbox.egress_refused", host=host, port=port, reason=why)
        await self._deny(writer, 403, f"ccc sandbox: {host}:{port} refused: {why}")

    @staticmethod
    async def _deny(writer: asyncio.StreamWriter, status: int, text: str) -> None:
        reason = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
                  502: "Bad Gateway"}[status]
        body = (text + "\n").encode("utf-8", "replace")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        with contextlib.suppress(OSError):
            await writer.drain()


def _split_host_port(text: str, default: int) -> tuple[str | None, int]:
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()):
        return None, 0
    return host.lower(), int(port) if port else default


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass
