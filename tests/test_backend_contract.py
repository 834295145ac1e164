"""The backend contract (core/backend.py), the same tests against every backend: the local engine over the tiny model,
the remote backend over the fake vLLM, and the remote backend over this bot's own engine node.

Where a backend cannot rerank (a remote without log-probabilities), the contract is that it says so — /help's and
/healthz's notice, and best_of refused by name — never that it samples once in silence.
"""

from __future__ import annotations

import contextlib

import pytest
from aiohttp.test_utils import TestServer
from conftest import make_settings, running_core, running_engine
from fake_vllm import FakeVLLM

from bot.web import create_app
from core.backend import RESTARTING, Backend, row_seeds
from core.backends import load_counting_tokenizer, start_backend
from core.errors import ShuttingDown, UserError
from core.grammar import parse_gen
from core.remote_engine import NO_BEST_OF

BACKENDS = ["local", "remote-fake-vllm", "remote-engine-node"]


@contextlib.asynccontextmanager
async def backend_named(name: str, tiny_dir, tmp_path):
    # fp32: a seed then gives the same text in any batch (the node's engine batches the remote's concurrent rows).
    settings = make_settings(tiny_dir, tmp_path, model={"quantize": "none"})
    if name == "local":
        async with running_engine(settings) as engine:
            yield engine
        return
    if name == "remote-fake-vllm":
        server = await FakeVLLM(tokenizer=load_counting_tokenizer(settings)).start()
        url, close = server.url, server.close
    else:
        node_core = running_core(make_settings(tiny_dir, tmp_path / "node", model={"quantize": "none"}))
        core = await node_core.__aenter__()
        site = TestServer(create_app(core), host="127.0.0.1")
        await site.start_server()
        url = str(site.make_url("")).rstrip("/")

        async def close() -> None:
            await site.close()
            await node_core.__aexit__(None, None, None)
    remote = await start_backend(make_settings(tiny_dir, tmp_path, model={"quantize": "none"},
                                               engine={"backend": "openai", "url": url}))
    try:
        yield remote
    finally:
        await remote.stop()
        await close()


@pytest.fixture(params=BACKENDS)
async def backend(request, tiny_dir, tmp_path):
    async with backend_named(request.param, tiny_dir, tmp_path) as engine:
        yield engine


def ask(backend: Backend, text: str):
    return backend.prepare(parse_gen(text, backend.defaults, backend.limits))


async def test_it_keeps_the_declared_contract(backend):
    assert isinstance(backend, Backend)
    assert backend.backend in ("local", "openai") and backend.limits.max_length > 0
    health = await backend.health()
    assert health["ok"] is True and health["backend"] == backend.backend
    assert health["saturated"] is backend.saturated is False and health["queue_size"] == backend.limits.queue_size


async def test_n_candidates_come_with_the_seeds_that_made_them(backend):
    prepared = ask(backend, "긍정 아 정말 n=2 seed=5 max_length=16")
    result = await backend.generate(prepared)
    assert result.done and len(result.continuations) == 2
    assert result.seeds == tuple(row_seeds(5, 2, 1)) == (5, 6)
    assert 0 < result.new_tokens <= 2 * (16 - len(prepared.prompt_ids))


async def test_a_seed_gives_the_same_text_again(backend):
    first = await backend.generate(ask(backend, "부정 배우들 seed=42 max_length=20"))
    again = await backend.generate(ask(backend, "부정 배우들 seed=42 max_length=20"))
    assert first.continuations == again.continuations and first.new_tokens == again.new_tokens


async def test_a_stream_grows_and_ends_with_what_generate_gives(backend):
    parts = [part async for part in backend.stream(ask(backend, "긍정 아 정말 seed=3 max_length=20"))]
    whole = await backend.generate(ask(backend, "긍정 아 정말 seed=3 max_length=20"))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].continuations == whole.continuations and parts[-1].seeds == whole.seeds
    for part in parts[:-1]:
        assert whole.continuations[0].startswith(part.continuations[0].rstrip("�"))


async def test_best_of_reranks_or_says_it_cannot(backend):
    if backend.notice:  # a remote without log-probabilities
        assert backend.notice == NO_BEST_OF and backend.defaults.best_of == 1
        assert (await backend.health())["notice"] == NO_BEST_OF
        with pytest.raises(UserError, match="best_of"):
            ask(backend, "긍정 아 정말 best_of=3")
        pytest.skip("this backend returns no log-probabilities: best_of refused by name, /help and /healthz say so")
    result = await backend.generate(ask(backend, "긍정 아 정말 best_of=3 seed=9 max_length=16"))
    assert result.confidence is not None and len(result.confidence) == 1 and 0 <= result.confidence[0] <= 1
    assert result.seeds[0] in row_seeds(9, 1, 3)
    alone = await backend.generate(ask(backend, f"긍정 아 정말 best_of=1 seed={result.seeds[0]} max_length=16"))
    assert alone.continuations == result.continuations  # the pick's seed reproduces it


async def test_a_prompt_over_the_limits_is_refused_before_generating(backend):
    with pytest.raises(UserError, match="max_length"):
        ask(backend, "긍정 " + "아 정말 " * 12 + "max_length=5 min_length=1")


async def test_a_drain_refuses_new_work_with_the_restarting_sentence(backend):
    assert await backend.drain(0) == 0
    with pytest.raises(ShuttingDown) as refused:
        await backend.generate(ask(backend, "긍정 아 정말"))
    assert str(refused.value) == RESTARTING


async def test_every_request_is_counted_once(backend):
    await backend.generate(ask(backend, "긍정 아 정말 seed=1 max_length=12"))
    with pytest.raises(UserError):
        await backend.generate(parse_gen("긍정 " + "아 정말 " * 12 + "max_length=5 min_length=1",
                                         backend.defaults, backend.limits))
    metrics = backend.telemetry.metrics.render()[0].decode()
    assert 'bot_requests_total{frontend="internal",outcome="ok"} 1.0' in metrics
    assert 'bot_requests_total{frontend="internal",outcome="user_error"} 1.0' in metrics
