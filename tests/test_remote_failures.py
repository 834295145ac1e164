"""A remote that fails says what failed: gone mid-request, draining, refusing the key, not serving the model; and a
remote that misbehaves is bounded: admission, answer size, events per request, one deadline, validated answers."""

from __future__ import annotations

import asyncio
import gc
import json
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import make_settings
from fake_vllm import FakeVLLM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.web import create_app
from core import openai_wire, remote_engine
from core.backend import BUSY
from core.backends import start_backend
from core.errors import BusyError, EngineUnavailable, ModelLoadError, RequestTimeout, UserError
from core.grammar import parse_gen
from core.remote_engine import KEY_REFUSED, MALFORMED, UNREACHABLE, RemoteEngine
from core.service import BotCore

KEY = "sk-test-key"


@pytest.fixture(autouse=True)
def quick_probe(monkeypatch):
    # A probe every 50 ms while requests are in flight (1 s when serving): the tests wait for events, not time.
    monkeypatch.setattr(remote_engine, "PROBE_BUSY_S", 0.05)


@pytest.fixture
async def vllm():
    server = await FakeVLLM(api_key=KEY).start()
    yield server
    await server.close()


async def remote_over(tiny_dir, tmp_path, url: str, limits: dict | None = None, **engine: object) -> RemoteEngine:
    settings = make_settings(tiny_dir, tmp_path, limits=limits or {},
                             engine={"backend": "openai", "url": url, "api_key": KEY, "retries": 0, **engine})
    return await start_backend(settings)


@pytest.fixture
async def remote(tiny_dir, tmp_path, vllm):
    engine = await remote_over(tiny_dir, tmp_path, vllm.url)
    yield engine
    await engine.stop()


def req(engine: RemoteEngine, text: str = "긍정 아 정말"):
    return parse_gen(text, engine.defaults, engine.limits)


async def arrived(vllm: FakeVLLM, count: int) -> None:
    while len(vllm.samples) < count:
        await asyncio.sleep(0.01)


async def test_a_remote_going_away_mid_request_is_told_as_restarting_not_as_a_timeout(remote, vllm):
    vllm.failures = ["hang"]  # the request is taken and never answered, as vLLM stopped with SIGTERM
    pending = asyncio.ensure_future(remote.generate(req(remote)))
    await arrived(vllm, 1)
    await vllm.stop_listening()
    with pytest.raises(EngineUnavailable) as caught:
        await asyncio.wait_for(pending, 30)  # the request's own timeout is 60 s
    assert str(caught.value) == UNREACHABLE and "max_length" not in str(caught.value)
    assert "restarting" in str(caught.value)
    assert (await remote.health())["ok"] is False


async def test_a_draining_remote_fails_requests_in_flight_and_healthz_says_so(remote, vllm):
    vllm.failures = ["hang"]
    pending = asyncio.ensure_future(remote.generate(req(remote)))
    await arrived(vllm, 1)
    vllm.health_status = 503  # vLLM's /health while it drains or its engine died
    with pytest.raises(EngineUnavailable, match="다시 시작하는 중이거나"):
        await asyncio.wait_for(pending, 30)
    health = await remote.health()
    assert health["ok"] is False and health["remote"] == "draining"
    vllm.health_status = 200  # back: the next probe says so, and requests go through again
    while not (await remote.health())["ok"]:
        await asyncio.sleep(0.05)
    assert (await remote.generate(req(remote, "긍정 아 정말 seed=1"))).continuations == (" 재밌다 seed1",)


async def test_a_refused_api_key_is_named_in_healthz_and_in_the_reply(tiny_dir, tmp_path, vllm):
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": vllm.url, "api_key": "sk-wrong"})
    engine = await start_backend(settings)
    core = BotCore.create(settings, engine)
    try:
        async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as client:
            health = await client.get("/healthz")
            body = await health.json()
            assert health.status == 503 and body["engine"]["remote"] == "key refused"
            assert body["error"] == KEY_REFUSED and "refused the API key" in KEY_REFUSED
            api = await client.post("/api", json={"prompt": "긍정 아 정말"})
            assert api.status == 503 and (await api.json())["error"] == KEY_REFUSED
    finally:
        core.store.close()
        await engine.stop()
    assert "sk-wrong" not in json.dumps(body)


