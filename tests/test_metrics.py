"""/metrics after real requests through the web API and the chat bots' core path, and the per-request log line."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import gen_request, make_settings, running_engine
from prometheus_client.parser import text_string_to_metric_families

from bot.web import create_app
from core.engine import Engine
from core.errors import RequestTimeout, UserError
from core.grammar import parse_gen
from core.service import BotCore


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


@pytest.fixture
async def small_core(tiny_dir, tmp_path):
    # One row at a time and one waiting request: a burst of long requests is refused as busy.
    settings = make_settings(tiny_dir, tmp_path, limits={"queue_size": 1, "max_batch_size": 1, "user_interval_s": 1000})
    async with running_engine(settings) as engine:
        core = BotCore.create(settings, engine)
        yield core
        core.store.close()


async def test_metrics_count_web_requests_by_outcome(small_core: BotCore):
    async with TestClient(TestServer(create_app(small_core), host="127.0.0.1")) as client:
        assert (await client.post("/api", json={"prompt": "긍정 아 정말", "max_length": 20})).status == 200
        assert (await client.post("/api", json={"prompt": "긍정 아 정말", "top_p": 1.5})).status == 422
        assert (await client.post("/api", data=b"{not json")).status == 400
        long = {"prompt": "부정 별로", "min_length": 60, "max_length": 60}
        burst = await asyncio.gather(*(client.post("/api", json=long) for _ in range(6)))
        statuses = [r.status for r in burst]
        assert set(statuses) <= {200, 429} and 429 in statuses

        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        scraped = samples(await resp.text())

    ok = 1 + statuses.count(200)
    assert value(scraped, "bot_requests_total", frontend="web", outcome="ok") == ok
    # A 422 or 400 is counted (the user asked) but never reached the model: no latency, no tokens.
    assert value(scraped, "bot_requests_total", frontend="web", outcome="user_error") == 2
    assert value(scraped, "bot_requests_total", frontend="web", outcome="busy") == statuses.count(429)
    assert value(scraped, "bot_requests_total", frontend="web", outcome="error") == 0
    assert value(scraped, "bot_requests_total", frontend="telegram", outcome="ok") == 0
    assert value(scraped, "bot_generation_seconds_count", frontend="web") == ok
    assert value(scraped, "bot_generated_tokens_total", frontend="web") > 0
    assert value(scraped, "bot_queue_depth") == 0
    steps = value(scraped, "bot_batch_size_count")
    assert steps > 0 and value(scraped, "bot_batch_size_bucket", le="1.0") == steps  # max_batch_size is 1


async def test_chat_front_ends_are_told_apart_and_followups_keep_their_origin(small_core: BotCore):
    core = small_core
    first = await core.engine.generate(gen_request(core, "긍정 아 정말 max_length=16", "telegram:42", "telegram:1"))
    with pytest.raises(UserError):
        gen_request(core, "긍정 아 정말 top_p=7", "telegram:42", "telegram:1")
    with pytest.raises(UserError):  # same user again within user_interval_s
        gen_request(core, "긍정 아 정말", "telegram:42", "telegram:1")
    await core.engine.generate(core.engine.prepare(core.followups.regenerate(core.followups.remember(first, 4))))
    await core.engine.generate(core.followups.continuation(core.followups.remember(first, 4), 0, core.engine.prepare, 128))
    await core.engine.generate(gen_request(core, "부정 별로 max_length=16", "discord:7", "discord:2"))
    await core.engine.generate(core.engine.prepare(parse_gen("긍정 아", core.engine.defaults, core.settings.limits)))

    scraped = samples(core.engine.telemetry.metrics.render()[0].decode())
    assert value(scraped, "bot_requests_total", frontend="telegram", outcome="ok") == 3
    assert value(scraped, "bot_requests_total", frontend="telegram", outcome="user_error") == 1
    assert value(scraped, "bot_requests_total", frontend="telegram", outcome="rate_limited") == 1
    assert value(scraped, "bot_requests_total", frontend="discord", outcome="ok") == 1
    assert value(scraped, "bot_requests_total", frontend="internal", outcome="ok") == 1
    assert value(scraped, "bot_requests_total", frontend="web", outcome="ok") == 0


async def test_timeouts_are_counted_with_their_latency(tiny_dir, tmp_path):
    settings = make_settings(tiny_dir, tmp_path, limits={"request_timeout_s": 0.01})
    async with running_engine(settings) as engine:
        slow = parse_gen("긍정 아 정말 min_length=128 max_length=128", engine.defaults, settings.limits)
        with pytest.raises(RequestTimeout):
            await engine.generate(engine.prepare(slow))
    scraped = samples(engine.telemetry.metrics.render()[0].decode())
    assert value(scraped, "bot_requests_total", frontend="internal", outcome="timeout") == 1
    assert value(scraped, "bot_generation_seconds_count", frontend="internal") == 1


async def test_one_info_line_per_request_without_user_text(core: BotCore, caplog: pytest.LogCaptureFixture):
    secret = "비밀문장XYZ"
    with caplog.at_level(logging.INFO, logger="core.requests"):
        result = await core.engine.generate(gen_request(core, f"긍정 {secret} max_length=24 seed=5", "telegram:987654321", "u1"))
        with pytest.raises(UserError):
            gen_request(core, f"긍정 {secret} top_k=0", "telegram:987654321", "u2")
    lines = [r for r in caplog.records if r.name == "core.requests"]
    assert [r.levelno for r in lines] == [logging.INFO, logging.INFO]
    ok, refused = lines
    message = ok.getMessage()
    for fragment in ("frontend=telegram", "outcome=ok", "max_length=24", "seed=5", f"new_tokens={result.new_tokens}", "latency_ms="):
        assert fragment in message
    assert ok.request["chat"] == refused.request["chat"] and len(ok.request["chat"]) == 8  # same chat, hashed
    assert "outcome=user_error" in refused.getMessage()
    for record in lines:
        text = record.getMessage()
        assert secret not in text and "987654321" not in text
        tail = result.continuations[0].strip()
        assert len(tail) < 6 or tail not in text  # no generated text either (a tiny tail could match by chance)


async def test_prompt_text_only_at_debug(core: BotCore, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.DEBUG, logger="core.requests"):
        await core.engine.generate(gen_request(core, "긍정 비밀문장XYZ max_length=16", "discord:5", "u1"))
    with_prompt = [r for r in caplog.records if "비밀문장XYZ" in r.getMessage()]
    assert with_prompt and all(r.levelno == logging.DEBUG for r in with_prompt)


async def test_requests_refused_while_stopping_are_counted_as_shutdown(engine: Engine):
    await engine.drain(0)
    with pytest.raises(UserError):  # ShuttingDown: the bot is restarting
        await engine.generate(engine.prepare(parse_gen("긍정 아 정말", engine.defaults, engine.limits)))
    scraped = samples(engine.telemetry.metrics.render()[0].decode())
    assert value(scraped, "bot_requests_total", frontend="internal", outcome="shutdown") == 1
