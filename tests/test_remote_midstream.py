"""A remote that fails after some text was shown: the text cannot be taken back, so there is no retry (a retry
would show the start again, duplicated); the user gets one clear error instead."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from conftest import make_settings
from fake_backend import Collecting

from core.backends import start_backend
from core.conversation import Conversation, Who
from core.errors import EngineUnavailable
from core.grammar import parse_gen


class CutOff:
    """An OpenAI-style server whose completion streams one piece of text, then drops the connection."""

    def __init__(self):
        self.calls = 0
        self.app = web.Application()
        self.app.add_routes([web.get("/v1/models", self.models), web.post("/v1/completions", self.completions)])

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "kogpt2", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "text_completion", "model": "kogpt2",
                 "choices": [{"index": 0, "text": " 재밌다", "logprobs": None, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        request.transport.close()
        return response


@pytest.fixture
async def cut_off():
    server = CutOff()
    runner = web.AppRunner(server.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield server
    await runner.cleanup()


async def test_no_retry_once_text_was_shown(tiny_dir, tmp_path, cut_off):
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": cut_off.url, "retries": 2})
    engine = await start_backend(settings)
    try:
        before = cut_off.calls  # the backend may probe the server at start
        prepared = engine.prepare(parse_gen("긍정 아 정말", engine.defaults, engine.limits))
        shown = []
        with pytest.raises(EngineUnavailable):
            async for gen in engine.stream(prepared):
                shown.append(gen.continuations[0])
        assert cut_off.calls == before + 1  # not retried
        assert shown and all(text.count("재밌다") == 1 for text in shown)
    finally:
        await engine.stop()


async def test_the_user_sees_the_text_then_one_error(tiny_dir, tmp_path, cut_off):
    from core.service import BotCore

    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": cut_off.url, "retries": 2})
    engine = await start_backend(settings)
    core = BotCore.create(settings, engine)
    try:
        talk, target = Conversation(core), Collecting(edit_interval=0)
        before = cut_off.calls
        assert await talk.reply(target, talk.from_text("긍정 아 정말", Who("telegram:1", None))) is None
        assert cut_off.calls == before + 1
        assert target.calls[-1][1].error and "재밌다" not in target.calls[-1][1].text
    finally:
        core.store.close()
        await engine.stop()
