"""Several models: settings, loading (one failing is reported by name, the others serve), and choosing one per chat
(/model) or per request (model=) through Telegram (fake Bot API), Discord (dpytest and the real tree) and the web."""

from __future__ import annotations

import contextlib
import json
import urllib.parse

import discord.ext.test as dpytest
import pytest
from aiohttp.test_utils import TestClient, TestServer
from browser import CHROMIUM, chromium_page
from conftest import make_settings, telegram_running
from discord.ext import commands
from fake_bot_api import FakeBotAPI, finished
from helpers import start_discord_bot
from test_discord import FakeInteraction, slash

from bot.web import create_app
from core.backends import start_backend
from core.errors import UserError
from core.models import start_models, take_model
from core.service import BotCore
from core.settings import SettingsError, load_settings

TOKEN = "123456789:AAF-secret_TokenValue-xyz"
CHAT = 1001


def settings_with_models(tiny_dir, tmp_path, **sections):
    return make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0},
                         model={"name": "tiny-a"},
                         models={"tiny-b": {"model": {"pretrained": str(tiny_dir), "quantize": "none"}},
                                 "broken": {"model": {"pretrained": str(tmp_path / "no-such-model")}}}, **sections)


class Recorder:
    """Which backend generated: wraps a backend's stream and generate."""

    def __init__(self, backend, monkeypatch):
        self.requests = []
        stream, generate = backend.stream, backend.generate

        def recording_stream(prepared):
            self.requests.append(prepared.request)
            return stream(prepared)

        async def recording_generate(prepared):
            self.requests.append(prepared.request)
            return await generate(prepared)

        monkeypatch.setattr(backend, "stream", recording_stream)
        monkeypatch.setattr(backend, "generate", recording_generate)


@contextlib.asynccontextmanager
async def models_core(settings):
    models = await start_models(settings.per_model(), start_backend)
    core = BotCore.create(settings, models.get(None), models)
    try:
        yield core
    finally:
        core.store.close()
        await models.stop()


# ---- settings and loading ----------------------------------------------------------------------------------------
def test_models_settings_and_their_mistakes(tiny_dir, tmp_path):
    settings = settings_with_models(tiny_dir, tmp_path)
    per = settings.per_model()
    assert list(per) == ["tiny-a", "tiny-b", "broken"] and per["tiny-b"].model.quantize == "none"
    assert per["tiny-b"].limits == settings.limits  # only [model] and [engine] differ
    for bad, needle in [({"x": {"model": {"pretraind": "p"}}}, "pretrained"), ({"x": {"engin": {}}}, "engine"),
                        ({"a b": {}}, "모델 이름"), ({"tiny-a": {}}, "이미")]:
        with pytest.raises(SettingsError, match=needle):
            load_settings(model={"pretrained": str(tiny_dir), "name": "tiny-a"}, models=bad)


def test_model_word_is_taken_out_of_the_text():
    assert take_model("긍정 아 model=tiny-b top_p=0.9") == ("긍정 아  top_p=0.9", "tiny-b")
    assert take_model("긍정 아 모델＝x") == ("긍정 아 ", "x")
    assert take_model("긍정 아 정말") == ("긍정 아 정말", None)
    with pytest.raises(UserError, match="model="):
        take_model("긍정 아 model=")


async def test_a_model_that_fails_is_reported_by_name_and_the_others_serve(tiny_dir, tmp_path, caplog):
    settings = settings_with_models(tiny_dir, tmp_path)
    async with models_core(settings) as core:
        assert core.served.names == ["tiny-a", "tiny-b"] and core.served.default == "tiny-a"
        assert "broken" in core.served.failed and "broken" in caplog.text
        with pytest.raises(UserError, match="broken.*불러오지 못했습니다"):
            core.served.check("broken")
    only_broken = make_settings(tiny_dir, tmp_path, model={"pretrained": str(tmp_path / "missing")})
    with pytest.raises(Exception, match="missing"):
        await start_models(only_broken.per_model(), start_backend)


# ---- Telegram ----------------------------------------------------------------------------------------------------
@pytest.fixture
async def fake():
    api = await FakeBotAPI(TOKEN, username="ThisBot").start()
    yield api
    await api.close()


