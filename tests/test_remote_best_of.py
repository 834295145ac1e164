"""best_of through a remote: the candidates' own log-probabilities and one batched echo request for the other label,
picked by the local engine's rule. The fake vLLM's log-probabilities are deterministic (fake_vllm.logprob), so the
pick the bot must make is computed here from the same numbers."""

from __future__ import annotations

import pytest
from conftest import make_settings
from fake_vllm import FakeVLLM, logprob

from core.backend import row_seeds
from core.backends import load_counting_tokenizer, start_backend
from core.grammar import parse_gen
from core.rerank_rule import confidence, pick_best


@pytest.fixture
def tokenizer(tiny_dir, tmp_path):
    return load_counting_tokenizer(make_settings(tiny_dir, tmp_path))


@pytest.fixture
async def vllm(tokenizer):
    server = await FakeVLLM(tokenizer=tokenizer).start()
    yield server
    await server.close()


@pytest.fixture
async def remote(tiny_dir, tmp_path, vllm):
    engine = await start_backend(make_settings(tiny_dir, tmp_path, generation={"best_of": 4},
                                               engine={"backend": "openai", "url": vllm.url}))
    yield engine
    await engine.stop()


def expected(vllm: FakeVLLM, tokenizer, own: list[int], other: list[int], seeds: list[int], budget: int):
    """Each row's token ids and label score, from the fake model's numbers."""
    rows = []
    for seed in seeds:
        ids, _ = vllm.sample(own, seed, budget)
        own_lp = sum(logprob(own + ids[:i], t) for i, t in enumerate(ids))
        other_lp = sum(logprob(other + ids[:i], t) for i, t in enumerate(ids))
        rows.append((ids, own_lp - other_lp))
    return rows


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_the_pick_is_the_local_rules_pick_from_the_servers_logprobs(remote, vllm, tokenizer, seed):
    assert remote.logprobs is True and remote.notice == "" and remote.defaults.best_of == 4
    prepared = remote.prepare(parse_gen(f"부정 배우들 연기가 n=2 seed={seed} max_length=24", remote.defaults,
                                        remote.limits))
    result = await remote.generate(prepared)
    own = list(prepared.prompt_ids)
    other = tokenizer("긍정 배우들 연기가", add_special_tokens=False)["input_ids"]
    seeds = row_seeds(seed, 2, 4)
    rows = expected(vllm, tokenizer, own, other, seeds, 24 - len(own))
    picks = pick_best([score for _, score in rows], 2)
    assert result.seeds == tuple(seeds[i] for i in picks)
    assert result.continuations == tuple(tokenizer.decode(rows[i][0], skip_special_tokens=True) for i in picks)
    assert result.confidence == pytest.approx(tuple(confidence(rows[i][1]) for i in picks))
    eos = tokenizer.eos_token_id
    assert result.new_tokens == sum(len(ids) - (ids[-1] == eos) for ids, _ in rows)  # no end-of-text token
    # the other label's side: one request for all eight rows, as token ids (the end-of-text token scored too)
    scoring = [b for b in vllm.bodies if b.get("echo") and len(b["prompt"]) == 8]
    assert len(scoring) == 1 and scoring[0]["prompt"] == [other + ids for ids, _ in rows]
    assert all(b["logprobs"] == 0 and b["return_tokens_as_token_ids"] for b in vllm.samples)


async def test_the_rerank_is_not_just_the_first_candidate(remote, vllm, tokenizer):
    """Across seeds the scores pick other candidates than each group's first, so the tests above test a choice."""
    picked_elsewhere = 0
    for seed in range(20, 30):
        result = await remote.generate(remote.prepare(parse_gen(f"긍정 아 정말 seed={seed} max_length=16",
                                                                remote.defaults, remote.limits)))
        picked_elsewhere += result.seeds[0] != seed
    assert picked_elsewhere >= 3


async def test_new_tokens_do_not_count_the_end_of_text_token(remote, vllm, tokenizer):
    prepared = remote.prepare(parse_gen("긍정 아 정말 best_of=1 seed=5 max_length=40", remote.defaults, remote.limits))
    ids, finish = vllm.sample(list(prepared.prompt_ids), 5, 40 - len(prepared.prompt_ids))
    assert finish == "stop" and ids[-1] == tokenizer.eos_token_id  # vLLM counts it in completion_tokens
    result = await remote.generate(prepared)
    assert result.new_tokens == len(ids) - 1
    streamed = [g async for g in remote.stream(prepared)][-1]
    assert streamed.new_tokens == len(ids) - 1 and streamed.continuations == result.continuations


async def test_a_server_without_logprobs_is_said_at_start_in_help_and_healthz(tiny_dir, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from bot.web import create_app
    from core.replies import help_text
    from core.service import BotCore

    server = await FakeVLLM().start()  # no tokenizer: answers a request for log-probabilities with 400
    settings = make_settings(tiny_dir, tmp_path, generation={"best_of": 4},
                             engine={"backend": "openai", "url": server.url})
    engine = await start_backend(settings)
    core = BotCore.create(settings, engine)
    try:
        assert engine.logprobs is False and engine.defaults.best_of == 1
        assert "best_of" in help_text(engine.defaults, engine.limits, notice=engine.notice).splitlines()[0]
        async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as client:
            health = await client.get("/healthz")
            body = await health.json()
        assert health.status == 200 and "log-probabilities" in body["notice"] and body["engine"]["best_of"] is False
    finally:
        core.store.close()
        await engine.stop()
        await server.close()
