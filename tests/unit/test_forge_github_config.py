"""GitHubForge without a server: credentials and URL configuration, and the closing keyword in PR bodies."""

from __future__ import annotations

import pytest

from events.errors import ConfigError
from infra.adapters.forge.github import GitHubForge, ensure_closes, web_url_for

TOKEN = "ghp_fake_token_123456"


def test_ensure_closes():
    assert ensure_closes("Resolves #4", 4) == "Resolves #4"
    assert ensure_closes("fixes acme/app#4 now", 4) == "fixes acme/app#4 now"
    assert ensure_closes("Resolves #41", 4).endswith("Closes #4\n")
    assert ensure_closes("", 7).strip() == "Closes #7"


def test_configuration():
    with pytest.raises(ConfigError, match="no credentials"):
        GitHubForge(env={})
    with pytest.raises(ConfigError, match="GITHUB_APP_INSTALLATION_ID"):
        GitHubForge(env={"GITHUB_APP_ID": "1", "GITHUB_APP_PRIVATE_KEY": "-----BEGIN x"})
    forge = GitHubForge(env={"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": "https://ghe.example.com/api/v3"})
    assert forge.api_url == "https://ghe.example.com/api/v3"
    assert forge.clone_url("acme/app") == "https://ghe.example.com/acme/app.git"
    assert GitHubForge(TOKEN, env={}).clone_url("acme/app") == "https://github.com/acme/app.git"
    assert web_url_for("https://api.acme.ghe.com") == "https://acme.ghe.com"
    templated = GitHubForge(TOKEN, env={}, git_url_template="file:///srv/git/{owner}/{name}.git")
    assert templated.clone_url("acme/app") == "file:///srv/git/acme/app.git"
    assert templated.git_env("acme/app") == {}  # a local path needs (and gets) no token
