"""Settings: one frozen struct, read from the environment and the command line.

This module is the only reader of the settings' environment variables; the CLI's
options default to ``None`` and are passed in as overrides (their help names the
variable). Precedence: command-line flag > environment variable > default. Bad values
raise :class:`ConfigError` with one line that names the setting.

==================  ==================================================
``NATS_URL``        NATS server(s), comma-separated (unset: embedded)
``NATS_CREDS``,     credentials file, TLS CA / client certificate / key
``NATS_CA``, ...
``CCC_DATA_DIR``    state dir of the embedded server
``CCC_NAMESPACE``   subject prefix and stream names
``CCC_REPLICAS``    stream replicas (1, 3 or 5)
``CCC_SYNC_INTERVAL``  JetStream fsync interval of the embedded server
``CCC_API_PORT``    status API port
``CCC_METRICS_PORT``   an agent's Prometheus port (unset: none)
``CCC_LOG_LEVEL``,  log level and format (:func:`load_log_settings`: read
``CCC_LOG_FORMAT``  before anything else, to configure logging)
==================  ==================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec
import platformdirs

from events.errors import ConfigError

DEFAULT_NAMESPACE = "ccc"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")  # auto: JSON lines unless stderr is a terminal
DEFAULT_LOG_LEVEL, DEFAULT_LOG_FORMAT = "warning", "auto"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str | None = None  # None: run/attach the embedded server of data_dir
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    data_dir: Path
    namespace: str = DEFAULT_NAMESPACE  # validated where it becomes a Namespace
    replicas: int = 1
    sync_interval: str = "always"
    request_timeout: float = 5.0
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    metrics_port: int | None = None  # an agent's /metrics; None: not served

    @property
    def embedded(self) -> bool:
        return self.nats_url is None


class LogSettings(msgspec.Struct, frozen=True, kw_only=True):
    level: str = DEFAULT_LOG_LEVEL
    format: str = DEFAULT_LOG_FORMAT


def default_data_dir() -> Path:
    return Path(platformdirs.user_state_dir("ccc", appauthor=False))


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{name}: {n} is out of range {lo}..{hi}")
    return n


def load_settings(env: Mapping[str, str] | None = None, **overrides) -> Settings:
    """Build settings from ``env`` (default: ``os.environ``) and explicit overrides
    (``None`` overrides are ignored, so CLI options can be passed straight in)."""
    env = dict(os.environ if env is None else env)
    values: dict = {
        "nats_url": env.get("NATS_URL") or None,
        "nats_creds": env.get("NATS_CREDS") or None,
        "nats_tls_ca": env.get("NATS_CA") or None,
        "nats_tls_cert": env.get("NATS_CERT") or None,
        "nats_tls_key": env.get("NATS_KEY") or None,
        "data_dir": Path(env.get("CCC_DATA_DIR") or default_data_dir()),
        "namespace": env.get("CCC_NAMESPACE") or DEFAULT_NAMESPACE,
        "sync_interval": env.get("CCC_SYNC_INTERVAL", "always"),
    }
    if "CCC_REPLICAS" in env:
        values["replicas"] = _int("CCC_REPLICAS", env["CCC_REPLICAS"], 1, 5)
    if "CCC_API_PORT" in env:
        values["api_port"] = _int("CCC_API_PORT", env["CCC_API_PORT"], 0, 65535)
    if env.get("CCC_METRICS_PORT"):
        values["metrics_port"] = _int("CCC_METRICS_PORT", env["CCC_METRICS_PORT"], 0, 65535)
    for key, value in overrides.items():
        if value is not None:
            values[key] = Path(value) if key == "data_dir" else value
    if values.get("replicas", 1) not in (1, 3, 5):
        raise ConfigError(f"replicas: {values['replicas']} (use 1, 3 or 5)")
    if values["data_dir"].is_file():
        raise ConfigError(f"CCC_DATA_DIR: {values['data_dir']} is a file, not a directory")
    for key in ("nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
        if values.get(key) and not Path(values[key]).is_file():
            raise ConfigError(f"{key}: no such file {values[key]}")
    si = values["sync_interval"]
    if si != "always" and not (si[:-1].isdigit() and si[-1] in "sm" or si.endswith("ms") and si[:-2].isdigit()):
        raise ConfigError(f"CCC_SYNC_INTERVAL: {si!r} (use 'always' or a duration like '1s')")
    url = values["nats_url"]
    if url is not None:
        for part in url.split(","):
            if not part.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ConfigError(f"NATS_URL: {part.strip()!r} is not a nats:// or tls:// URL")
    return Settings(**values)


def load_log_settings(env: Mapping[str, str] | None = None, *, level: str | None = None,
                      format: str | None = None) -> LogSettings:  # noqa: A002 - the option's name
    """The log level and format from ``env`` (default: ``os.environ``) and explicit
    overrides. Apart from :func:`load_settings`: logging is configured before any
    command runs, and a bad ``NATS_URL`` must not stop ``ccc tasks --help``."""
    env = os.environ if env is None else env
    level = (level or env.get("CCC_LOG_LEVEL") or DEFAULT_LOG_LEVEL).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"CCC_LOG_LEVEL: {level!r} (use {', '.join(LOG_LEVELS)})")
    format = format or env.get("CCC_LOG_FORMAT") or DEFAULT_LOG_FORMAT
    if format not in LOG_FORMATS:
        raise ConfigError(f"CCC_LOG_FORMAT: {format!r} (use {', '.join(LOG_FORMATS)})")
    return LogSettings(level=level, format=format)