async def test_a_model_the_remote_does_not_serve_stops_the_start_with_one_sentence(tiny_dir, tmp_path, vllm):
    with pytest.raises(ModelLoadError) as caught:
        await remote_over(tiny_dir, tmp_path, vllm.url, model="kogpt2-wrong")
    message = str(caught.value)
    assert "kogpt2-wrong" in message and "it serves: kogpt2" in message and "\n" not in message


async def test_two_timeouts_together_leave_no_unretrieved_task_exception(tiny_dir, tmp_path, vllm):
    engine = await remote_over(tiny_dir, tmp_path, vllm.url, limits={"request_timeout_s": 0.3}, timeout_s=0.3)
    vllm.failures = ["hang", "hang"]
    loop = asyncio.get_running_loop()
    seen: list[dict] = []
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        results = await asyncio.gather(engine.generate(req(engine)), engine.generate(req(engine)),
                                       return_exceptions=True)
        assert all(isinstance(r, RequestTimeout) for r in results)
        assert "max_length" not in str(results[0])
        await engine.stop()
        gc.collect()
        await asyncio.sleep(0)
        assert seen == []
    finally:
        loop.set_exception_handler(None)


# ---- issue 19: bounds, admission, the cached probe, validation ---------------------------------------------------


async def test_queue_size_admits_as_the_local_engine_does(tiny_dir, tmp_path, vllm):
    engine = await remote_over(tiny_dir, tmp_path, vllm.url, limits={"queue_size": 2})
    vllm.failures = ["hang", "hang"]
    try:
        held = [asyncio.ensure_future(engine.generate(req(engine))) for _ in range(2)]
        await arrived(vllm, 2)
        assert (await engine.health())["saturated"] is True
        with pytest.raises(BusyError) as refused:
            await engine.generate(req(engine))
        assert str(refused.value) == BUSY and len(vllm.samples) == 2  # refused here, not sent
        metrics = engine.telemetry.metrics.render()[0].decode()
        assert 'bot_requests_total{frontend="internal",outcome="busy"} 1.0' in metrics
    finally:
        await engine.stop()
        await asyncio.gather(*held, return_exceptions=True)


async def test_healthz_answers_from_the_cached_probe(tiny_dir, tmp_path, vllm):
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": vllm.url, "api_key": KEY})
    engine = await start_backend(settings)
    core = BotCore.create(settings, engine)
    try:
        asked = vllm.model_gets
        async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as client:
            for _ in range(30):
                assert (await client.get("/healthz")).status == 200
        assert vllm.model_gets - asked <= 1  # the background probe, idle: one look per PROBE_IDLE_S
    finally:
        core.store.close()
        await engine.stop()


async def test_an_answer_larger_than_the_request_can_need_is_refused(remote, vllm):
    vllm.answer = {"choices": [{"index": 0, "text": "가" * 3_000_000, "finish_reason": "length"}]}
    with pytest.raises(EngineUnavailable) as caught:
        await remote.generate(req(remote, "긍정 아 정말 max_length=12"))
    assert str(caught.value) == MALFORMED


async def test_an_event_stream_past_the_token_budget_is_cut_off(remote, vllm):
    vllm.failures = ["flood"]  # 100,000 events answering max_tokens of a few tokens
    parts = []
    with pytest.raises(EngineUnavailable, match="읽을 수 없습니다"):
        async for part in remote.stream(remote.prepare(req(remote, "긍정 아 정말 max_length=12"))):
            parts.append(part)
    assert len(parts) <= 12 + openai_wire.EXTRA_EVENTS


async def test_one_deadline_covers_every_attempt(tiny_dir, tmp_path, vllm):
    engine = await remote_over(tiny_dir, tmp_path, vllm.url, limits={"request_timeout_s": 0.5}, timeout_s=60,
                               retries=10)
    vllm.failures = ["hang"] * 3
    try:
        with pytest.raises(RequestTimeout, match="초 안에 답하지"):
            await asyncio.wait_for(engine.generate(req(engine)), 30)
    finally:
        await engine.stop()


async def test_large_answers_are_parsed_off_the_event_loop(monkeypatch):
    threads = []
    real = json.loads
    monkeypatch.setattr(openai_wire.json, "loads", lambda data: (threads.append(threading.current_thread()),
                                                                 real(data))[1])
    await openai_wire.parse_json(json.dumps({"text": "가" * openai_wire.PARSE_IN_THREAD_BYTES}).encode())
    await openai_wire.parse_json(b'{"text": "short"}')
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()


