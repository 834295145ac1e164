"""`python -m bot` as a new user runs it: a local KoGPT2-format directory plus a Lightning checkpoint."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT
from helpers import free_port as _free_port
from helpers import subprocess_env as _env
from tiny_model import write_lightning_ckpt
from transformers import GPT2LMHeadModel


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def ckpt(tiny_dir: Path, tmp_path_factory) -> Path:
    return write_lightning_ckpt(GPT2LMHeadModel.from_pretrained(tiny_dir), tmp_path_factory.mktemp("ck") / "epoch=1-val_loss=2.50.ckpt")


def test_check_succeeds_with_a_local_model(tiny_dir: Path, ckpt: Path, tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "bot", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_MODEL__CHECKPOINT=str(ckpt)))
    assert out.returncode == 0, out.stderr
    assert "check: ok" in out.stdout and "긍정 아 정말" in out.stdout
    # The reply's own token count (issue 19 item 15), not the sum over the chat default's best_of rows: at most the
    # check's max_length=16 minus the prompt.
    from transformers import AutoTokenizer

    prompt = len(AutoTokenizer.from_pretrained(tiny_dir)("긍정 아 정말", add_special_tokens=False)["input_ids"])
    tokens = int(re.search(r"\((\d+) tokens,", out.stdout).group(1))
    assert 0 <= tokens <= 16 - prompt, out.stdout


def test_check_fails_with_one_sentence(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "bot", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=_env(BOT_MODEL__PRETRAINED="skt/kogpt2-base-v2"))
    assert out.returncode == 1
    assert "BOT_MODEL__PRETRAINED" in out.stderr and "Traceback" not in out.stderr
    # One concise message: the hub is probed once, not retried with a warning per try (issue 13.5).
    assert "Retrying" not in out.stderr and out.stderr.count("hf download") == 1


def test_run_serves_the_tutorial_api_and_stops_cleanly(tiny_dir: Path, ckpt: Path, tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_MODEL__CHECKPOINT=str(ckpt), BOT_WEB__PORT=str(port),
                 BOT_STORE__PATH=str(tmp_path / "store.sqlite3")),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "bot did not start"
                time.sleep(0.2)
        status, data = _post(base + "/api", {"prompt": "긍정 아 정말", "min_length": 10, "max_length": 20, "top_p": 1.0,
                                             "top_k": 50, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                                             "temperature": 1.0})
        assert status == 200 and data["result"].startswith("긍정 아 정말") and len(data["result"]) > len("긍정 아 정말")
        status, data = _post(base + "/api", {"prompt": "긍정 아 정말", "top_p": 1.5})
        assert status == 422 and "top_p" in data["error"] and "0 초과 1 이하" in data["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "web page on http://127.0.0.1" in output and "Traceback" not in output


def test_a_front_end_that_cannot_start_makes_the_process_exit_1(tiny_dir: Path, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "bot"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_WEB__PORT=str(port),
                                      BOT_STORE__PATH=str(tmp_path / "store.sqlite3")))
    assert out.returncode == 1, out.stderr
    assert "front end web failed" in out.stderr and "Traceback" not in out.stderr


# ---- start-up order: everything but the model is checked before the model loads (issue 12, items 8 and 10) --------
@pytest.mark.parametrize("setting", ["store", "token_file"])
def test_unusable_store_or_token_file_fails_before_the_model_loads(tiny_dir: Path, tmp_path: Path, setting):
    unusable = tmp_path / "a-directory"
    unusable.mkdir()
    extra = ({"BOT_STORE__PATH": str(unusable)} if setting == "store"
             else {"BOT_TELEGRAM__TOKEN_FILE": str(unusable), "BOT_STORE__PATH": str(tmp_path / "s.sqlite3")})
    for args in (["--check"], []):
        out = subprocess.run([sys.executable, "-m", "bot", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), **extra))
        assert out.returncode == 1, out.stderr
        assert str(unusable) in out.stderr and "Traceback" not in out.stderr
        assert "model loaded" not in out.stderr  # regression: found only after a load that may take minutes


def test_check_proves_the_store_is_writable(tiny_dir: Path, tmp_path: Path):
    store = tmp_path / "s.sqlite3"
    out = subprocess.run([sys.executable, "-m", "bot", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_STORE__PATH=str(store)))
    assert out.returncode == 0, out.stderr
    assert f"store: {store} (writable)" in out.stdout and store.exists()


def test_discord_voice_warnings_are_silenced(monkeypatch, caplog):
    import discord

    from bot.__main__ import _quiet_libraries

    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True, raising=False)
    _quiet_libraries()
    with caplog.at_level(logging.WARNING):
        discord.Client(intents=discord.Intents.none())
    assert "voice" not in caplog.text
