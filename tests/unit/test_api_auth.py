"""The status API's access rules without a server: the tokens file (modes, no plaintext,
rotation), token verification, Host parsing and the allow-list, the token buckets, and
the settings that configure them (one clear error for each bad value). Over real HTTP:
tests/integration/test_api_access.py."""

from __future__ import annotations

import json
import stat

import pytest

from events.errors import ConfigError
from infra.adapters.http.auth import (
    API_TOKENS_FILE,
    ApiAccess,
    ApiTokens,
    HostAllowList,
    api_tokens_path,
    create_api_tokens,
    host_name,
    is_loopback,
    load_api_tokens,
)
from infra.adapters.http.ratelimit import RateLimit, TokenBuckets, retry_after
from infra.adapters.nats.settings import load_settings


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the tokens file --------------------------------------------------------------------------
def test_created_tokens_are_stored_hashed_0600_in_a_0700_dir(tmp_path):
    secure = tmp_path / "data" / "secure"
    tokens = create_api_tokens(secure)
    assert set(tokens) == {"read", "write"} and tokens["read"] != tokens["write"]
    assert all(len(t) >= 43 for t in tokens.values())  # token_urlsafe(32): 256 random bits
    path = secure / API_TOKENS_FILE
    assert path == api_tokens_path(tmp_path / "data")
    assert mode(secure) == 0o700 and mode(path) == 0o600
    text = path.read_text()
    for token in tokens.values():
        assert token not in text  # only hashes are kept
    stored = json.loads(text)["tokens"]
    assert [t["scopes"] for t in stored] == [["read"], ["read", "write"]]
    assert not list(secure.glob(".*.tmp"))  # the temporary file was renamed, not left behind

    verifier = load_api_tokens(path)
    read, write = verifier.verify(tokens["read"]), verifier.verify(tokens["write"])
    assert read is not None and read.scopes == ("read",)
    assert write is not None and write.scopes == ("read", "write")
    assert verifier.verify("not-a-token") is None and verifier.verify(tokens["read"] + "x") is None


def test_existing_tokens_are_kept_unless_rotated(tmp_path):
    first = create_api_tokens(tmp_path)
    with pytest.raises(ConfigError, match="exists: its tokens stay valid"):
        create_api_tokens(tmp_path)
    assert load_api_tokens(tmp_path / API_TOKENS_FILE).verify(first["read"]) is not None
    second = create_api_tokens(tmp_path, overwrite=True)
    verifier = load_api_tokens(tmp_path / API_TOKENS_FILE)
    assert verifier.verify(first["read"]) is None and verifier.verify(second["read"]) is not None
    assert mode(tmp_path / API_TOKENS_FILE) == 0o600


def test_a_loose_directory_is_tightened(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    create_api_tokens(loose)
    assert mode(loose) == 0o700


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("{not json", "malformed"),
    ('{"tokens": [{"id": "x", "scopes": ["admin"], "sha256": "' + "0" * 64 + '"}]}', "scopes"),
    ('{"tokens": [{"id": "x", "scopes": ["read"], "sha256": "plaintext-token"}]}', "SHA-256"),
])
def test_a_bad_tokens_file_is_one_clear_error(tmp_path, content, match):
    path = tmp_path / API_TOKENS_FILE
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_api_tokens(path)


def test_environment_tokens_are_hashed_and_merged_with_the_file(tmp_path):
    env_read, env_write = "r" * 20, "w" * 20
    tokens = ApiTokens.from_plaintext(read=env_read, write=env_write)
    assert all(env_read not in t.sha256 for t in tokens.tokens)
    file_tokens = create_api_tokens(tmp_path / "secure")
    settings = load_settings({"CCC_DATA_DIR": str(tmp_path), "CCC_API_TOKEN": env_read})
    access = ApiAccess.from_settings(settings)
    assert len(access.tokens) == 3
    assert access.tokens.verify(env_read).scopes == ("read",)
    assert access.tokens.verify(file_tokens["write"]).scopes == ("read", "write")


# -- when a token is needed -------------------------------------------------------------------
@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("example.com", False),
])
def test_loopback_binds(host, loopback):
    assert is_loopback(host) is loopback
    assert ApiAccess().token_required(host) is not loopback
    assert ApiAccess(require_token=True).token_required(host)


def test_a_server_that_needs_a_token_and_has_none_refuses(tmp_path):
    ApiAccess().check("127.0.0.1")  # localhost: fine without
    with pytest.raises(ConfigError, match=r"binds 0\.0\.0\.0, beyond localhost.*secure init.*CCC_API_TOKEN"):
        ApiAccess().check("0.0.0.0")
    with pytest.raises(ConfigError, match="--require-token is set"):
        ApiAccess(require_token=True).check("127.0.0.1")
    ApiAccess(tokens=ApiTokens.from_plaintext(read="r" * 20)).check("0.0.0.0")