def tg(fake):
    return {"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url}


async def say(fake: FakeBotAPI, text: str, final: bool = False, chat: int = CHAT) -> dict:
    message = fake.user_message(chat, text)
    await fake.wait_for(lambda: any(not final or finished(m) for m in fake.replies_to(message)))
    return fake.replies_to(message)[0]


async def test_telegram_model_per_chat_and_per_request(tiny_dir, tmp_path, fake, monkeypatch):
    async with models_core(settings_with_models(tiny_dir, tmp_path, telegram=tg(fake))) as core, \
            telegram_running(core, fake):
        a, b = Recorder(core.served.get("tiny-a"), monkeypatch), Recorder(core.served.get("tiny-b"), monkeypatch)
        listed = (await say(fake, "/model"))["text"]
        assert "▶ tiny-a" in listed and "• tiny-b" in listed and "✗ broken" in listed
        assert "▶ tiny-b" in (await say(fake, "/model tiny-b"))["text"]
        assert "모델 (model): tiny-b" in (await say(fake, "/help"))["text"]
        reply = await say(fake, "/gen 긍정 아 정말", final=True)
        assert reply["text"].startswith("긍정 아 정말") and [r.model for r in b.requests] == ["tiny-b"] and not a.requests
        regenerated = fake.press(reply, reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
        await fake.wait_for(lambda: len(b.requests) == 2)  # the button keeps the result's model
        assert regenerated and not a.requests
        await say(fake, "/gen 긍정 아 model=tiny-a", final=True)  # once, by the knob
        assert [r.model for r in a.requests] == ["tiny-a"]
        unknown = (await say(fake, "/gen 긍정 아 model=nope"))["text"]
        assert "nope" in unknown and "tiny-a, tiny-b" in unknown
        assert "nope" in (await say(fake, "/model nope"))["text"]
        other = await say(fake, "/gen 부정 별로", final=True, chat=2002)  # other chats keep the default
        assert other["text"].startswith("부정 별로") and a.requests[-1].model == "tiny-a"


async def test_switching_is_for_admins_once_there_are_admins(tiny_dir, tmp_path, fake):
    settings = settings_with_models(tiny_dir, tmp_path, telegram={**tg(fake), "admin_user_ids": [CHAT]})
    async with models_core(settings) as core, telegram_running(core, fake):
        assert "관리자만" in (await say(fake, "/model tiny-b", chat=2002))["text"]
        assert "▶ tiny-a" in (await say(fake, "/model", chat=2002))["text"]  # the list is for everyone
        assert "▶ tiny-b" in (await say(fake, "/model tiny-b"))["text"]


# ---- Discord -----------------------------------------------------------------------------------------------------
async def test_discord_model_prefix_and_slash(tiny_dir, tmp_path, monkeypatch):
    async with models_core(settings_with_models(tiny_dir, tmp_path)) as core:
        bot = await start_discord_bot(core, text_channels=1, members=1)
        try:
            b = Recorder(core.served.get("tiny-b"), monkeypatch)
            with contextlib.suppress(commands.CommandInvokeError):
                await dpytest.message("!model tiny-b")
            assert "▶ tiny-b" in dpytest.get_message().content
            await dpytest.message("!gen 긍정 아 정말")
            await dpytest.empty_queue()
            assert [r.model for r in b.requests] == ["tiny-b"]
            interaction = FakeInteraction(channel_id=5)
            await slash(bot, interaction, "gen", prompt="아 정말", label="긍정", model="tiny-b")
            assert interaction.final()[0] == "edit" and b.requests[-1].model == "tiny-b"
            listing = FakeInteraction(channel_id=5)
            await slash(bot, listing, "model")
            assert "▶ tiny-a" in listing.final()[1]  # channel 5 never switched
        finally:
            await dpytest.empty_queue()


# ---- web ---------------------------------------------------------------------------------------------------------
async def test_web_api_and_page_choose_the_model(tiny_dir, tmp_path, monkeypatch):
    async with models_core(settings_with_models(tiny_dir, tmp_path)) as core:
        b = Recorder(core.served.get("tiny-b"), monkeypatch)
        async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as client:
            resp = await client.post("/api", json={"prompt": "긍정 아 정말", "model": "tiny-b"})
            assert resp.status == 200 and [r.model for r in b.requests] == ["tiny-b"]
            bad = await client.post("/api", json={"prompt": "긍정 아", "model": "nope"})
            assert bad.status == 422 and "tiny-a, tiny-b" in (await bad.json())["error"]
            page = await (await client.get("/")).text()
        config = json.loads(page.split("const CONFIG = ")[1].split(";\n")[0])
        assert config["model"] == "tiny-a" and [m["name"] for m in config["models"]] == ["tiny-a", "tiny-b"]
        assert "<title>감성 문장 생성</title>" in page  # not "KoGPT2" whatever is served


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_model_select_in_headless_chromium(tiny_dir, tmp_path, monkeypatch):
    async with models_core(settings_with_models(tiny_dir, tmp_path)) as core:
        b = Recorder(core.served.get("tiny-b"), monkeypatch)
        async with TestServer(create_app(core), host="127.0.0.1") as server, chromium_page(tmp_path / "p") as page:
            query = urllib.parse.urlencode({"label": "긍정", "prompt": "아 정말", "model": "tiny-b", "run": "1"})
            await page.goto(f"http://127.0.0.1:{server.port}/?{query}")
            await page.wait_for("document.getElementById('results').dataset.done === '1'")
            options = await page.evaluate("[...document.getElementById('model').options].map(o => o.value).join(',')")
    assert options == "tiny-a,tiny-b" and [r.model for r in b.requests] == ["tiny-b"]
