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
