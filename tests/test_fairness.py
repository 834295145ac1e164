"""One client does not starve everyone (issue 19, item 1): the engine's fair shares, the per-user cap, abandoned
requests, an honest /healthz, and who a web client is. Step-driven: a gate stalls the model, nothing is timed."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import gen_request, make_settings, running_core, shared_steps

from bot.client_address import client_address
from bot.healthcheck import healthy
from bot.web import create_app
from bot.web_server import GuardedRunner
from core.conversation import Conversation, Reply, Style
from core.engine import Engine
from core.errors import BusyError
from core.gpt2_model import as_transformers
from core.grammar import parse_gen
from core.model_loading import load_model
from core.service import BotCore


def gated_engine(settings, gate: threading.Event, entered: threading.Event) -> Engine:
    """The real model behind a gate: every forward pass waits for `gate` (after setting `entered`)."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            entered.set()
            gate.wait()
            return self.inner(**kwargs)

    loaded = load_model(settings.model)
    # transformers' forward behind the wrapper (the engine's batch for a model it does not know)
    return Engine(dataclasses.replace(loaded, model=Wrapped(as_transformers(loaded.model))), settings)


async def until(condition, what: str) -> None:
    """Wait for a condition the system must reach (a generous bound only catches a hang; nothing is timed)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def prepared(engine: Engine, text: str, user: str):
    request = parse_gen(text, engine.defaults, engine.limits)
    return engine.prepare(dataclasses.replace(request, user=user))


# ---- the engine ---------------------------------------------------------------------------------------------------
async def test_a_second_user_is_answered_before_the_first_users_backlog(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"max_batch_size": 2})
    async with running_core(settings) as core:
        engine = core.engine
        finished: list[str] = []
        heavy = "긍정 아 정말 n=2 min_length=40 max_length=40"
        jobs = {f"A{i}": prepared(engine, heavy, "flood") for i in range(4)}
        jobs["B"] = prepared(engine, "부정 별로 min_length=40 max_length=40", "small")
        tasks = []
        for name, job in jobs.items():
            task = asyncio.ensure_future(engine.generate(job))
            task.add_done_callback(lambda _, name=name: finished.append(name))
            tasks.append(task)
        await asyncio.gather(*tasks)
        # First come first served would answer B fifth, after every request of the flood.
        assert finished.index("B") <= 1 + finished.index("A0"), finished
        assert finished.index("B") < finished.index("A1"), finished


async def test_a_users_queued_rows_are_capped_with_a_sentence_naming_the_cap(tiny_dir, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    settings = make_settings(tiny_dir, tmp_path, limits={"max_queued_rows_per_user": 4})
    engine = gated_engine(settings, gate, entered)
    engine.start()
    try:
        first = asyncio.ensure_future(engine.generate(prepared(engine, "긍정 아 n=2", "flood")))
        await until(entered.is_set, "the worker took the first request")
        queued = [asyncio.ensure_future(engine.generate(prepared(engine, "긍정 아 n=2", "flood"))) for _ in range(2)]
        await until(lambda: engine.queue_depth == 2, "two requests wait")
        with pytest.raises(BusyError, match="4"):
            await engine.generate(prepared(engine, "긍정 아", "flood"))
        other = asyncio.ensure_future(engine.generate(prepared(engine, "부정 별로 n=3", "someone else")))
        await until(lambda: engine.queue_depth == 3, "another user's request waits")
    finally:
        gate.set()
    try:
        results = await asyncio.gather(first, *queued, other)
        assert [len(r.continuations) for r in results] == [2, 2, 2, 3]
    finally:
        await engine.stop()


class _Recorder:
    """A chat's ReplyTarget that keeps what it was sent."""

    style = Style(limit=4096)
    edit_interval = 0.0

    def __init__(self):
        self.replies: list[Reply] = []

    async def send(self, reply: Reply) -> None:
        self.replies.append(reply)

    edit = send

    async def typing(self) -> None:
        pass

    def spare(self) -> bool:
        return True