@pytest.mark.parametrize("answer", [
    {"choices": [{"index": 0, "text": None, "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "text": "가", "finish_reason": "stop"}], "usage": {"completion_tokens": -3}},
    {"choices": [{"index": 0, "text": "가", "finish_reason": "stop"}], "usage": {"completion_tokens": 10**18}},
    {"choices": "가"},
    {"choices": []},
    [1, 2, 3],
])
async def test_a_badly_shaped_answer_is_a_clear_error_never_a_500(tiny_dir, tmp_path, vllm, answer):
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": vllm.url, "api_key": KEY})
    engine = await start_backend(settings)
    core = BotCore.create(settings, engine)
    vllm.answer = answer
    try:
        async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as client:
            api = await client.post("/api", json={"prompt": "긍정 아 정말"})
            body = await api.json()
        assert api.status == 503 and body["error"] == MALFORMED and "None" not in body["error"]
    finally:
        core.store.close()
        await engine.stop()


class _Tokenizer:
    eos_token_id = 1

    def __len__(self) -> int:
        return 100

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}

    def convert_tokens_to_ids(self, token):
        return 3

    def convert_ids_to_tokens(self, index):
        return "x"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                                      max_size=4), max_leaves=12)
completion_like = st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries(
    {"index": json_values, "text": json_values, "logprobs": json_values | st.fixed_dictionaries(
        {"tokens": json_values, "token_logprobs": st.lists(st.floats() | st.none(), max_size=4)})}), max_size=3),
    "usage": json_values | st.fixed_dictionaries({"completion_tokens": st.integers()})})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_values | completion_like, logprobs=st.booleans())
def test_any_answer_is_read_or_refused_with_the_sentence(tiny_dir, tmp_path, payload, logprobs):
    engine = RemoteEngine(make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": "http://x"}),
                          _Tokenizer())
    engine.logprobs = logprobs
    try:
        candidate = engine._read_candidate(payload, budget=8)
    except EngineUnavailable as exc:
        assert str(exc) == MALFORMED
    except openai_wire.WireError:
        pass  # the caller turns it into MALFORMED
    else:
        assert isinstance(candidate.text, str) and 0 <= candidate.count <= 9


async def test_a_failing_row_stops_its_sibling_rows(remote, vllm):
    vllm.failures = [400, "hang"]  # one row is refused while the other is still waiting for the remote
    with pytest.raises(UserError, match="거절했습니다"):
        await remote.generate(req(remote, "긍정 아 정말 n=2"))

    def rows_left() -> list:
        return [t for t in asyncio.all_tasks() if "_candidate" in repr(t.get_coro())]

    for _ in range(100):
        if not rows_left():
            break
        await asyncio.sleep(0)
    assert rows_left() == []


async def test_a_reader_cancelled_while_waiting_leaves_nothing_pending(remote, vllm):
    vllm.failures = ["hang"]
    stream = remote.stream(remote.prepare(req(remote)))
    reader = asyncio.ensure_future(anext(stream))
    await arrived(vllm, 1)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader

    def left() -> list:
        return [t for t in asyncio.all_tasks() if "Queue.get" in repr(t.get_coro()) or "_run" in repr(t.get_coro())]

    for _ in range(100):
        if not left():
            break
        await asyncio.sleep(0)
    assert left() == [] and remote.queue_depth == 0
    metrics = remote.telemetry.metrics.render()[0].decode()
    assert 'bot_requests_total{frontend="internal",outcome="cancelled"} 1.0' in metrics


async def test_python_m_bot_says_which_models_the_remote_serves(tiny_dir, tmp_path, vllm):
    import os
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    env.update(HF_HUB_OFFLINE="1", BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_ENGINE__BACKEND="openai",
               BOT_ENGINE__URL=vllm.url, BOT_ENGINE__API_KEY=KEY, BOT_ENGINE__MODEL="kogpt2-wrong",
               BOT_STORE__PATH=str(tmp_path / "s.db"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--check", cwd=Path(__file__).resolve().parents[1], env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode != 0
    assert "it serves: kogpt2" in err.decode() and "Traceback" not in err.decode()
