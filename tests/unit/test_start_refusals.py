"""Credentials that would not protect anything are refused at start (issue #23, point 6): a
ConfigError naming the variable, never a warning and a process that goes on."""

from __future__ import annotations

import pytest

from genx_ray.model import ConfigError, Settings


def test_a_token_secret_under_32_bytes_is_refused() -> None:
    with pytest.raises(ConfigError, match="GENX_TOKEN_SECRET") as caught:
        Settings.from_env({"GENX_TOKEN_SECRET": "short-secret-of-31-bytes-xxxxxx"})
    assert "short-secret" not in str(caught.value)  # never repeated: errors may be logged
    assert Settings.from_env({"GENX_TOKEN_SECRET": "s" * 32}).token_secret == "s" * 32


def test_an_api_key_under_16_characters_is_refused() -> None:
    with pytest.raises(ConfigError, match="GENX_API_KEYS") as caught:
        Settings.from_env({"GENX_API_KEYS": "a-long-enough-key-1:acme,shortkey:globex"})
    assert "shortkey" not in str(caught.value) and "globex" in str(caught.value)
    keys = Settings.from_env({"GENX_API_KEYS": "a-long-enough-key-1:acme"}).api_keys
    assert keys == {"a-long-enough-key-1": "acme"}


def test_webhooks_without_a_secret_are_refused() -> None:
    with pytest.raises(ConfigError, match="GENX_WEBHOOK_SECRET"):
        Settings.from_env({"GENX_WEBHOOK_URL": "https://hooks.example.com/genx"})
    with pytest.raises(ConfigError, match="GENX_WEBHOOK_SECRET"):
        Settings(webhook_url="https://hooks.example.com/genx")
    signed = Settings.from_env({"GENX_WEBHOOK_URL": "https://hooks.example.com/genx",
                                "GENX_WEBHOOK_SECRET": "whsec-0123456789"})  # fmt: skip
    assert signed.webhook_secret == "whsec-0123456789"


@pytest.mark.parametrize(
    "origin",
    ["https://app.example.com; script-src *", "https://app.example.com 'unsafe-inline'",
     "https://a.example.com/path", "javascript://x", "https://", "https://a b.com",
     "https://app.example.com;"],
)  # fmt: skip
def test_a_cors_origin_is_an_origin_and_nothing_else(origin: str) -> None:
    with pytest.raises(ConfigError, match="GENX_CORS_ORIGINS"):
        Settings.from_env({"GENX_CORS_ORIGINS": f"https://ok.example.com,{origin}"})


def test_good_origins_pass() -> None:
    given = "https://app.example.com, http://localhost:3000,https://[::1]:8443,*"
    assert Settings.from_env({"GENX_CORS_ORIGINS": given}).cors_origins == (
        "https://app.example.com", "http://localhost:3000", "https://[::1]:8443", "*",
    )  # fmt: skip
