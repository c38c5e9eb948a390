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
``CCC_API_HOST``    status API bind address (default 127.0.0.1)
``CCC_API_TOKEN``,  status API bearer tokens (read; read + write), beside
``CCC_API_WRITE_TOKEN``  the tokens file (``CCC_API_TOKENS_FILE``, default
                    ``<data dir>/secure/api-tokens.json``)
``CCC_API_REQUIRE_TOKEN``  require a token even on localhost (1/0)
``CCC_API_ALLOWED_HOSTS``  Host names the API answers to, comma-separated,
                    beside localhost and its bind address
``CCC_API_RATE_LIMIT``,  requests/s per client (0: off) and burst
``CCC_API_RATE_BURST``
``CCC_METRICS_PORT``   an agent's Prometheus port (unset: none)
``CCC_REPOS``       repositories served, ``owner/name`` or ``owner/*``,
                    comma-separated (unset: all); the intake's allow-list
``CCC_CREDS``      a credentials kit (user nkey, client certificate, CA)
``CCC_INSECURE``   1: no TLS and no users (the embedded server; a warning)
``CCC_JS_KEY``,    JetStream encryption key (or ``CCC_JS_KEY_FILE``); default
``CCC_JS_PREV_KEY``  ``<data-dir>/secure/js.key``; the previous key, to rotate
``CCC_LOG_LEVEL``,  log level and format (:func:`load_log_settings`: read
``CCC_LOG_FORMAT``  before anything else, to configure logging)
``CCC_SANDBOX``    where an agent's commands run: bwrap (default), podman,
                   docker, none (no sandbox: a warning, and on the events)
``CCC_SANDBOX_NETWORK``  what repositories may ask for: none, allow-list
                   (default: hosts through the filtering proxy), allow-full
``CCC_SANDBOX_BIN``,  the bwrap/podman/docker binary (default: on PATH);
``CCC_SANDBOX_IMAGE``  the container backends' image
``CCC_SANDBOX_LIMITS``  e.g. ``cpu=600,memory=4G,procs=512,file=1G``
``CCC_SANDBOX_READ_ONLY``  more paths commands see read-only (toolchains
                   outside /usr: ``/opt/jdk,/home/ci/.rustup``), comma-separated
``CCC_PLUGINS``    hook plugins enabled (entry point names of ``ccc.hooks``),
                   comma-separated (unset: none; installed is not enabled)
``CCC_PLUGIN_<NAME>_<KEY>``  an option of plugin NAME (upper case, ``-`` and
                   ``.`` as ``_``): kept raw here, matched to a plugin by
                   :mod:`infra.adapters.plugins` (which knows the names)
==================  ==================================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import msgspec
import platformdirs

from events.errors import ConfigError
from events.trust import REPOS_SETTING, parse_repos

from infra.adapters.git.sandbox import NETWORK_MODES, SANDBOXES, parse_limits
from infra.adapters.obs.masking import redact_url

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
    # the status API's access (infra.adapters.http.auth): tokens, Host allow-list, rate limit
    api_token: str | None = None  # read scope
    api_write_token: str | None = None  # read + write scopes
    api_tokens_file: Path | None = None  # None: <data_dir>/secure/api-tokens.json, if it exists
    api_require_token: bool = False  # a token is always required beyond localhost; this: on it too
    api_allowed_hosts: tuple[str, ...] = ()  # beside localhost and the bind address
    api_rate_limit: float = 20.0  # requests/s per client (per token once authenticated); 0: off
    api_rate_burst: int = 100
    metrics_port: int | None = None  # an agent's /metrics; None: not served
    repos: tuple[str, ...] = ()  # the intake's allow-list (events.trust); empty: every repository
    creds: str | None = None  # a credentials kit directory (`ccc secure add-agent` writes one)
    insecure: bool = False  # no TLS, no users: only with --insecure / CCC_INSECURE=1
    js_key: str | None = None  # JetStream encryption key (default: <data-dir>/secure/js.key)
    js_prev_key: str = ""  # the key being rotated away from (one start with both)
    # where an agent's commands run (infra.adapters.git.sandbox); fail closed by default
    sandbox: str = "bwrap"
    sandbox_network: str = "allow-list"  # what a repository's .ccc/sandbox.toml may ask for
    sandbox_bin: str | None = None  # the bwrap/podman/docker binary; None: found on PATH
    sandbox_image: str | None = None  # podman/docker: the image commands run in
    sandbox_limits: str = ""  # overrides of the default limits, "cpu=600,memory=4G,..."
    sandbox_read_only: tuple[str, ...] = ()  # toolchains outside the system paths, shown read-only
    # hook plugins enabled in this process (infra.adapters.plugins): by configuration only
    plugins: tuple[str, ...] = ()
    # every CCC_PLUGIN_<NAME>_<KEY> variable as (NAME_KEY, value): which part names the
    # plugin is known only to the loader, which knows the installed names
    plugin_env: tuple[tuple[str, str], ...] = ()

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


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("", "0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name}: {value!r} (use 1 or 0)")


def _secret_value(env: Mapping[str, str], name: str) -> str | None:
    """``NAME`` or the contents of the file ``NAME_FILE`` (a mounted secret)."""
    if env.get(name):
        return env[name].strip()
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {e.strerror or e}") from None
    return None


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
    values.update(_api_access_env(env))
    if env.get("CCC_METRICS_PORT"):
        values["metrics_port"] = _int("CCC_METRICS_PORT", env["CCC_METRICS_PORT"], 0, 65535)
    values["repos"] = parse_repos(env.get(REPOS_SETTING), REPOS_SETTING)
    values["creds"] = env.get("CCC_CREDS") or None
    values["insecure"] = _flag("CCC_INSECURE", env.get("CCC_INSECURE", ""))
    values["js_key"] = _secret_value(env, "CCC_JS_KEY")
    values["js_prev_key"] = _secret_value(env, "CCC_JS_PREV_KEY") or ""
    for key, var in (("sandbox", "CCC_SANDBOX"), ("sandbox_network", "CCC_SANDBOX_NETWORK"),
                     ("sandbox_bin", "CCC_SANDBOX_BIN"), ("sandbox_image", "CCC_SANDBOX_IMAGE"),
                     ("sandbox_limits", "CCC_SANDBOX_LIMITS")):
        if env.get(var):
            values[key] = env[var].strip()
    if env.get("CCC_SANDBOX_READ_ONLY"):
        values["sandbox_read_only"] = tuple(p.strip() for p in env["CCC_SANDBOX_READ_ONLY"].split(",") if p.strip())
    values["plugins"] = env.get("CCC_PLUGINS", "")
    prefix = len(PLUGIN_ENV_PREFIX)
    values["plugin_env"] = tuple(sorted((k[prefix:], v) for k, v in env.items()
                                        if k.startswith(PLUGIN_ENV_PREFIX) and len(k) > prefix))
    for key, value in overrides.items():
        if value is not None:
            values[key] = Path(value) if key == "data_dir" else value
    if isinstance(values["repos"], str):  # --repos, as typed
        values["repos"] = parse_repos(values["repos"], "--repos")
    values["plugins"] = parse_plugin_names(values["plugins"])
    if values.get("replicas", 1) not in (1, 3, 5):
        raise ConfigError(f"replicas: {values['replicas']} (use 1, 3 or 5)")
    if values["data_dir"].is_file():
        raise ConfigError(f"CCC_DATA_DIR: {values['data_dir']} is a file, not a directory")
    if values.get("creds") and not Path(values["creds"]).is_dir():
        raise ConfigError(f"CCC_CREDS: {values['creds']} is not a credentials kit directory")
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
                shown = redact_url(part.strip())  # a mistyped URL may still hold a password
                raise ConfigError(f"NATS_URL: {shown!r} is not a nats:// or tls:// URL")
    _check_api_access(values)
    _check_sandbox(values)
    return Settings(**values)


PLUGIN_ENV_PREFIX = "CCC_PLUGIN_"
_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_plugin_names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``CCC_PLUGINS`` (comma-separated) or the ``--plugin`` values: entry point names,
    in order, each once."""
    items = value.split(",") if isinstance(value, str) else [n for v in value for n in v.split(",")]
    names: list[str] = []
    for name in (n.strip() for n in items):
        if not name:
            continue
        if not _PLUGIN_NAME.match(name):
            raise ConfigError(f"CCC_PLUGINS: {name!r} is not a plugin name (letters, digits, '.', '_', '-')")
        if name not in names:
            names.append(name)
    return tuple(names)


def _check_sandbox(values: dict) -> None:
    if values.get("sandbox", "bwrap") not in SANDBOXES:
        raise ConfigError(f"CCC_SANDBOX: {values['sandbox']!r} (use {', '.join(SANDBOXES)})")
    if values.get("sandbox_network", "allow-list") not in NETWORK_MODES:
        raise ConfigError(f"CCC_SANDBOX_NETWORK: {values['sandbox_network']!r} (use {', '.join(NETWORK_MODES)})")
    parse_limits(values.get("sandbox_limits", ""))  # a bad limit fails at start, naming itself
    for path in values.get("sandbox_read_only", ()):
        if not Path(path).is_absolute() or not Path(path).exists():
            raise ConfigError(f"CCC_SANDBOX_READ_ONLY: {path!r} is not an existing absolute path")


MIN_API_TOKEN_LENGTH = 16  # generated ones are 43 characters (secrets.token_urlsafe(32))
_HOST_NAME = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?|\[?[0-9A-Fa-f:.]+\]?)$")


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected 1/0 (true/false), got {value!r}")


def _api_access_env(env: Mapping[str, str]) -> dict:
    values: dict = {}
    for key, var in (("api_host", "CCC_API_HOST"), ("api_token", "CCC_API_TOKEN"),
                     ("api_write_token", "CCC_API_WRITE_TOKEN"), ("api_tokens_file", "CCC_API_TOKENS_FILE")):
        if env.get(var):
            values[key] = env[var]
    if "CCC_API_REQUIRE_TOKEN" in env:
        values["api_require_token"] = _bool("CCC_API_REQUIRE_TOKEN", env["CCC_API_REQUIRE_TOKEN"])
    if env.get("CCC_API_ALLOWED_HOSTS"):
        values["api_allowed_hosts"] = tuple(h.strip() for h in env["CCC_API_ALLOWED_HOSTS"].split(",")
                                            if h.strip())
    if env.get("CCC_API_RATE_LIMIT"):
        try:
            values["api_rate_limit"] = float(env["CCC_API_RATE_LIMIT"])
        except ValueError:
            raise ConfigError(f"CCC_API_RATE_LIMIT: expected requests per second, "
                              f"got {env['CCC_API_RATE_LIMIT']!r}") from None
    if env.get("CCC_API_RATE_BURST"):
        values["api_rate_burst"] = _int("CCC_API_RATE_BURST", env["CCC_API_RATE_BURST"], 1, 1_000_000)
    return values


def _check_api_access(values: dict) -> None:
    """The status API's settings, after the overrides: one line naming what is wrong."""
    for key, var in (("api_token", "CCC_API_TOKEN"), ("api_write_token", "CCC_API_WRITE_TOKEN")):
        token = values.get(key)
        if token is not None and (len(token) < MIN_API_TOKEN_LENGTH or any(c.isspace() for c in token)):
            # a short token can be guessed; `ccc secure init` generates 43 random characters
            raise ConfigError(f"{var}: a token needs at least {MIN_API_TOKEN_LENGTH} characters and no spaces "
                              "(generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if values.get("api_tokens_file") is not None:
        values["api_tokens_file"] = Path(values["api_tokens_file"])
        if not values["api_tokens_file"].is_file():
            raise ConfigError(f"CCC_API_TOKENS_FILE: no such file {values['api_tokens_file']}")
    hosts = values.get("api_allowed_hosts", ())
    hosts = tuple(h.strip() for h in (hosts.split(",") if isinstance(hosts, str) else hosts) if h.strip())
    bad = [h for h in hosts if not _HOST_NAME.match(h)]
    if bad:
        raise ConfigError(f"allowed hosts: {', '.join(map(repr, bad))} (use host names or addresses, "
                          "without port or scheme: example.com, *.example.com, 10.0.0.5, [fd00::1], *)")
    values["api_allowed_hosts"] = hosts
    rate = values.get("api_rate_limit", 20.0)
    if not (isinstance(rate, int | float) and 0 <= rate < float("inf")):
        raise ConfigError(f"rate limit: {rate!r} requests/s (use a number >= 0; 0 turns it off)")
    if not 1 <= values.get("api_rate_burst", 100) <= 1_000_000:
        raise ConfigError(f"rate burst: {values['api_rate_burst']!r} (use 1..1000000)")


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
