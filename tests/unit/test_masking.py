"""Masking secrets (from the environment, known token shapes, URLs, extras) out of text."""

from __future__ import annotations

import json
import os

import pytest

from infra.adapters.obs.masking import mask_secrets


def test_mask_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "anthropic-value-1234")
    monkeypatch.setenv("GITHUB_TOKEN", "plain-github-token-value")
    monkeypatch.setenv("CCC_WEBHOOK_SECRET", "webhook-shh-secret")
    monkeypatch.setenv("SHORT_KEY", "1")
    text = (
        "key anthropic-value-1234 gh plain-github-token-value hook webhook-shh-secret\n"
        "sk-" "ant-api03-AbCdEf123456 ghp_" + "a" * 36 + " github_pat_" + "B1_" * 10 + "\n"
        "https://x-access-token:s3cr3t@github.com/o/r.git custom-thing 1 item\n"
    )
    masked = mask_secrets(text, extra=["custom-thing"])
    for secret in ("anthropic-value-1234", "plain-github-token-value", "webhook-shh-secret", "sk-ant-",
                   "ghp_", "github_pat_", "s3cr3t", "custom-thing"):
        assert secret not in masked
    assert "1 item" in masked and "github.com/o/r.git" in masked
    assert json.dumps(mask_secrets("nothing secret")) == '"nothing secret"'
    assert os.environ["SHORT_KEY"] == "1"


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://user:secret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
    ("nats://s3cr3t-token@host:4222", "nats://***@host:4222"),
    ("tls://user:p@ss@host:4222", "tls://***@host:4222"),  # an "@" in the password: all of it goes
    ("nats://a:4222,nats://u:secret@b:4222, tls://c:4222", "nats://a:4222,nats://***@b:4222, tls://c:4222"),
    ("u:secret@host:4222", "***@host:4222"),  # nats-py takes a server without a scheme too
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("", ""),
])
def test_redact_url(url, shown) -> None:
    from infra.adapters.obs.masking import mask, redact_url

    assert redact_url(url) == shown
    if "://" in url:  # free text: the masker finds URLs by their scheme
        assert "secret" not in mask(f"error: cannot connect to {url}: refused")
