"""What admins see and change, checked exactly without an engine: who the stored allowlists let in (and the settings'
lists they start from), /allow's arguments and their usage sentence, /allowed, /stats, and the daily quota's day and
reset time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core import admin
from core.access import Access, StoredAccess, Verdict, discord_access, telegram_access
from core.chat_store import ChatStore
from core.errors import UserError
from core.settings import load_settings

ME, FRIEND, STRANGER, GROUP, OTHER_GROUP = 7, 8, 9, -100, -200


@pytest.fixture
def store():
    opened = ChatStore(":memory:")
    yield opened
    opened.close()


# ---- who is let in -----------------------------------------------------------------------------------------------
def test_lists_are_alternatives_and_an_absent_id_never_matches():
    access = Access({"chat": [GROUP], "user": [ME]})
    assert not access.open and Access({"chat": [], "user": []}).open
    assert access.allows(chat=GROUP, user=None) and access.allows(chat=None, user=ME)
    assert not access.allows(chat=OTHER_GROUP, user=STRANGER) and not access.allows(chat=None, user=None)
    assert not access.allows(chat=ME, user=GROUP)  # an id counts on its own list only
    assert access.allows(user=ME) and not access.allows(chat=OTHER_GROUP)  # a platform may give only some kinds


def test_stored_lists_start_from_the_settings_and_admins_change_them(store):
    access = StoredAccess(store, "telegram", {"chat": [GROUP], "user": []})
    assert access.kinds == ("chat", "user") and access.entries() == {("chat", GROUP): True}
    assert access.check(chat=GROUP, user=STRANGER) is Verdict.ALLOW
    assert access.check(chat=OTHER_GROUP, user=STRANGER) is Verdict.REFUSE
    assert access.check(chat=None, user=None) is Verdict.REFUSE
    access.set("user", ME, True)  # /allow user 7
    assert access.check(chat=OTHER_GROUP, user=ME) is Verdict.ALLOW and access.check(chat=None, user=ME) is Verdict.ALLOW
    access.set("user", FRIEND, False)  # /deny user 8: refused even in the allowed group
    assert access.check(chat=GROUP, user=FRIEND) is Verdict.REFUSE
    assert access.check(chat=GROUP, user=STRANGER) is Verdict.ALLOW
    access.set("chat", GROUP, False)  # /deny the group: its other members are refused, an allowed user is not
    assert access.check(chat=GROUP, user=STRANGER) is Verdict.REFUSE and access.check(chat=GROUP, user=ME) is Verdict.REFUSE
    assert access.check(chat=OTHER_GROUP, user=ME) is Verdict.ALLOW
    assert access.entries() == {("chat", GROUP): False, ("user", ME): True, ("user", FRIEND): False}


def test_only_bans_leave_the_bot_open_to_everyone_else(store):
    access = StoredAccess(store, "discord", {"guild": [], "channel": []}, "ignore")
    assert access.check(guild=1, channel=2) is Verdict.ALLOW and access.check(guild=None, channel=None) is Verdict.ALLOW
    access.set("channel", 2, False)
    access.set("guild", 5, False)
    assert access.check(guild=1, channel=2) is Verdict.IGNORE and access.check(guild=5, channel=3) is Verdict.IGNORE
    assert access.check(guild=1, channel=3) is Verdict.ALLOW
    access.set("channel", 3, True)  # the first allowed id closes the bot to everyone not listed
    assert access.check(guild=1, channel=3) is Verdict.ALLOW and access.check(guild=1, channel=4) is Verdict.IGNORE


def test_stored_access_misuse_is_named(store):
    with pytest.raises(ValueError, match="^refusal must be 'reply' or 'ignore', not 'shout'$"):
        StoredAccess(store, "telegram", {"chat": []}, "shout")
    with pytest.raises(TypeError, match=r"^unknown id kinds: \['guild', 'thread'\]$"):
        StoredAccess(store, "telegram", {"chat": [], "user": []}).check(chat=1, thread=3, guild=2)


def test_each_platform_seeds_its_own_stored_lists_from_its_settings(store):
    settings = load_settings(store={"path": ":memory:"},
                             telegram={"allowed_chat_ids": [GROUP], "allowed_user_ids": [ME], "refusal": "ignore"},
                             discord={"allowed_guild_ids": [1], "allowed_channel_ids": [2, 3]})
    tg, dc = telegram_access(settings.telegram, store), discord_access(settings.discord, store)
    assert isinstance(tg, StoredAccess) and isinstance(dc, StoredAccess)
    assert store.access_entries("telegram") == {("chat", GROUP): True, ("user", ME): True}
    assert store.access_entries("discord") == {("guild", 1): True, ("channel", 2): True, ("channel", 3): True}
    assert tg.check(chat=OTHER_GROUP, user=ME) is Verdict.ALLOW and tg.check(chat=1, user=STRANGER) is Verdict.IGNORE
    assert dc.check(guild=9, channel=3) is Verdict.ALLOW and dc.check(guild=9, channel=9) is Verdict.REFUSE
    quiet = load_settings(store={"path": ":memory:"}, discord={"allowed_guild_ids": [1], "refusal": "ignore"},
                          telegram={"refusal": "reply"})
    assert discord_access(quiet.discord, store).check(guild=9, channel=9) is Verdict.IGNORE
    assert telegram_access(quiet.telegram, store).check(chat=1, user=STRANGER) is Verdict.REFUSE


# ---- /allow, /deny arguments -------------------------------------------------------------------------------------
TG_USAGE = ("사용법: 인자 없이(지금 이 chat) 또는 chat <id> | user <id>. 예: user 123456789 "
            "(usage: no argument for this chat, or chat <id> | user <id>)")
DC_USAGE = ("사용법: 인자 없이(지금 이 guild) 또는 guild <id> | channel <id>. 예: channel 123456789 "
            "(usage: no argument for this guild, or guild <id> | channel <id>)")


@pytest.mark.parametrize(("args", "here", "expected"), [
    ("", {"chat": GROUP, "user": ME}, ("chat", GROUP)),  # here: the chat first
    ("", {"chat": None, "user": ME}, ("user", ME)),
    ("", {"thread": 4, "user": ME}, ("user", ME)),  # an id of a kind the lists do not have is passed over
    ("  User   -42 ", {"chat": GROUP}, ("user", -42)),
    ("chat 0", {}, ("chat", 0)),
])
def test_allow_targets(args, here, expected):
    assert admin.parse_target(args, ("chat", "user"), here) == expected


@pytest.mark.parametrize("args", ["", "chat", "user 5.5", "user x", "guild 5", "user 5 6", "5"])
def test_allow_usage_names_this_platforms_kinds(args):
    with pytest.raises(UserError) as info:
        admin.parse_target(args, ("chat", "user"), {"chat": None, "user": None})
    assert str(info.value) == TG_USAGE
    with pytest.raises(UserError) as info:
        admin.parse_target("", ("guild", "channel"), {"guild": None, "channel": None})
    assert str(info.value) == DC_USAGE


# ---- /allowed ------------------------------------------------------------------------------------------------------
def test_allowed_lists_both_lists_sorted():
    entries = {("user", FRIEND): False, ("user", ME): True, ("chat", GROUP): True, ("chat", OTHER_GROUP): True}
    assert admin.render_access(entries, ("chat", "user")) == (
        "허용 목록 (allowed):\n• chat -200\n• chat -100\n• user 7\n차단 목록 (denied):\n• user 8")
    assert admin.render_access({}, ("chat", "user")) == (
        "허용 목록 (allowed):\n• (없음 — 모두 쓸 수 있습니다 / empty: everyone)\n차단 목록 (denied):\n• (없음 / none)")
    assert admin.render_access({("chat", GROUP): False}, ("chat", "user")) == (
        "허용 목록 (allowed):\n• (없음 — 모두 쓸 수 있습니다 / empty: everyone)\n차단 목록 (denied):\n• chat -100")


# ---- /stats --------------------------------------------------------------------------------------------------------
def test_stats_count_admitted_requests_refusals_and_the_median_of_finished_ones():
    rows = [("2026-12-05", "telegram", "telegram:1", "admitted", None), ("2026-12-04", "telegram", "telegram:1", "admitted", None),
            ("2026-12-05", "telegram", "telegram:1", "ok", 1.0), ("2026-12-05", "telegram", "telegram:2", "admitted", None),
            ("2026-12-05", "telegram", "telegram:2", "ok", None), ("2026-12-05", "discord", "discord:3", "ok", 4.0),
            ("2026-12-05", "web", None, "admitted", None), ("2026-12-05", "web", None, "ok", 1.5),
            ("2026-12-05", "telegram", "telegram:1", "rate_limited", None), ("2026-12-05", "telegram", "telegram:1", "quota", None),
            ("2026-12-05", "telegram", "telegram:2", "quota", None), ("2026-12-05", "web", None, "user_error", 3.0)]
    assert admin.render_stats(rows) == (
        "최근 7일 통계, UTC (stats, last 7 days):\n날짜별 생성 요청 (requests per day):\n• 2026-12-04: 1\n• 2026-12-05: 3\n"
        "거절 사유별 (refusals by reason): quota 2, rate_limited 1, user_error 1\n"
        "응답 시간 중앙값 (median latency): 1.50초 (3건)\n가장 많이 쓴 사용자 (busiest users): telegram:1 2, telegram:2 1")
    assert admin.render_stats([]) == (
        "최근 7일 통계, UTC (stats, last 7 days):\n날짜별 생성 요청 (requests per day):\n• 없음 (none)\n"
        "거절 사유별 (refusals by reason): 없음 (none)\n응답 시간 중앙값 (median latency): 기록 없음 (none yet)\n"
        "가장 많이 쓴 사용자 (busiest users): 없음 (none)")


def test_stats_name_the_five_busiest_users():
    users = ["a"] * 3 + ["b"] + ["c"] * 2 + ["d", "e", "f"] + ["c", "c"]
    rows = [("2026-12-05", "telegram", u, "admitted", None) for u in users]
    assert admin.render_stats(rows).endswith("가장 많이 쓴 사용자 (busiest users): c 4, a 3, b 1, d 1, e 1")


# ---- the daily quota's day -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("now", "ko", "en"), [
    (datetime(2026, 12, 5, 21, 30, tzinfo=UTC), "2시간 30분", "2 h 30 min"),
    (datetime(2026, 12, 5, 0, 0, tzinfo=UTC), "24시간 0분", "24 h 0 min"),
    (datetime(2026, 12, 5, 23, 15, 59, tzinfo=UTC), "44분", "0 h 44 min"),
    (datetime(2026, 12, 5, 23, 59, 30, tzinfo=UTC), "1분", "0 h 0 min"),  # never "0분"
    (datetime(2026, 12, 5, 22, 59, 0, 1, tzinfo=UTC), "1시간 0분", "1 h 0 min"),
])
def test_the_quota_sentence_says_when_it_resets(now, ko, en):
    assert admin.quota_text(3, now) == (
        f"오늘 쓸 수 있는 생성 3회를 모두 썼습니다. {ko} 뒤(UTC 자정, 한국 시각 오전 9시)에 다시 쓸 수 있습니다. "
        f"(daily quota of 3 used up; it resets at 00:00 UTC, in {en})")


class KoreanHostClock(datetime):
    """The clock of a host in Korea (UTC+9) at 2026-12-05 20:00 UTC, which is already 05:00 on the 6th there."""

    INSTANT = datetime(2026, 12, 5, 20, 0, tzinfo=UTC)

    @classmethod
    def now(cls, tz=None):
        return cls.INSTANT.astimezone(tz) if tz is not None else (cls.INSTANT + timedelta(hours=9)).replace(tzinfo=None)


def test_the_quota_day_is_the_utc_date_on_a_host_in_any_time_zone(monkeypatch):
    monkeypatch.setattr(admin, "datetime", KoreanHostClock)
    assert admin.today() == "2026-12-05" and admin.since() == "2026-11-29" and admin.since(2) == "2026-12-04"
    assert admin.quota_text(3).endswith("(daily quota of 3 used up; it resets at 00:00 UTC, in 4 h 0 min)")


def test_the_quota_day_is_the_utc_date_and_stats_cover_a_week_with_today():
    late = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert admin.today(late) == "2026-12-31" and admin.since(now=late) == "2026-12-25"
    assert admin.since(1, late) == "2026-12-31" and admin.since(31, late) == "2026-12-01"
    before = datetime.now(UTC).strftime("%Y-%m-%d")
    today, week = admin.today(), admin.since()
    after = datetime.now(UTC).strftime("%Y-%m-%d")
    assert today in (before, after) and admin.since(now=datetime.strptime(today, "%Y-%m-%d").replace(tzinfo=UTC)) == week
    assert "회를 모두 썼습니다" in admin.quota_text(3)
