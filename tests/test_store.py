"""The per-chat store when its file is unusable: at start one clear sentence naming store.path (no traceback), at run
time a store failure said as such, and a chat that keeps working when the store cannot be written."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from conftest import make_settings, running_core, telegram_running
from fake_bot_api import FakeBotAPI, finished
from test_model_loading import as_user

import core.chat_store as chat_store
from core.chat_store import ChatStore
from core.errors import StoreError
from core.knobs import default_knobs
from core.replies import APOLOGY
from core.settings import load_settings

TOKEN = "123456789:AAF-store_Token-xyz"
CHAT = 5001


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just bytes " * 100)
    return path


def _dir(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return tmp_path / "store"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile" / "bot.sqlite3"


@pytest.mark.parametrize("make, reason", [
    (_dir, "디렉터리"), (_corrupt, "손상"), (_under_a_file, "store.path"),
], ids=["a-directory", "corrupt", "parent-is-a-file"])
def test_unusable_store_path_is_one_sentence(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(StoreError) as info:
        ChatStore(path)
    assert str(path) in str(info.value) and reason in str(info.value) and "store.path" in str(info.value)


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's own "database or disk is full": every connection may hold no more pages than it has now."""
    real = sqlite3.connect

    def connect(*args, **kwargs):
        db = real(*args, **kwargs)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
        return db

    monkeypatch.setattr(chat_store.sqlite3, "connect", connect)


def test_full_disk_at_start_is_named(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(StoreError, match="디스크가 가득|disk is full"):
        ChatStore(tmp_path / "bot.sqlite3")


def test_a_read_only_or_full_store_at_run_time(tmp_path):
    settings = load_settings(store={"path": str(tmp_path / "s.sqlite3")})
    defaults, limits = default_knobs(settings.generation), settings.limits
    store = ChatStore(settings.store.path)
    store.update("telegram:1", {"top_p": 7.0})  # stale: today's limits reject it
    store._db.execute("PRAGMA query_only = ON")  # the file became read-only (a remount, a changed volume)
    for _ in range(2):  # regression: the failed clean-up of the stale value broke the chat for good
        assert store.knobs("telegram:1", defaults, limits) == defaults
    with pytest.raises(StoreError, match="저장하지 못했습니다.*읽기 전용"):
        store.update("telegram:1", {"top_k": 5})
    with pytest.raises(StoreError, match="초기화하지 못했습니다"):
        store.reset("telegram:1")
    store.close()


def test_empty_store_path_does_not_open_a_temporary_database(monkeypatch):
    monkeypatch.setenv("BOT_STORE__PATH", "")
    with pytest.raises(Exception, match="store.path"):
        load_settings()


# ---- through Telegram: a failed write is a store failure, not a failed generation --------------------------------
@pytest.fixture
async def fake():
    api = await FakeBotAPI(TOKEN).start()
    yield api
    await api.close()


async def test_telegram_set_on_a_read_only_store_says_so_and_gen_still_works(tiny_dir, tmp_path, fake):
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0},
                             telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url})
    async with running_core(settings) as core, telegram_running(core, fake):
        core.store.update(f"telegram:{CHAT}", {"top_p": 7.0})  # stale
        core.store._db.execute("PRAGMA query_only = ON")
        message = fake.user_message(CHAT, "/set top_k=5")
        await fake.wait_for(lambda: fake.replies_to(message), timeout=20)
        text = fake.replies_to(message)[0]["text"]
        assert "저장하지 못했습니다" in text and "store" in text and text != APOLOGY
        message = fake.user_message(CHAT, "/gen 긍정 아 정말 seed=1")
        await fake.wait_for(lambda: any(finished(m) for m in fake.replies_to(message)), timeout=20)
        assert fake.replies_to(message)[0]["text"].startswith("긍정 아 정말")


@pytest.mark.parametrize("existing", [True, False], ids=["read-only-file", "read-only-directory"])
def test_read_only_store_at_start_is_one_sentence(existing):
    """As another user (root writes everywhere): a store the bot's uid cannot write fails at start."""
    shared = Path(tempfile.mkdtemp(prefix="ro-store-"))
    try:
        shared.chmod(0o755)
        path = shared / "bot.sqlite3"
        if existing:
            ChatStore(path).close()
            path.chmod(0o444)
        shared.chmod(0o555)
        out = as_user(65534 if os.getuid() == 0 else os.getuid(), "from core.chat_store import ChatStore",
                      f"ChatStore({str(path)!r})")
        last = out.stderr.strip().splitlines()[-1]
        assert "StoreError" in last and str(path) in last and "읽기 전용" in last, out.stderr
    finally:
        shared.chmod(0o755)
        shutil.rmtree(shared)