async def test_a_chat_user_over_the_cap_is_told_the_cap(tiny_dir, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    settings = make_settings(tiny_dir, tmp_path, limits={"max_queued_rows_per_user": 2, "user_interval_s": 0})
    engine = gated_engine(settings, gate, entered)
    engine.start()
    core = BotCore.create(settings, engine)
    conversation = Conversation(core)
    ask = lambda: gen_request(core, "긍정 아", chat="telegram:-100", user="telegram:7")  # noqa: E731
    try:
        running = [asyncio.ensure_future(engine.generate(ask()))]
        await until(entered.is_set, "the worker took the first request")
        running += [asyncio.ensure_future(engine.generate(ask())) for _ in range(2)]
        await until(lambda: engine.queue_depth == 2, "two requests wait")
        target = _Recorder()
        assert await conversation.reply(target, ask()) is None
        assert target.replies[-1].error and "2" in target.replies[-1].text and "사용자당" in target.replies[-1].text
    finally:
        gate.set()
    try:
        await asyncio.gather(*running)
    finally:
        await engine.stop()
        core.store.close()


def test_the_conversation_tells_the_engine_who_asked(core: BotCore):
    assert gen_request(core, "긍정 아", chat="telegram:-100", user="telegram:7").request.user == "telegram:7"


# ---- the web ------------------------------------------------------------------------------------------------------
@pytest.fixture
async def gated_web(tiny_dir, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    settings = make_settings(tiny_dir, tmp_path, limits={"max_queued_rows_per_user": 2, "queue_size": 3},
                             web={"trusted_proxies": ["127.0.0.1"]})
    engine = gated_engine(settings, gate, entered)
    engine.start()
    core = BotCore.create(settings, engine)
    try:
        yield core, gate, entered
    finally:
        gate.set()
        await engine.stop()
        core.store.close()


async def test_web_clients_get_their_own_share_and_healthz_says_saturated(gated_web):
    core, gate, entered = gated_web
    engine = core.engine
    async with TestClient(TestServer(create_app(core))) as client:
        def post(address: str, body: dict):
            return asyncio.ensure_future(client.post("/api", json=body, headers={"X-Forwarded-For": address}))

        first = post("203.0.113.1", {"prompt": "긍정 아"})
        await until(entered.is_set, "the worker took the first request")
        waiting = [post("203.0.113.1", {"prompt": "긍정 아"}) for _ in range(2)]
        await until(lambda: engine.queue_depth == 2, "two requests wait")
        refused = await client.post("/api", json={"prompt": "긍정 아"}, headers={"X-Forwarded-For": "203.0.113.1"})
        assert refused.status == 429 and "2" in (await refused.json())["error"]
        health = await client.get("/healthz")
        assert health.status == 200 and (await health.json())["status"] == "ok"
        other = post("198.51.100.9", {"prompt": "부정 별로"})  # another client behind the same proxy
        await until(lambda: engine.queue_depth == 3, "the other client's request waits")
        health = await client.get("/healthz")
        body = await health.json()
        assert health.status == 503 and body["status"] == "saturated" and body["engine"]["saturated"] is True
        assert await asyncio.to_thread(healthy, str(client.make_url("/healthz")))  # the container check: alive
        gate.set()
        for response in await asyncio.gather(first, *waiting, other):
            assert response.status == 200, await response.text()


async def test_a_client_that_goes_away_stops_its_generation(tiny_dir, tmp_path):
    """Regression: a non-streaming /api request whose client disconnected was still generated to the end."""
    gate, entered = threading.Event(), threading.Event()
    settings = make_settings(tiny_dir, tmp_path)
    engine = gated_engine(settings, gate, entered)
    engine.start()
    core = BotCore.create(settings, engine)
    runner = GuardedRunner(create_app(core), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    registry = engine.telemetry.metrics.registry

    def cancelled() -> float:
        return registry.get_sample_value("bot_requests_total", {"frontend": "web", "outcome": "cancelled"})
    try:
        body = b'{"prompt": "\xea\xb8\x8d\xec\xa0\x95 \xec\x95\x84", "n": 3, "min_length": 100, "max_length": 100}'
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await until(entered.is_set, "the engine took the request")
        writer.close()
        await until(lambda: cancelled() == 1, "the engine heard the client left")
        gate.set()
        async with TestClient(TestServer(create_app(core))) as client:
            response = await client.post("/api", json={"prompt": "부정 별로"})
            assert response.status == 200
        assert shared_steps(engine, 1) == 0  # the abandoned request's 3 rows were never decoded
        assert engine.queue_depth == 0 and not engine._jobs
    finally:
        gate.set()
        await runner.cleanup()
        await engine.stop()
        core.store.close()


# ---- who a web client is ------------------------------------------------------------------------------------------
def test_forwarded_for_is_believed_only_from_trusted_proxies():
    import ipaddress

    proxies = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert client_address("203.0.113.5", ["1.2.3.4"], proxies) == "203.0.113.5"  # not a proxy: its header is noise
    assert client_address("10.0.0.2", ["1.2.3.4"], proxies) == "1.2.3.4"
    # A client prepending its own entry cannot choose its key: the rightmost address not a proxy's counts.
    assert client_address("10.0.0.2", ["6.6.6.6, 1.2.3.4", "10.0.0.3"], proxies) == "1.2.3.4"
    assert client_address("::1", ["2001:db8::1"], proxies) == "2001:db8::1"
    assert client_address("10.0.0.2", ["not-an-address"], proxies) == "10.0.0.2"
    assert client_address("10.0.0.2", [], proxies) == "10.0.0.2"
    assert client_address(None, [], proxies) == "unknown"


def test_trusted_proxies_must_be_addresses(tiny_dir, tmp_path):
    from core.settings import SettingsError

    with pytest.raises(SettingsError, match="trusted_proxies"):
        make_settings(tiny_dir, tmp_path, web={"trusted_proxies": ["proxy.local"]})
