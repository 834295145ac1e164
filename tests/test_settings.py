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


# ---- unknown keys are errors (regression: unknown keys inside a section were silently ignored) ---------------------
@pytest.mark.parametrize(
    "toml, fragments",
    [
        ("[telegram]\nallowed_user_id = [12345]\n", ["[telegram] allowed_user_id", "did you mean allowed_user_ids"]),
        ("[limits]\nbatch_windw_ms = 5\n", ["[limits] batch_windw_ms", "did you mean batch_window_ms"]),
        ("[discord]\nallowed_guilds = [1]\n", ["[discord] allowed_guilds", "allowed_guild_ids"]),
    ],
)
def test_unknown_key_inside_a_section_is_an_error(monkeypatch, tmp_path: Path, toml, fragments):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml, encoding="utf-8")
    monkeypatch.setenv("BOT_SETTINGS", str(bad))
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert all(f in str(info.value) for f in fragments), str(info.value)


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("BOT_TELEGRAM__ALLOWED_USER_ID", "BOT_TELEGRAM__ALLOWED_USER_IDS"),
        ("BOT_TELEGRAMM__TOKEN", "BOT_TELEGRAM__TOKEN"),
        ("BOT_LIMITS__BATCH_WINDOW", "BOT_LIMITS__BATCH_WINDOW_MS"),
        ("BOT_WEB__PORT__X", None),
    ],
)
def test_unknown_environment_variable_is_an_error(monkeypatch, name, suggestion):
    monkeypatch.setenv(name, "[1]")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert name in str(info.value) and (suggestion is None or f"did you mean {suggestion}?" in str(info.value))


def test_unknown_key_check_follows_the_models(monkeypatch):
    """A field declared later (another section, another key) is known without touching the check."""
    from pydantic import BaseModel

    import core.settings as cs

    class Extra(BaseModel):
        url: str = ""

    monkeypatch.setitem(cs.Settings.model_fields, "engine", cs.Settings.model_fields["web"].__class__(annotation=Extra))
    cs.check_variables({"BOT_ENGINE__URL": "x"}, "env")
    with pytest.raises(SettingsError, match="BOT_ENGINE__URL"):
        cs.check_variables({"BOT_ENGINE__URLL": "x"}, "env")
    assert cs.unknown_keys({"engine": {"url": "x", "model": "y"}}, cs.Settings) == [(("engine", "model"), ["url"])]


def test_env_file_in_the_working_directory_is_read(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("BOT_ENV_FILE")  # conftest points it away from a developer's .env
    monkeypatch.chdir(tmp_path)
    env = "COMPOSE_PROJECT_NAME=x\nBOT_WEB__PORT=9009\nBOT_TELEGRAM__TOKEN=1:abc\n"  # compose's own variables too
    (tmp_path / ".env").write_text(env, encoding="utf-8")
    s = load_settings()
    assert s.web.port == 9009 and s.telegram.secret() == "1:abc"
    monkeypatch.setenv("BOT_WEB__PORT", "9010")  # the environment overrides the file
    assert load_settings().web.port == 9010
    (tmp_path / ".env").write_text("BOT_WEB__PROT=1\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="BOT_WEB__PROT.*did you mean BOT_WEB__PORT"):
        load_settings()


# ---- bounds (regression: a huge batch window or timeout stalled every request) -----------------------------------
@pytest.mark.parametrize("key, value", [
    ("batch_window_ms", 100_000), ("request_timeout_s", 1e9), ("shutdown_grace_s", 1e9), ("queue_size", 10**9),
    ("max_batch_size", 10**6), ("user_interval_s", 1e9), ("max_prompt_chars", 10**9), ("max_prompt_tokens", 10**6),
])
def test_limits_that_could_stall_everyone_have_an_upper_bound(monkeypatch, key, value):
    monkeypatch.setenv(f"BOT_LIMITS__{key.upper()}", str(value))
    with pytest.raises(SettingsError, match=f"limits.{key}"):
        load_settings()


def test_empty_store_path_is_an_error_not_a_temporary_database(monkeypatch):
    monkeypatch.setenv("BOT_STORE__PATH", "")
    with pytest.raises(SettingsError, match="store.path"):
        load_settings()
