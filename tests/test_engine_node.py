"""The bot as an engine node: `/v1/completions` and `/v1/models` in-process, then two real processes end to end."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import make_settings, running_core
from fake_bot_api import FakeBotAPI, finished

from bot.web import create_app
from core.backends import start_backend
from core.grammar import parse_gen

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "node-token-123"
TG_TOKEN = "123456789:AAF-secret_TokenValue-xyz"


@pytest.fixture
def node_settings(tiny_dir, tmp_path):
    # fp32: the node's answer is compared with a local engine's for the same seed.
    return make_settings(tiny_dir, tmp_path, model={"quantize": "none"}, web={"api_token": TOKEN})


@pytest.fixture
async def node(node_settings):
    async with running_core(node_settings) as core:
        server = TestServer(create_app(core), host="127.0.0.1")
        await server.start_server()
        yield core, str(server.make_url("")).rstrip("/")
        await server.close()


async def test_models_lists_the_served_model_behind_the_token(node, tiny_dir):
    _, url = node
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/models") as resp:
            assert resp.status == 401 and "토큰" in (await resp.json())["error"]["message"]
        async with http.get(url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            data = (await resp.json())["data"]
    assert data[0]["id"] == str(tiny_dir) and data[0]["owned_by"] == "kogpt2-sentiment-bot"


async def test_unknown_or_unhonoured_fields_are_refused_by_name(node):
    _, url = node
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.post(url + "/v1/completions", json={"prompt": "긍정 아", "logprobs": 3, "foo": 1}) as resp:
            assert resp.status == 400
            message = (await resp.json())["error"]["message"]
        assert "foo" in message and "logprobs" in message and "지원하지 않습니다" in message
        async with http.post(url + "/v1/completions", json={"prompt": "긍정 아", "top_p": 2}) as resp:
            assert resp.status == 400 and "top_p" in (await resp.json())["error"]["message"]
        async with http.post(url + "/v1/completions", json={"prompt": "긍정 아", "model": "other"}) as resp:
            assert resp.status == 404


async def test_a_remote_backend_over_the_node_gives_the_local_engines_text(node, tiny_dir, tmp_path):
    core, url = node
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": url, "api_key": TOKEN})
    remote = await start_backend(settings)
    try:
        text = "긍정 아 정말 seed=11 n=2 min_length=14 max_length=18 no_repeat_ngram_size=2 top_k=20"
        over_http = await remote.generate(parse_gen(text, remote.defaults, remote.limits))
        streamed = [g async for g in remote.stream(parse_gen(text, remote.defaults, remote.limits))]
        local = await core.engine.generate(parse_gen(text, core.engine.defaults, core.engine.limits))
    finally:
        await remote.stop()
    assert over_http.continuations == local.continuations == streamed[-1].continuations
    assert over_http.seeds == local.seeds == (11, 12)
    assert streamed[-1].done and len(streamed) > 2  # it really streamed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


async def _wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):  # polls a starting process; the bound is only there so a broken start fails
            if proc.returncode is not None:
                raise AssertionError("the process exited while starting")
            try:
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not become healthy")


async def _metrics_with(url: str, frontend: str) -> str:
    series = f'bot_requests_total{{frontend="{frontend}",outcome="ok"}} 1.0'
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
            if series in text:
                return text
            await asyncio.sleep(0.05)
    raise AssertionError(f"{series} never appeared at {url}/metrics")


async def test_two_processes_serve_a_gen_across_v1_completions(tiny_dir, tmp_path):
    fake = await FakeBotAPI(TG_TOKEN, username="ThisBot").start()
    node_port, front_port = _free_port(), _free_port()
    node_url, front_url = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{front_port}"
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_WEB__PORT=str(node_port), BOT_WEB__API_TOKEN=TOKEN,
                 BOT_STORE__PATH=str(tmp_path / "node.sqlite3")))
    front = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_ENGINE__BACKEND="openai", BOT_ENGINE__URL=node_url,
                 BOT_ENGINE__API_KEY=TOKEN, BOT_WEB__PORT=str(front_port), BOT_TELEGRAM__TOKEN=TG_TOKEN,
                 BOT_TELEGRAM__BASE_URL=fake.base_url, BOT_TELEGRAM__BASE_FILE_URL=fake.file_url,
                 BOT_STORE__PATH=str(tmp_path / "front.sqlite3"), BOT_LIMITS__USER_INTERVAL_S="0"))
    try:
        await _wait_healthy(node_url, node)
        await _wait_healthy(front_url, front)
        await fake.wait_for(lambda: fake.called("getUpdates", status=None), timeout=60)
        message = fake.user_message(1001, "/gen 긍정 아 정말 seed=5 min_length=12 max_length=16")
        await fake.wait_for(lambda: any(finished(m) for m in fake.replies_to(message)), timeout=60)
        reply = fake.replies_to(message)[0]
        assert reply["text"].startswith("긍정 아 정말") and "seed=5" in reply["text"]
        # The node generated it for the engine-node API; the front end counted its own telegram request (recorded
        # as the reply's stream closes, so it is polled for).
        assert 'bot_requests_total{frontend="openai",outcome="ok"} 1.0' in await _metrics_with(node_url, "openai")
        front_metrics = await _metrics_with(front_url, "telegram")
        assert 'bot_remote_attempts_total{backend="openai",outcome="ok"} 1.0' in front_metrics
    finally:
        outputs = []
        for proc in (front, node):
            if proc.returncode is None:
                proc.terminate()
            outputs.append((await asyncio.wait_for(proc.communicate(), 60))[0].decode())
        await fake.close()
    assert front.returncode == 0 and node.returncode == 0, outputs
    assert all("Traceback" not in out for out in outputs), outputs
    assert TOKEN not in "".join(outputs)  # the shared token is never logged
