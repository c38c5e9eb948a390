"""Settings: one frozen struct, read from the environment and the command line.

Precedence: command-line flag > environment variable > default. Bad values raise
:class:`ConfigError` with one line that names the setting.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import platformdirs

from events.errors import ConfigError


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str | None = None  # None: run/attach the embedded server of data_dir
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    data_dir: Path
    replicas: int = 1
    sync_interval: str = "always"
    request_timeout: float = 5.0
    api_host: str = "127.0.0.1"
    api_port: int = 8080

    @property
    def embedded(self) -> bool:
        return self.nats_url is None


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


def load_settings(env: dict[str, str] | None = None, **overrides) -> Settings:
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
        "sync_interval": env.get("CCC_SYNC_INTERVAL", "always"),
    }
    if "CCC_REPLICAS" in env:
        values["replicas"] = _int("CCC_REPLICAS", env["CCC_REPLICAS"], 1, 5)
    if "CCC_API_PORT" in env:
        values["api_port"] = _int("CCC_API_PORT", env["CCC_API_PORT"], 0, 65535)
    for key, value in overrides.items():
        if value is not None:
            values[key] = Path(value) if key == "data_dir" else value
    if values["replicas"] not in (1, 3, 5) if "replicas" in values else False:
        raise ConfigError(f"replicas: {values['replicas']} (use 1, 3 or 5)")
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
