"""Start-up refuses unusable settings with one sentence, never a traceback, a hang or a silent default
(issue 19, items 9 and 10)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import make_settings
from helpers import ROOT, subprocess_env

from core.backends import load_counting_tokenizer
from core.errors import ModelLoadError
from core.settings import SettingsError, load_settings


# ---- secrets: read once at start, an empty one is an error -------------------------------------------------------
@pytest.mark.parametrize("section, field", [("web", "api_token_file"), ("telegram", "token_file"),
                                            ("discord", "token_file"), ("engine", "api_key_file")])
@pytest.mark.parametrize("kind, words", [("empty", "empty"), ("blank", "empty"), ("missing", "does not exist"),
                                         ("fifo", "not a regular file"), ("directory", "not a regular file"),
                                         ("latin1", "not UTF-8")])
def test_an_unusable_secret_file_is_one_sentence_at_start(tmp_path, section, field, kind, words):
    path = tmp_path / "secret"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_bytes(b" \n\n")
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    elif kind == "directory":
        path.mkdir()
    elif kind == "latin1":
        path.write_bytes("비밀".encode("euc-kr"))
    with pytest.raises(SettingsError, match=words) as refused:
        load_settings(**{section: {field: str(path)}})
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_secret_is_read_once(tmp_path):
    path = tmp_path / "token"
    path.write_text("123:abc\n", encoding="utf-8")
    settings = load_settings(telegram={"token_file": str(path)})
    path.unlink()
    assert settings.telegram.secret() == "123:abc"


def test_a_non_utf8_token_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("BOT_TELEGRAM__TOKEN", b"123:\xffabc".decode("utf-8", "surrogateescape"))
    with pytest.raises(SettingsError, match="UTF-8"):
        load_settings()


def test_a_non_utf8_env_file_is_refused(monkeypatch, tmp_path):
    env = tmp_path / ".env"
    env.write_bytes(b"BOT_WEB__PORT=8001\nBOT_TELEGRAM__TOKEN=\xff\xfe\n")
    monkeypatch.setenv("BOT_ENV_FILE", str(env))
    with pytest.raises(SettingsError, match="UTF-8"):
        load_settings()


# ---- values that used to crash or be taken silently --------------------------------------------------------------
@pytest.mark.parametrize("url, words", [("http://[::1", "not a valid URL"), ("vllm:8000", "scheme"),
                                        ("localhost:8000", "scheme"), ("ftp://vllm", "scheme"),
                                        ("http://vllm:99999", "not a valid URL"), ("http://", "host")])
def test_a_bad_engine_url_is_refused(url, words):
    with pytest.raises(SettingsError, match=words):
        load_settings(engine={"backend": "openai", "url": url})


def test_a_good_engine_url_is_taken():
    assert load_settings(engine={"backend": "openai", "url": "http://[::1]:8000/v1"}).engine.url


def test_threads_are_held_to_a_range():
    with pytest.raises(SettingsError, match="model.threads.*1024"):
        load_settings(model={"threads": 100000})


@pytest.mark.parametrize("host", ["", "  "])
def test_an_empty_web_host_is_refused_not_every_interface(host):
    with pytest.raises(SettingsError, match="0.0.0.0"):
        load_settings(web={"host": host})


def test_a_non_utf8_tokenizer_file_is_one_sentence(tiny_dir, tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_bytes(b"\xff\xfe{}")
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": "http://127.0.0.1:9",
                                                          "tokenizer": str(broken)})
    with pytest.raises(ModelLoadError, match="engine.tokenizer"):
        load_counting_tokenizer(settings)


def test_the_bot_says_one_sentence_for_a_broken_url(tmp_path):
    env = subprocess_env(BOT_ENGINE__BACKEND="openai", BOT_ENGINE__URL="http://[::1", BOT_STORE__PATH=str(tmp_path / "s.sqlite3"))
    out = subprocess.run([sys.executable, "-m", "bot", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 1 and "engine.url" in out.stderr and "Traceback" not in out.stderr
