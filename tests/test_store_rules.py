"""The store's bookkeeping, read back exactly and without an engine: each chat's model, the allowlists per platform,
the request log behind the daily quota and /stats, and what each of them does when the store fails."""

from __future__ import annotations

import logging
import os

import pytest

from core.chat_store import ChatStore
from core.errors import StoreError
from core.knobs import default_knobs
from core.settings import GenerationSettings, LimitsSettings

SAVE_FAILED_TAIL = ". 생성은 계속 쓸 수 있습니다. (could not save the chat settings: a store failure; /gen still works)"
READ_FAILED_TAIL = ". 생성은 계속 쓸 수 있습니다. (could not read the chat settings: a store failure; /gen still works)"


@pytest.fixture
def store(tmp_path):
    opened = ChatStore(tmp_path / "s.sqlite3")
    yield opened
    opened.close()


def reopened(store: ChatStore) -> ChatStore:
    """A restart: a fresh connection to the same file."""
    store.close()
    return ChatStore(store.path)


def not_writable(store: ChatStore) -> str:
    uid = os.getuid()
    return (f"저장소 {store.path} (store.path): 쓸 수 없습니다: 읽기 전용이거나 uid {uid}에게 권한이 없습니다 "
            f"(not writable: read-only, or no permission for uid {uid})")


def unusable(store: ChatStore) -> str:
    return f"저장소 {store.path} (store.path): 열 수 없습니다 (cannot be used: Cannot operate on a closed database.)"


def broken(tmp_path, read_only: bool) -> ChatStore:
    """A store whose file became read-only (reads work) or that cannot be used at all."""
    store = ChatStore(tmp_path / "broken.sqlite3")
    if read_only:
        store._db.execute("PRAGMA query_only = ON")
    else:
        store._db.close()
    return store


# ---- a chat's model ----------------------------------------------------------------------------------------------
def test_each_chat_keeps_its_own_model_and_a_second_choice_replaces_the_first(store):
    assert store.chat_model("telegram:1") is None  # never chosen: the default model serves
    store.set_chat_model("telegram:1", "small")
    store.set_chat_model("discord:9", "big")
    store.set_chat_model("telegram:1", "big")
    store = reopened(store)
    assert store.chat_model("telegram:1") == "big" and store.chat_model("discord:9") == "big"
    assert store.chat_model("telegram:2") is None
    store.close()


def test_a_chats_model_when_the_store_fails(tmp_path, caplog):
    read_only = broken(tmp_path, read_only=True)
    with pytest.raises(StoreError) as info:
        read_only.set_chat_model("telegram:1", "big")
    assert str(info.value) == f"채팅 설정을 저장하지 못했습니다. {not_writable(read_only)}{SAVE_FAILED_TAIL}"
    assert read_only.chat_model("telegram:1") is None
    closed = broken(tmp_path, read_only=False)
    caplog.clear()
    assert closed.chat_model("telegram:1") is None  # the default model serves, and the failure is logged
    assert [r.getMessage() for r in caplog.records] == [
        f"store {closed.path}: could not read a chat's model: Cannot operate on a closed database."]
    assert caplog.records[0].levelno == logging.ERROR


def test_a_chat_whose_settings_cannot_be_read_gets_the_servers_defaults(tmp_path, caplog):
    defaults = default_knobs(GenerationSettings())
    closed = broken(tmp_path, read_only=False)
    assert closed.knobs("telegram:1", defaults, LimitsSettings()) == defaults  # the chat keeps working
    assert caplog.records[-1].getMessage().startswith(f"store {closed.path}: could not read chat settings: ")


def test_a_second_set_merges_with_the_first(store):
    store.update("telegram:1", {"top_p": 0.5, "top_k": 10})
    store.update("telegram:1", {"top_k": 20, "temperature": 0.7})
    store.update("telegram:2", {"n": 2})
    assert reopened(store).overrides("telegram:1") == {"top_p": 0.5, "top_k": 20, "temperature": 0.7}


