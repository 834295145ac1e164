"""Settings: TOML default, environment overrides, secrets, and failures that name the field."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.settings import SettingsError, load_settings


def test_repo_settings_file_holds_the_tutorials_defaults():
    s = load_settings()
    assert s.model.pretrained == "models/nsmc-small" and s.model.checkpoint == ""
    g = s.generation
    assert (g.min_length, g.max_length, g.top_p, g.top_k, g.repetition_penalty, g.no_repeat_ngram_size,
            g.temperature) == (10, 20, 1.0, 50, 1.0, 0, 1.0)
    assert (s.web.enabled, s.web.host, s.web.port) == (True, "127.0.0.1", 8000)
    assert s.telegram.secret() is None and s.discord.secret() is None


def test_environment_overrides_toml(monkeypatch):
    monkeypatch.setenv("BOT_MODEL__CHECKPOINT", "/ckpt/x.ckpt")
    monkeypatch.setenv("BOT_WEB__PORT", "9001")
    monkeypatch.setenv("BOT_TELEGRAM__BASE_URL", "http://127.0.0.1:8081/bot")
    monkeypatch.setenv("BOT_GENERATION__TOP_P", "0.9")
    s = load_settings()
    assert s.model.checkpoint == "/ckpt/x.ckpt" and s.model.pretrained == "models/nsmc-small"
    assert s.web.port == 9001 and s.web.host == "127.0.0.1"
    assert s.telegram.base_url == "http://127.0.0.1:8081/bot"
    assert s.generation.top_p == 0.9 and s.generation.top_k == 50


def test_bot_settings_names_another_file(monkeypatch, tmp_path: Path):
    other = tmp_path / "other.toml"
    other.write_text('[web]\nport = 7000\n[limits]\nmax_candidates = 2\n', encoding="utf-8")
    monkeypatch.setenv("BOT_SETTINGS", str(other))
    s = load_settings()
    assert s.web.port == 7000 and s.limits.max_candidates == 2 and s.generation.max_length == 20


def test_tokens_are_secret_and_can_come_from_a_file(monkeypatch, tmp_path: Path, caplog):
    token = "123456:SECRET-token-value"
    monkeypatch.setenv("BOT_TELEGRAM__TOKEN", token)
    s = load_settings()
    assert s.telegram.secret() == token
    logging.getLogger("test").info("settings: %s %r", s, s)
    assert token not in repr(s) and token not in str(s) and token not in caplog.text
    secret_file = tmp_path / "discord_token"
    secret_file.write_text("discord-secret\n", encoding="utf-8")
    monkeypatch.setenv("BOT_DISCORD__TOKEN_FILE", str(secret_file))
    assert load_settings().discord.secret() == "discord-secret"


@pytest.mark.parametrize(
    "toml, field",
    [
        ("[web]\nport = 'abc'\n", "web.port"),
        ("[limits]\nmax_length = 5000\n", "limits.max_length"),
        ("[generation]\ntop_p = 2.0\n", "top_p"),
        ("[model]\nquantize = 'int4'\n", "model.quantize"),
        ("[modle]\npretrained = 'x'\n", "modle"),
        ("[web\nport = 1\n", "설정 파일"),
    ],
)
def test_bad_settings_file_names_the_field(monkeypatch, tmp_path: Path, toml, field):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml, encoding="utf-8")
    monkeypatch.setenv("BOT_SETTINGS", str(bad))
    with pytest.raises(SettingsError, match=field):
        load_settings()


def test_missing_settings_file(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("BOT_SETTINGS", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match="nope.toml"):
        load_settings()