# -- Host ------------------------------------------------------------------------------------
@pytest.mark.parametrize("header,name", [
    ("localhost", "localhost"), ("LocalHost:8080", "localhost"), ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]:8080", "::1"), ("[::1]", "::1"), ("example.com.", "example.com"),
    ("example.com:http", None), ("[::1", None), ("[::1]x", None), ("", None), (":80", None),
])
def test_host_header_names(header, name):
    assert host_name(header) == name


def test_host_allow_list():
    hosts = HostAllowList.for_bind("10.0.0.5", ["api.example.com", "*.corp.example", "[fd00::1]"])
    for ok in ("localhost:8080", "127.0.0.1", "[::1]:1", "10.0.0.5:8080", "API.example.com",
               "x.corp.example", "a.b.corp.example:443", "[fd00::1]:8080"):
        assert hosts.allows(ok), ok
    for bad in ("evil.example", "corp.example", "example.com", "10.0.0.6", None, "",
                "localhost.evil.example"):
        assert not hosts.allows(bad), bad
    assert HostAllowList(["*"]).allows("anything.at.all")
    wildcard = HostAllowList.for_bind("0.0.0.0")
    assert wildcard.allows("localhost")
    assert not wildcard.allows("0.0.0.0") and not wildcard.allows("evil.example")


# -- the token buckets -----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_bursts_then_refills_at_the_rate():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(rate=2.0, burst=3), clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes back every 1/rate s
    assert buckets.take("b") == 0.0  # per key
    clock.now += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(0.5)
    clock.now += 100  # refills up to the burst, not beyond
    assert [buckets.take("a") for _ in range(4)][-1] > 0
    assert retry_after(0.01) == "1" and retry_after(1.2) == "2"


def test_token_buckets_are_bounded():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(rate=1.0, burst=2), max_keys=3, clock=clock)
    for key in "abc":
        buckets.take(key)
    clock.now += 10  # a, b, c have refilled: dropping them loses nothing
    buckets.take("d")
    assert len(buckets) == 1
    for key in "efgh":  # all draining: the least recently seen goes
        buckets.take(key)
    assert len(buckets) == 3


def test_a_rate_of_zero_turns_the_limit_off():
    buckets = TokenBuckets(RateLimit(rate=0, burst=1))
    assert all(buckets.take("a") == 0.0 for _ in range(1000)) and len(buckets) == 0
    with pytest.raises(ConfigError, match="rate limit"):
        RateLimit(rate=-1)
    with pytest.raises(ConfigError, match="burst"):
        RateLimit(rate=1, burst=0)


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("env,match", [
    ({"CCC_API_TOKEN": "short"}, "CCC_API_TOKEN: a token needs at least 16"),
    ({"CCC_API_WRITE_TOKEN": "has spaces in it, sixteen+"}, "CCC_API_WRITE_TOKEN"),
    ({"CCC_API_REQUIRE_TOKEN": "maybe"}, "CCC_API_REQUIRE_TOKEN"),
    ({"CCC_API_RATE_LIMIT": "fast"}, "CCC_API_RATE_LIMIT"),
    ({"CCC_API_RATE_LIMIT": "-1"}, "rate limit"),
    ({"CCC_API_RATE_BURST": "0"}, "CCC_API_RATE_BURST"),
    ({"CCC_API_ALLOWED_HOSTS": "http://example.com"}, "allowed hosts"),
    ({"CCC_API_ALLOWED_HOSTS": "example.com:8080"}, "allowed hosts"),
    ({"CCC_API_TOKENS_FILE": "/no/such/api-tokens.json"}, "CCC_API_TOKENS_FILE"),
])
def test_bad_api_settings_are_one_clear_error(env, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_settings({"CCC_DATA_DIR": str(tmp_path), **env})


def test_api_settings_from_the_environment_and_overrides(tmp_path):
    env = {"CCC_DATA_DIR": str(tmp_path), "CCC_API_HOST": "0.0.0.0", "CCC_API_REQUIRE_TOKEN": "1",
           "CCC_API_ALLOWED_HOSTS": "api.example.com, *.corp.example", "CCC_API_RATE_LIMIT": "2.5",
           "CCC_API_RATE_BURST": "7"}
    s = load_settings(env)
    assert (s.api_host, s.api_require_token, s.api_rate_limit, s.api_rate_burst) == ("0.0.0.0", True, 2.5, 7)
    assert s.api_allowed_hosts == ("api.example.com", "*.corp.example")
    s = load_settings(env, api_require_token=False, api_allowed_hosts=("other.example",), api_rate_limit=0.0)
    assert (s.api_require_token, s.api_allowed_hosts, s.api_rate_limit) == (False, ("other.example",), 0.0)
    defaults = load_settings({"CCC_DATA_DIR": str(tmp_path)})
    assert (defaults.api_host, defaults.api_require_token, defaults.api_token) == ("127.0.0.1", False, None)
    assert (defaults.api_rate_limit, defaults.api_rate_burst) == (20.0, 100)
