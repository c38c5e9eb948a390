"""Loading settings from the environment and arguments: precedence, and one clear error for bad values."""

from __future__ import annotations

import pytest

from events.errors import ConfigError
from infra.adapters.nats.settings import load_settings


@pytest.mark.parametrize("env,match", [
    ({"NATS_URL": "http://x:4222"}, "NATS_URL"),
    ({"CCC_SYNC_INTERVAL": "sometimes"}, "CCC_SYNC_INTERVAL"),
    ({"CCC_REPLICAS": "two"}, "CCC_REPLICAS"),
    ({"CCC_REPLICAS": "9"}, "CCC_REPLICAS"),
    ({"CCC_API_PORT": "70000"}, "CCC_API_PORT"),
    ({"NATS_CREDS": "/no/such/file.creds"}, "nats_creds"),
])
def test_bad_config_is_one_clear_error(env, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_settings({"CCC_DATA_DIR": str(tmp_path), **env})


def test_settings_precedence(tmp_path):
    s = load_settings({"NATS_URL": "nats://a:1", "CCC_DATA_DIR": str(tmp_path)}, nats_url="nats://b:2")
    assert s.nats_url == "nats://b:2" and s.data_dir == tmp_path and not s.embedded
    s = load_settings({"CCC_DATA_DIR": str(tmp_path), "CCC_SYNC_INTERVAL": "2s"})
    assert s.embedded and s.sync_interval == "2s" and s.replicas == 1


def test_repos_allow_list_from_the_environment_and_the_flag(tmp_path):
    base = {"CCC_DATA_DIR": str(tmp_path)}
    assert load_settings(base).repos == ()  # unset: every repository
    assert load_settings({**base, "CCC_REPOS": "acme/app, acme/*"}).repos == ("acme/app", "acme/*")
    assert load_settings({**base, "CCC_REPOS": "acme/app"}, repos="other/*").repos == ("other/*",)
    with pytest.raises(ConfigError, match=r"^CCC_REPOS: invalid repository '\*'"):
        load_settings({**base, "CCC_REPOS": "*"})
    with pytest.raises(ConfigError, match=r"^--repos: invalid repository 'a b'"):
        load_settings(base, repos="a b")


def test_a_bad_nats_url_is_named_without_its_password(tmp_path):
    with pytest.raises(ConfigError, match="NATS_URL") as e:
        load_settings({"CCC_DATA_DIR": str(tmp_path), "NATS_URL": "http://user:secret@host:4222"})
    assert "secret" not in str(e.value) and "host:4222" in str(e.value)
