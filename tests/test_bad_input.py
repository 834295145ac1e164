"""The bad-input battery (tests/bad_inputs.py) through every front end, plus hypothesis fuzzing of `/api`.

Each case ends in a precise Korean error or a valid result: one reply on the bots, 200 or a 4xx `{"error"}` on the
web; never an exception escaping, a traceback or a token in a reply, a hang (each case is bounded), or a cap exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import discord.ext.test as dpytest
import pytest
from aiohttp.test_utils import TestClient, TestServer
from bad_inputs import CASES, OK, WEB_ONLY, Case
from conftest import make_settings, running_core, telegram_running
from discord.ext import commands
from fake_bot_api import FakeBotAPI
from fake_bot_api import finished as result_finished
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bot.discord_bot import create_bot
from bot.web import create_app
from core.engine import Engine
from core.model_loading import load_model
from core.service import BotCore

TOKEN = "123456789:AAF-battery_Token-xyz"
CASE_TIMEOUT_S = 20.0


@pytest.fixture
def settings(tiny_dir, tmp_path):
    return make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0})


def assert_clean(text: str) -> None:
    assert "Traceback" not in text and TOKEN not in text and "Error(" not in text, text


def assert_within_caps(core: BotCore, texts: list[str]) -> None:
    limits = core.settings.limits
    assert 1 <= len(texts) <= limits.max_candidates
    for text in texts:
        assert len(core.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) <= limits.max_length + 2


# ---- web ---------------------------------------------------------------------------------------------------------
@pytest.fixture
async def client(core):
    async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as c:
        yield c


async def post(client: TestClient, raw: bytes) -> tuple[int, dict]:
    async def go():
        resp = await client.post("/api", data=raw, headers={"Content-Type": "application/json"})
        return resp.status, await resp.json()

    return await asyncio.wait_for(go(), CASE_TIMEOUT_S)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_web_battery(client, core, case: Case):
    status, data = await post(client, json.dumps(case.web_body()).encode())
    if case.web_outcome() == OK:
        assert status == 200, data
        assert_within_caps(core, data["results"])
    else:
        assert status == 422 and set(data) == {"error"}, (status, data)
        assert case.web_outcome() in data["error"] and any("가" <= ch <= "힣" for ch in data["error"])
        assert_clean(data["error"])


@pytest.mark.parametrize("name, raw, status, fragment", WEB_ONLY, ids=[w[0] for w in WEB_ONLY])
async def test_web_only_battery(client, name, raw, status, fragment):
    got, data = await post(client, raw)
    assert got == status and set(data) == {"error"} and fragment in data["error"], (got, data)
    assert_clean(data["error"])


KNOBS = ["min_length", "max_length", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size", "temperature",
         "seed", "n", "label", "prompt", "p", "len", "온도", "foo"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
small_numbers = st.integers(-5, 200) | st.floats(-1, 200, allow_nan=False) | st.sampled_from(["", "0.9", "20", "abc", "1e309"])
bodies = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KNOBS), json_values | small_numbers, max_size=6),
    st.fixed_dictionaries({"prompt": st.text(max_size=40)}, optional={k: small_numbers for k in KNOBS[:9]}),
)


def test_web_fuzz(settings):
    """Random JSON values and shapes: always 200 within the caps or a 4xx with one Korean error."""
    loop = asyncio.new_event_loop()

    async def setup():
        engine = Engine(load_model(settings.model), settings)
        engine.start()
        core = BotCore.create(settings, engine)
        client = TestClient(TestServer(create_app(core), host="127.0.0.1"))
        await client.start_server()
        return engine, core, client

    engine, core, client = loop.run_until_complete(setup())

    @hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=bodies)
    def check(body):
        status, data = loop.run_until_complete(post(client, json.dumps(body).encode()))
        if status == 200:
            assert_within_caps(core, data["results"])
        else:
            assert status in (400, 413, 422) and set(data) == {"error"} and data["error"], (status, data)
            assert any("가" <= ch <= "힣" for ch in data["error"])
            assert_clean(data["error"])

    try:
        check()
        assert engine._thread.is_alive()
    finally:
        loop.run_until_complete(client.close())
        core.store.close()
        loop.run_until_complete(engine.stop())
        loop.close()


# ---- Telegram ----------------------------------------------------------------------------------------------------
async def test_telegram_battery(tiny_dir, tmp_path):
    """Every case in its own private chat, all at once: exactly one reply each, a result or the precise error."""
    fake = await FakeBotAPI(TOKEN).start()
    settings = make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0},
                             telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url})
    try:
        async with running_core(settings) as core, telegram_running(core, fake):
            sent = {case.id: fake.user_message(5000 + i, f"/gen {case.text}".rstrip()) for i, case in enumerate(CASES)}

            def replies(case: Case) -> list[dict]:
                return fake.replies_to(sent[case.id])

            def settled(case: Case) -> bool:
                got = replies(case)
                return bool(got) and (case.expect != OK or result_finished(got[0]))

            await fake.wait_for(lambda: all(settled(c) for c in CASES), timeout=60)
            await fake.settled()  # every handler has returned: a second reply would be here by now
            for i, case in enumerate(CASES):
                got = replies(case)
                assert len(got) == 1 and len(fake.called("sendMessage", chat_id=5000 + i)) == 1, (case.id, got)
                text = got[0]["text"]
                assert_clean(text)
                if case.expect == OK:
                    assert "seed=" in text and "reply_markup" in got[0], (case.id, text)
                else:
                    assert case.expect in text and "reply_markup" not in got[0], (case.id, text)
            assert TOKEN not in json.dumps([c.params for c in fake.calls], ensure_ascii=False)
    finally:
        await fake.close()


# ---- Discord -----------------------------------------------------------------------------------------------------
async def test_discord_battery(core):
    bot = create_bot(core, sync_commands=False)
    bot._connection._intents.members = True
    bot._connection.member_cache_flags = discord_member_flags(bot)
    dpytest.configure(bot, text_channels=1, voice_channels=0, members=1)
    await bot._async_setup_hook()
    await bot.setup_hook()
    try:
        for case in CASES:
            # dpytest re-raises command errors the cog's error hook has already answered: the reply is checked below.
            with contextlib.suppress(commands.CommandInvokeError):
                await asyncio.wait_for(dpytest.message(f"!gen {case.text}".rstrip()), CASE_TIMEOUT_S)
            await asyncio.wait_for(finished(bot), CASE_TIMEOUT_S)  # a streamed reply is edited until it is done
            reply = dpytest.get_message()
            assert dpytest.verify().message().nothing(), f"{case.id}: more than one reply"
            text = (await reply.channel.fetch_message(reply.id)).content
            assert_clean(text)
            assert 0 < len(text) <= 2000
            if case.expect == OK:
                assert "seed=" in text, (case.id, text)
            else:
                assert case.expect in text and "seed=" not in text, (case.id, text)
    finally:
        for view in bot.persistent_views:
            view.stop()
        await dpytest.empty_queue()


async def finished(bot) -> None:
    while bot.get_cog("GenCog").active:
        await asyncio.sleep(0.02)


def discord_member_flags(bot):
    import discord

    return discord.MemberCacheFlags.from_intents(bot._connection._intents)
