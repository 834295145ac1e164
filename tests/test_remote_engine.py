"""The remote backend against a fake vLLM: request bodies as vLLM documents them, streaming, refusals, retries."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import make_settings
from fake_vllm import FakeVLLM
from helpers import ROOT, closed_url, subprocess_env

from core.backends import start_backend
from core.errors import BusyError, EngineUnavailable, RequestTimeout, UserError
from core.grammar import parse_gen
from core.remote_engine import RemoteEngine


@pytest.fixture
async def vllm():
    server = await FakeVLLM(api_key="sk-test-key").start()
    yield server
    await server.close()


def remote_settings(tiny_dir, tmp_path, url: str, **engine: object):
    return make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": url, "api_key": "sk-test-key",
                                                       "retries": 2, **engine})


@pytest.fixture
async def remote(tiny_dir, tmp_path, vllm):
    engine = await start_backend(remote_settings(tiny_dir, tmp_path, vllm.url))
    assert isinstance(engine, RemoteEngine)
    yield engine
    await engine.stop()


def req(engine: RemoteEngine, text: str):
    return parse_gen(text, engine.defaults, engine.limits)


async def test_each_candidate_is_one_seeded_vllm_request_with_lengths_in_new_tokens(remote, vllm):
    r = req(remote, "긍정 아 정말 seed=7 n=2 min_length=12 max_length=20 top_k=5 top_p=0.9 temperature=0.7 rp=1.2")
    prompt = remote.prepare(r).prompt_ids
    result = await remote.generate(r)
    assert result.done and result.seeds == (7, 8)
    assert result.continuations == (" 재밌다 seed7", " 재밌다 seed8")
    assert result.new_tokens == 6  # the server's usage.completion_tokens
    bodies = sorted(vllm.samples, key=lambda b: b["seed"])
    assert bodies[0] == {
        "model": "kogpt2", "prompt": list(prompt), "max_tokens": 20 - len(prompt), "min_tokens": 12 - len(prompt),
        "temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.2, "seed": 7, "n": 1, "stream": False,
    }
    assert bodies[1]["seed"] == 8
    assert all(h["Authorization"] == "Bearer sk-test-key" for h in vllm.headers)


async def test_min_tokens_is_zero_when_the_prompt_already_reaches_min_length(remote, vllm):
    await remote.generate(req(remote, "긍정 아 정말 재밌다 최고 min_length=1 max_length=30 seed=1"))
    assert vllm.samples[0]["min_tokens"] == 0


async def test_stream_yields_the_text_as_it_arrives(remote, vllm):
    parts = [g async for g in remote.stream(req(remote, "긍정 아 정말 seed=3"))]
    assert [p.done for p in parts] == [False, False, True]
    assert parts[0].continuations == (" 재밌다",) and parts[-1].continuations == (" 재밌다 seed3",)
    assert vllm.samples[0]["stream"] is True


async def test_no_repeat_ngram_size_is_refused_by_name_and_never_sent(remote, vllm):
    with pytest.raises(UserError, match="no_repeat_ngram_size.*지원하지 않습니다") as caught:
        await remote.generate(req(remote, "긍정 아 정말 no_repeat_ngram_size=2"))
    assert "cannot honour no_repeat_ngram_size" in str(caught.value)
    assert vllm.samples == []


async def test_5xx_and_dropped_connections_are_retried(remote, vllm):
    vllm.failures = [503, "drop"]
    result = await remote.generate(req(remote, "긍정 아 정말 seed=4"))
    assert result.continuations == (" 재밌다 seed4",) and len(vllm.samples) == 3
    metrics = remote.telemetry.metrics.render()[0].decode()
    assert 'bot_remote_attempts_total{backend="openai",outcome="retry"} 2.0' in metrics
    assert 'bot_remote_attempts_total{backend="openai",outcome="ok"} 1.0' in metrics


async def test_5xx_after_the_retries_is_a_clear_error(remote, vllm):
    vllm.failures = [500, 502, 503]
    with pytest.raises(EngineUnavailable, match="연결할 수 없습니다"):
        await remote.generate(req(remote, "긍정 아 정말"))
    assert len(vllm.samples) == 3


async def test_remote_429_is_our_busy(remote, vllm):
    vllm.failures = [429]
    with pytest.raises(BusyError, match="바쁩니다"):
        await remote.generate(req(remote, "긍정 아 정말"))
    assert len(vllm.samples) == 1  # busy is not retried: that would only add load


async def test_a_remote_400_is_the_users_error_with_the_remotes_reason(remote, vllm):
    vllm.failures = [400]
    with pytest.raises(UserError, match="거절했습니다: fake failure 400"):
        await remote.generate(req(remote, "긍정 아 정말"))


async def test_a_remote_that_never_answers_times_out(tiny_dir, tmp_path, vllm):
    engine = await start_backend(remote_settings(tiny_dir, tmp_path, vllm.url, timeout_s=0.2, model="kogpt2"))
    vllm.failures = ["hang"]
    try:
        with pytest.raises(RequestTimeout, match="초 안에 답하지"):
            await engine.generate(req(engine, "긍정 아 정말"))
    finally:
        await engine.stop()


async def test_health_says_whether_the_remote_is_reachable(tiny_dir, tmp_path, remote):
    assert (await remote.health())["ok"] is True
    engine = await start_backend(remote_settings(tiny_dir, tmp_path, closed_url(), retries=0, model="kogpt2"))
    try:
        health = await engine.health()
        assert health["ok"] is False and health["remote"] == "unreachable"
        with pytest.raises(EngineUnavailable):
            await engine.generate(req(engine, "긍정 아 정말"))
    finally:
        await engine.stop()


async def test_prompt_limits_are_checked_before_anything_is_sent(remote, vllm):
    with pytest.raises(UserError, match="max_length"):
        await remote.generate(req(remote, "긍정 " + "아 정말 " * 12 + "max_length=5 min_length=1"))
    assert vllm.samples == []


def test_openai_backend_needs_a_url(tiny_dir, tmp_path):
    from core.settings import SettingsError

    with pytest.raises(SettingsError, match="engine.url|url"):
        make_settings(tiny_dir, tmp_path, engine={"backend": "openai"})


async def test_the_api_key_can_come_from_a_mounted_file(tiny_dir, tmp_path, vllm):
    key_file = tmp_path / "engine_key"
    key_file.write_text("sk-test-key\n")
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": vllm.url + "/v1",
                                                           "api_key_file": str(key_file)})
    assert "sk-test-key" not in repr(settings.engine)  # never echoed
    engine = await start_backend(settings)
    try:
        await engine.generate(req(engine, "긍정 아 정말 seed=2"))
    finally:
        await engine.stop()
    assert vllm.headers[0]["Authorization"] == "Bearer sk-test-key"


async def test_a_tokenizer_json_file_can_count_the_prompt(tiny_dir, tmp_path, vllm):
    settings = make_settings(tiny_dir, tmp_path, model={"pretrained": "skt/kogpt2-base-v2"},  # unreachable here
                             engine={"backend": "openai", "url": vllm.url, "api_key": "sk-test-key",
                                     "tokenizer": str(tiny_dir / "tokenizer.json")})
    engine = await start_backend(settings)
    try:
        result = await engine.generate(req(engine, "긍정 아 정말 seed=2"))
    finally:
        await engine.stop()
    assert result.continuations == (" 재밌다 seed2",)


async def test_outcomes_are_counted_per_front_end(remote, vllm):
    await remote.generate(req(remote, "긍정 아 정말"))
    vllm.failures = [429]
    with pytest.raises(BusyError):
        await remote.generate(req(remote, "긍정 아 정말"))
    vllm.failures = [500, 500, 500]
    with pytest.raises(EngineUnavailable):
        await remote.generate(req(remote, "긍정 아 정말"))
    metrics = remote.telemetry.metrics.render()[0].decode()
    for outcome in ("ok", "busy", "error"):
        assert f'bot_requests_total{{frontend="internal",outcome="{outcome}"}} 1.0' in metrics


async def test_check_runs_through_the_remote_backend(tiny_dir, tmp_path, vllm):
    import asyncio
    import sys

    env = subprocess_env(BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_ENGINE__BACKEND="openai", BOT_ENGINE__URL=vllm.url,
                         BOT_ENGINE__API_KEY="sk-test-key", BOT_STORE__PATH=str(tmp_path / "s.db"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--check", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert "check: ok" in out.decode() and "seed0" in out.decode() and "sk-test-key" not in out.decode() + err.decode()


async def test_best_of_is_refused_by_name_and_a_chat_default_does_not_apply(tiny_dir, tmp_path, vllm):
    settings = make_settings(tiny_dir, tmp_path, generation={"best_of": 4},
                             engine={"backend": "openai", "url": vllm.url, "api_key": "sk-test-key", "retries": 0})
    engine = await start_backend(settings)
    try:
        assert engine.defaults.best_of == 1
        with pytest.raises(UserError, match="best_of"):
            engine.prepare(req(engine, "긍정 아 정말 best_of=4"))
        result = await engine.generate(engine.prepare(req(engine, "긍정 아 정말 seed=3")))
        assert len(result.continuations) == 1 and len(vllm.samples) == 1
    finally:
        await engine.stop()


async def test_healthz_and_api_say_when_the_remote_is_down(tiny_dir, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from bot.web import create_app
    from core.service import BotCore

    settings = remote_settings(tiny_dir, tmp_path, closed_url(), retries=0, model="kogpt2")
    engine = await start_backend(settings)
    bot_core = BotCore.create(settings, engine)
    try:
        async with TestClient(TestServer(create_app(bot_core), host="127.0.0.1")) as client:
            health = await client.get("/healthz")
            body = await health.json()
            assert health.status == 503 and body["engine"]["remote"] == "unreachable" and "error" in body
            api = await client.post("/api", json={"prompt": "긍정 아 정말"})
            assert api.status == 503 and "연결할 수 없습니다" in (await api.json())["error"]
    finally:
        bot_core.store.close()
        await engine.stop()


async def test_each_sample_names_the_person_it_is_for(remote, vllm):
    """OpenAI's `user` field carries the asker's key, so a node behind a token keeps people's fair shares apart."""
    r = dataclasses.replace(req(remote, "긍정 아 정말 seed=7 n=2"), user="telegram:7")
    await remote.generate(r)
    assert [b["user"] for b in vllm.samples] == ["telegram:7", "telegram:7"]
    await remote.generate(req(remote, "긍정 아 정말 seed=7"))  # nobody named (scripts, --check): no field
    assert "user" not in vllm.samples[-1]