# ---- the allowlists ----------------------------------------------------------------------------------------------
def test_allowlists_are_kept_per_platform_and_a_change_replaces_the_entry(store):
    store.seed_access("telegram", {"chat": [-100, -200], "user": [7]})
    store.seed_access("discord", {"guild": [1], "channel": []})
    store.set_access("telegram", "chat", -100, False)  # an admin's /deny of a seeded chat
    store.set_access("telegram", "user", 8, True)
    store.set_access("telegram", "user", 8, False)
    store.set_access("discord", "channel", 5, True)
    store.seed_access("telegram", {"chat": [-100], "user": [7]})  # the settings again at a restart
    store = reopened(store)
    assert store.access_entries("telegram") == {("chat", -100): False, ("chat", -200): True, ("user", 7): True,
                                                ("user", 8): False}
    assert store.access_entries("discord") == {("guild", 1): True, ("channel", 5): True}
    assert store.access_entries("web") == {}
    store.close()


def test_allowlist_changes_when_the_store_fails(tmp_path):
    read_only = broken(tmp_path, read_only=True)
    with pytest.raises(StoreError) as info:
        read_only.set_access("telegram", "user", 8, True)
    assert str(info.value) == f"채팅 설정을 저장하지 못했습니다. {not_writable(read_only)}{SAVE_FAILED_TAIL}"
    closed = broken(tmp_path, read_only=False)
    with pytest.raises(StoreError) as info:
        closed.access_entries("telegram")
    assert str(info.value) == f"채팅 설정을 읽지 못했습니다. {unusable(closed)}{READ_FAILED_TAIL}"


# ---- the request log: the daily quota and /stats -----------------------------------------------------------------
def test_the_quota_counts_one_users_admitted_requests_on_that_day_only(store):
    day, yesterday = "2026-12-05", "2026-12-04"
    for outcome in ("admitted", "ok", "admitted", "rate_limited", "quota"):
        store.log_request(day, "telegram", "telegram:1", outcome, 1.5 if outcome == "ok" else None)
    store.log_request(yesterday, "telegram", "telegram:1", "admitted")
    store.log_request(day, "telegram", "telegram:2", "admitted")
    store.log_request(day, "web", None, "admitted")
    store = reopened(store)
    assert store.admitted_on(day, "telegram:1") == 2
    assert store.admitted_on(yesterday, "telegram:1") == 1 and store.admitted_on(day, "telegram:2") == 1
    assert store.admitted_on("2026-12-06", "telegram:1") == 0 and store.admitted_on(day, "telegram:3") == 0
    assert sorted(store.request_rows(day), key=str) == sorted([
        (day, "telegram", "telegram:1", "admitted", None), (day, "telegram", "telegram:1", "ok", 1.5),
        (day, "telegram", "telegram:1", "admitted", None), (day, "telegram", "telegram:1", "rate_limited", None),
        (day, "telegram", "telegram:1", "quota", None), (day, "telegram", "telegram:2", "admitted", None),
        (day, "web", None, "admitted", None)], key=str)
    assert len(store.request_rows(yesterday)) == 8  # since that day, that day included
    store.close()


def test_pruning_keeps_the_first_day_asked_for(store):
    for day in ("2026-11-28", "2026-11-29", "2026-11-30"):
        store.log_request(day, "discord", "discord:1", "admitted")
    store.prune_log("2026-11-29")
    assert sorted(row[0] for row in store.request_rows("2000-01-01")) == ["2026-11-29", "2026-11-30"]


def test_the_request_log_when_the_store_fails(tmp_path, caplog):
    read_only = broken(tmp_path, read_only=True)
    closed = broken(tmp_path, read_only=False)
    caplog.set_level(logging.ERROR)
    read_only.log_request("2026-12-05", "telegram", "telegram:1", "admitted")  # bookkeeping never fails a request
    read_only.prune_log("2026-12-05")
    assert closed.admitted_on("2026-12-05", "telegram:1") == 0  # the quota is no reason to stop generating
    assert [r.getMessage() for r in caplog.records] == [
        f"store {read_only.path}: could not log a request: attempt to write a readonly database",
        f"store {read_only.path}: could not prune the request log: attempt to write a readonly database",
        f"store {closed.path}: could not read the request log: Cannot operate on a closed database."]
    assert all(r.levelno == logging.ERROR for r in caplog.records)
    with pytest.raises(StoreError) as info:
        closed.request_rows("2026-12-01")
    assert str(info.value) == f"채팅 설정을 읽지 못했습니다. {unusable(closed)}{READ_FAILED_TAIL}"
