"""Faults: the fake Bot API answering 5xx, dropping the connection or answering slowly; a model error inside one
request; and the engine's drain at shutdown. The reply still arrives exactly once; only the failing request fails."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading

import pytest
import torch
from conftest import make_settings, running_core, shared_steps, telegram_running
from fake_bot_api import FakeBotAPI, finished

from core.engine import RESTARTING, Engine
from core.errors import RequestTimeout, ShuttingDown
from core.gpt2_model import as_transformers
from core.grammar import parse_gen
from core.model_loading import load_model

TOKEN = "123456789:AAF-faults_Token-xyz"
CHAT = 2001


class Wrapped(torch.nn.Module):
    """The real model behind a hook that may raise or stall, as a broken or slow model would."""

    def __init__(self, inner: torch.nn.Module, hook):
        super().__init__()
        self.inner, self.config, self.hook = inner, inner.config, hook

    def forward(self, input_ids, position_ids=None, **kwargs):
        self.hook(input_ids, position_ids)
        return self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)


def engine_over(settings, hook) -> Engine:
    loaded = load_model(settings.model)  # transformers' forward behind the hook (the engine's batch for such a model)
    return Engine(dataclasses.replace(loaded, model=Wrapped(as_transformers(loaded.model), hook)), settings)


def request(engine: Engine, text: str):
    return engine.prepare(parse_gen(text, engine.defaults, engine.limits))


# ---- a model error fails that request only -----------------------------------------------------------------------
async def test_a_model_error_fails_only_its_request(settings):
    plain = load_model(settings.model)
    ids = lambda text: plain.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bad_prompt, long_prompt = "부정 최악의 영화", "긍정 " + "배우들 연기가 좋았다 " * 8
    good = ["긍정 아 정말", "부정 스토리가 너무"]
    bad_token = ids(bad_prompt)[-1]
    assert all(bad_token not in ids(t) for t in [long_prompt, *good])
    cut = len(ids(long_prompt))  # only the long prompt's rows ever reach this position
    assert cut > 20

    def hook(input_ids, position_ids):
        if input_ids.shape[1] > 1 and (input_ids == bad_token).any():
            raise RuntimeError("prefill failed")
        if position_ids is not None and (position_ids >= cut).any():
            raise RuntimeError("step failed")

    engine = engine_over(settings, hook)
    engine.start()
    try:
        jobs = [
            engine.generate(request(engine, f"{bad_prompt} min_length=1 max_length=20")),
            engine.generate(request(engine, f"{long_prompt} min_length=1 max_length=60")),
            *(engine.generate(request(engine, f"{t} min_length=20 max_length=20 seed=1")) for t in good),
        ]
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30)
        assert isinstance(results[0], RuntimeError) and "prefill" in str(results[0])
        assert isinstance(results[1], RuntimeError) and "step" in str(results[1])
        assert [r.texts()[0].startswith(t) for r, t in zip(results[2:], good)] == [True, True]
        assert shared_steps(engine, 1) > 0  # the failing step was a batch shared with the good requests
        again = await asyncio.wait_for(engine.generate(request(engine, "긍정 배우들 seed=3")), 30)
        assert again.continuations[0]  # the engine keeps serving
    finally:
        await engine.stop()


async def test_a_failure_of_the_whole_batch_fails_its_requests_and_the_engine_goes_on(settings):
    broken = {"on": True}

    def hook(input_ids, position_ids):
        if broken["on"] and position_ids is not None and input_ids.shape[0] >= 2:
            raise RuntimeError("batch too big")  # fails only in a batch: nobody alone is to blame

    engine = engine_over(settings, hook)
    engine.start()
    try:
        jobs = [engine.generate(request(engine, f"긍정 아 정말 min_length=20 max_length=20 seed={i}")) for i in range(2)]
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30)
        assert all(isinstance(r, RuntimeError) for r in results)
        broken["on"] = False
        assert (await asyncio.wait_for(engine.generate(request(engine, "긍정 아 정말")), 30)).continuations
    finally:
        await engine.stop()


async def test_a_failed_best_of_scoring_pass_fails_only_the_requests_it_scored(settings):
    def hook(input_ids, position_ids):
        if position_ids is None:  # only the rerank's scoring pass leaves positions to the model
            raise RuntimeError("scoring failed")

    engine = engine_over(settings, hook)
    engine.start()
    try:
        jobs = [engine.generate(request(engine, "긍정 아 정말 best_of=2 min_length=8 max_length=8 seed=1")),
                engine.generate(request(engine, "부정 스토리가 min_length=30 max_length=30 seed=2"))]
        results = await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 30)
        assert isinstance(results[0], RuntimeError) and "scoring" in str(results[0])
        assert results[1].continuations[0] and results[1].new_tokens > 0  # decoded on past the failure
        assert shared_steps(engine, 2) > 0  # both requests' rows were in the batch together
        assert (await asyncio.wait_for(engine.generate(request(engine, "긍정 배우들 seed=3")), 30)).continuations
    finally:
        await engine.stop()


# ---- drain at shutdown -------------------------------------------------------------------------------------------
class Held:
    """A model hook that holds the worker inside a decoding step of `rows` rows (past the first `after` such steps)
    until the test lets go: a drain starts while that work is certainly in flight, with no timing involved."""

    def __init__(self, rows: int = 2, after: int = 0):
        self.rows, self.after, self.steps = rows, after, 0
        self.holding, self.go = threading.Event(), threading.Event()

    def __call__(self, input_ids, position_ids):
        if tuple(input_ids.shape) == (self.rows, 1):  # one decoding step of that many rows
            self.steps += 1
            if self.steps > self.after:
                self.holding.set()
                self.go.wait(30)

    async def in_flight(self) -> None:
        assert await asyncio.get_running_loop().run_in_executor(None, self.holding.wait, 30), "never held"


async def test_drain_lets_in_flight_work_finish_and_refuses_new_work(settings):
    held = Held()
    engine = engine_over(settings, held)
    engine.start()
    try:
        jobs = [asyncio.ensure_future(engine.generate(request(engine, f"긍정 아 정말 min_length=30 max_length=30 seed={i}")))
                for i in range(2)]
        await held.in_flight()
        drain = asyncio.ensure_future(engine.drain(grace=20))
        await asyncio.sleep(0)  # one turn of the loop: the drain task starts and closes the door
        with pytest.raises(ShuttingDown, match="다시 시작"):
            await engine.generate(request(engine, "긍정 아 정말"))
        assert not drain.done() and not any(job.done() for job in jobs)  # it waits for the work in flight …
        held.go.set()
        assert await asyncio.wait_for(drain, 30) == 0  # … which finishes
        assert all(len(job.result().continuations[0]) > 0 for job in jobs)
    finally:
        held.go.set()
        await engine.stop()


async def test_drain_tells_unfinished_work_the_bot_is_restarting(settings):
    held = Held()  # never let go before the drain: the work cannot finish within any grace
    engine = engine_over(settings, held)
    engine.start()
    try:
        jobs = [asyncio.ensure_future(engine.generate(request(engine, f"긍정 아 정말 min_length=30 max_length=30 seed={i}")))
                for i in range(2)]
        await held.in_flight()
        assert await asyncio.wait_for(engine.drain(grace=0.05), 10) == 2
        for job in jobs:
            with pytest.raises(ShuttingDown) as info:
                await job
            assert str(info.value) == RESTARTING
    finally:
        held.go.set()
        await asyncio.wait_for(engine.stop(), 10)  # the worker dropped the abandoned rows, so it stops at once


# ---- Telegram: 5xx, dropped connections, slow answers ------------------------------------------------------------
@pytest.fixture
async def fake():
    api = await FakeBotAPI(TOKEN).start()
    yield api
    await api.close()


@pytest.fixture
def settings_tg(tiny_dir, tmp_path, fake):
    return make_settings(tiny_dir, tmp_path, limits={"user_interval_s": 0},
                         telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url})


@pytest.fixture
async def bot(settings_tg, fake):
    async with running_core(settings_tg) as core, telegram_running(core, fake):
        yield fake


async def one_final_reply(fake: FakeBotAPI, text: str) -> dict:
    message = fake.user_message(CHAT, text)

    def replies() -> list[dict]:
        return fake.replies_to(message)

    await fake.wait_for(lambda: any(finished(m) for m in replies()), timeout=20)
    await fake.settled()  # handled, and no faulted call still being answered: a duplicate would be here by now
    assert len(replies()) == 1
    return replies()[0]


@pytest.mark.parametrize("fault", [
    {"status": 502}, {"status": 500, "times": 2}, {"status": 503}, {"drop": True}, {"drop": True, "times": 2},
    {"status": None, "delay": 1.5},
], ids=["502", "500-twice", "503", "dropped", "dropped-twice", "slow"])
async def test_send_faults_still_give_exactly_one_reply(bot, fault):
    bot.fail_next("sendMessage", chat_id=CHAT, **fault)
    reply = await one_final_reply(bot, "/gen 긍정 아 정말 seed=1")
    assert reply["text"].startswith("긍정 아 정말") and "seed=1" in reply["text"]
    assert len(bot.called("sendMessage", chat_id=CHAT)) == 1  # one accepted send; the faulted ones were not taken


@pytest.mark.parametrize("fault", [{"drop": True}, {"status": None, "delay": 1.5}], ids=["dropped", "slow"])
async def test_edit_faults_still_finish_the_reply(bot, fault):
    bot.fail_next("editMessageText", chat_id=CHAT, **fault)
    reply = await one_final_reply(bot, "/gen 긍정 아 정말 min_length=120 max_length=120 seed=2")
    assert reply["text"].startswith("긍정 아 정말") and "seed=2" in reply["text"]


async def test_unanswered_update_fetches_are_retried(bot):
    bot.fail_next("getUpdates", times=2, status=502)
    bot.fail_next("getUpdates", drop=True)
    reply = await one_final_reply(bot, "/gen 부정 스토리가 seed=3")
    assert reply["text"].startswith("부정 스토리가")


# ---- timed-out and cancelled requests leave the engine -----------------------------------------------------------
async def test_timed_out_and_cancelled_requests_are_not_left_in_flight(tiny_dir, tmp_path):
    """Regression: they stayed in the engine's books, so a drain waited its whole grace for them, counted them as
    unfinished, and the error it set on their futures was logged as "Future exception was never retrieved"."""
    gate = threading.Event()  # the model stalls until the test lets it go: no timing involved
    settings = make_settings(tiny_dir, tmp_path, limits={"request_timeout_s": 0.05})
    engine = engine_over(settings, lambda ids, pos: gate.wait())
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    engine.start()
    try:
        with pytest.raises(RequestTimeout):
            await engine.generate(request(engine, "긍정 아 정말"))
        waiting = asyncio.ensure_future(engine.generate(request(engine, "부정 별로")))
        await asyncio.sleep(0)  # one turn of the loop: it submits (synchronously, in its first step)
        assert engine.queue_depth == 1  # waiting behind the stalled worker
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await engine.drain(grace=0) == 0
    finally:
        gate.set()
        await asyncio.wait_for(engine.stop(), 10)
        loop.set_exception_handler(None)
    del waiting
    gc.collect()
    await asyncio.sleep(0)
    assert not unhandled, unhandled
