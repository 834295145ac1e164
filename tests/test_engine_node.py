"""The bot as an engine node: `/v1/completions` and `/v1/models` in-process, then two real processes end to end."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import make_settings, running_core
from fake_bot_api import FakeBotAPI, finished
from helpers import free_port as _free_port
from helpers import subprocess_env as _env
from tiny_model import make_end_likely

from bot.web import create_app
from core.backends import start_backend
from core.errors import UserError
from core.grammar import parse_gen
from core.hops import HOP_HEADER, MAX_HOPS, check_not_own_node
from core.service import BotCore
from core.types import GenRequest, PreparedRequest

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
        async with http.post(url + "/v1/completions", json={"prompt": "긍정 아", "stop": ["."], "foo": 1}) as resp:
            assert resp.status == 400
            message = (await resp.json())["error"]["message"]
        assert "foo" in message and "stop" in message and "지원하지 않습니다" in message
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


async def _metrics_with(url: str, frontend: str, count: int = 1) -> str:
    series = f'bot_requests_total{{frontend="{frontend}",outcome="ok"}} {count:.1f}'
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
        message = fake.user_message(1001, "/gen 긍정 아 정말 seed=5 min_length=12 max_length=16 best_of=1")
        await fake.wait_for(lambda: any(finished(m) for m in fake.replies_to(message)), timeout=60)
        reply = fake.replies_to(message)[0]
        assert reply["text"].startswith("긍정 아 정말") and "seed=5" in reply["text"]
        # The node generated it for the engine-node API (after the front end's start-up probe asked it for
        # log-probabilities once); the front end counted its own telegram request (recorded as the reply's stream
        # closes, so it is polled for).
        assert await _metrics_with(node_url, "openai", 2)
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


# ---- issue 18 item 5: the node through the door; the vLLM dialect remote best_of needs ----------------------------
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _post(url: str, body: object, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, \
            http.post(url + "/v1/completions", json=body, headers=headers or AUTH) as resp:
        return resp.status, await resp.json()


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token | tokens so far) at every position, from one plain forward pass."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def _non_round_tripping_ids(tokenizer) -> list[int]:
    """Token ids whose decoded text tokenizes to other ids (a prompt that only stays itself as ids): two pieces the
    tokenizer would merge. Searched over pairs, so it holds for whatever vocabulary the tiny tokenizer learned (with
    or without the NSMC data)."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special and tokenizer.decode([i]).strip()][:300]
    for a in ordinary:
        for b in ordinary:
            ids = [a, b]
            if tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] != ids:
                return ids
    raise AssertionError("the tiny tokenizer has no such ids")


async def test_token_id_prompts_stay_ids_and_text_is_tokenized_once(node, monkeypatch):
    core, url = node
    ids = _non_round_tripping_ids(core.engine.tokenizer)
    status, data = await _post(url, {"prompt": ids, "max_tokens": 4, "echo": True, "logprobs": 0,
                                     "return_tokens_as_token_ids": True, "seed": 3})
    assert status == 200
    assert data["usage"]["prompt_tokens"] == len(ids)
    assert data["choices"][0]["logprobs"]["tokens"][:len(ids)] == [f"token_id:{i}" for i in ids]
    # The same ids straight into the engine give the same text: nothing was decoded and re-encoded on the way.
    request = GenRequest(None, core.engine.tokenizer.decode(ids), replace(core.engine.defaults, max_length=len(ids) + 4,
                                                                          min_length=len(ids), seed=3))
    direct = await core.engine.generate(PreparedRequest(request, tuple(ids)))
    assert data["choices"][0]["text"] == core.engine.tokenizer.decode(ids) + direct.continuations[0]

    calls = []
    real = type(core.engine.tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(core.engine.tokenizer), "__call__", counting)
    status, data = await _post(url, {"prompt": "긍정 아 정말", "max_tokens": 5, "n": 2})
    assert status == 200 and calls == ["긍정 아 정말"]  # one tokenization (it was three)


async def test_finish_reason_and_usage_are_the_engines_own(node):
    core, url = node
    make_end_likely(core.engine.model, core.engine.eos_id)  # both endings, whatever vocabulary the tiny model has
    eos, reasons = core.engine.eos_id, set()
    for seed in range(6):
        status, data = await _post(url, {"prompt": "아 정말", "max_tokens": 30, "n": 3, "seed": seed,
                                         "return_token_ids": True})
        assert status == 200
        counted = 0
        for choice in data["choices"]:
            ids = choice["token_ids"]
            reasons.add(choice["finish_reason"])
            if choice["finish_reason"] == "stop":  # ended by the end-of-text token, before max_tokens
                assert ids[-1] == eos and len(ids) - 1 < 30
                counted += len(ids) - 1
            else:
                assert choice["finish_reason"] == "length" and eos not in ids and len(ids) == 30
                counted += len(ids)
        assert data["usage"]["completion_tokens"] == counted  # the end-of-text token is not counted
    assert reasons == {"stop", "length"}  # both kinds of ending were seen (fixed seeds: deterministic)


async def test_sampled_logprobs_are_the_raw_models_as_vllm_reports_them(node):
    core, url = node
    ids = core.engine.tokenizer("긍정 아 정말", add_special_tokens=False)["input_ids"]
    status, data = await _post(url, {"prompt": ids, "max_tokens": 12, "n": 2, "seed": 8, "logprobs": 3,
                                     "temperature": 0.7, "top_k": 5, "return_tokens_as_token_ids": True})
    assert status == 200
    for choice in data["choices"]:
        block = choice["logprobs"]
        sampled = [int(t.removeprefix("token_id:")) for t in block["tokens"]]
        direct = _direct_logprobs(core.engine.model, ids + sampled)
        for j, token in enumerate(sampled):
            row = direct[len(ids) - 1 + j]  # the raw distribution, not the one temperature/top_k sampled from
            assert block["token_logprobs"][j] == pytest.approx(float(row[token]), abs=1e-4)
            top = {f"token_id:{t}": float(row[t]) for t in row.topk(3).indices.tolist()}
            top[f"token_id:{token}"] = float(row[token])
            assert block["top_logprobs"][j].keys() == top.keys()
            assert all(block["top_logprobs"][j][k] == pytest.approx(v, abs=1e-4) for k, v in top.items())
        offsets = [0]
        for shown in block["tokens"][:-1]:
            offsets.append(offsets[-1] + len(shown))
        assert block["text_offset"] == offsets
        # The last token is the end-of-text token exactly when the choice stopped (the rerank scores it too).
        assert (sampled[-1] == core.engine.eos_id) == (choice["finish_reason"] == "stop")


async def test_echo_and_prompt_logprobs_score_batched_prompts_without_generating(node):
    core, url = node
    tok = core.engine.tokenizer
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ("부정 아 정말 재밌다", "긍정 아 정말 별로")]
    status, data = await _post(url, {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
                                     "prompt_logprobs": 2})
    assert status == 200 and data["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0,
                                               "total_tokens": sum(map(len, prompts))}
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for ids, choice in zip(prompts, data["choices"]):
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        direct = _direct_logprobs(core.engine.model, ids)
        expected = [float(direct[j - 1, ids[j]]) for j in range(1, len(ids))]
        block = choice["logprobs"]
        assert block["tokens"] == [tok.decode([i]) for i in ids] and block["token_logprobs"][0] is None
        assert block["top_logprobs"][0] is None
        assert block["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
        scored = choice["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(ids)
        for j in range(1, len(ids)):
            row = direct[j - 1]
            own = scored[j][str(ids[j])]
            assert own["logprob"] == pytest.approx(float(row[ids[j]]), abs=1e-5)
            assert own["rank"] == int((row > row[ids[j]]).sum()) + 1
            assert {str(t) for t in row.topk(2).indices.tolist()} <= scored[j].keys()


async def test_batched_text_prompts_give_each_prompts_own_completions(node):
    _, url = node
    prompts = ["긍정 아 정말", "부정 영화가"]
    status, together = await _post(url, {"prompt": prompts, "max_tokens": 6, "n": 2, "seed": 21})
    assert status == 200 and [c["index"] for c in together["choices"]] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        _, alone = await _post(url, {"prompt": prompt, "max_tokens": 6, "n": 2, "seed": 21})
        assert [c["text"] for c in together["choices"][2 * p:2 * p + 2]] == [c["text"] for c in alone["choices"]]


async def test_temperature_zero_is_greedy(node):
    _, url = node
    answers = []
    for seed in (1, 2):
        status, data = await _post(url, {"prompt": "긍정 아 정말", "max_tokens": 10, "temperature": 0, "seed": seed,
                                         "logprobs": 0})
        assert status == 200
        answers.append(data["choices"][0]["text"])
        # each token was the most likely one (no penalties by default): the raw top-1
        block = data["choices"][0]["logprobs"]
        assert all(len(top) == 1 for top in block["top_logprobs"])
    assert answers[0] == answers[1]


@pytest.mark.parametrize(("body", "names", "unsent"), [
    ({"prompt": ""}, ["prompt"], ["min_length", "max_length"]),
    ({"prompt": "긍정 아", "max_tokens": 100000}, ["max_tokens"], ["max_length"]),
    ({"prompt": "긍정 아", "max_tokens": 3, "min_tokens": 5}, ["min_tokens"], ["min_length"]),
    ({"prompt": "긍정 아\x00 정말"}, ["제어 문자"], []),
    ({"prompt": "긍정 아", "logprobs": 21}, ["logprobs", "20"], []),
    ({"prompt": "긍정 아", "max_tokens": 0}, ["echo"], []),
    ({"prompt": "긍정 아", "stream": True, "prompt_logprobs": 1}, ["prompt_logprobs"], []),
])
async def test_errors_name_what_the_client_sent(node, body, names, unsent):
    _, url = node
    status, data = await _post(url, body)
    message = data["error"]["message"]
    assert status == 400 and all(n in message for n in names) and not any(u in message for u in unsent), message


async def test_bearer_scheme_is_case_insensitive(node):
    _, url = node
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, _ = await _post(url, {"prompt": "긍정 아", "max_tokens": 2}, {"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200, scheme
    status, data = await _post(url, {"prompt": "긍정 아"}, {"Authorization": f"bearer {TOKEN}x"})
    assert status == 401 and data["error"]["type"] == "authentication_error"


async def test_streamed_logprobs_and_echo_match_the_unstreamed_answer(node):
    _, url = node
    body = {"prompt": "긍정 아 정말", "max_tokens": 10, "seed": 5, "logprobs": 2, "echo": True}
    _, whole = await _post(url, body)
    chunks = []
    async with aiohttp.ClientSession() as http, \
            http.post(url + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[len(b"data: "):]))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    expected = whole["choices"][0]
    assert "".join(c["text"] for c in choices) == expected["text"]
    assert [t for c in choices for t in c["logprobs"]["tokens"]] == expected["logprobs"]["tokens"]
    assert [t for c in choices for t in c["logprobs"]["token_logprobs"]] == expected["logprobs"]["token_logprobs"]
    shown = 0
    for c in choices:  # as vLLM streams them: each chunk's offsets start where the text sent so far ends
        offsets = c["logprobs"]["text_offset"]
        assert offsets == [shown + sum(map(len, c["logprobs"]["tokens"][:k])) for k in range(len(offsets))]
        shown += len(c["text"])
    assert choices[-1]["finish_reason"] == expected["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


# ---- issue 19 item 6: engine-node loops ----------------------------------------------------------------------------
async def test_a_request_past_the_hop_limit_is_refused(node):
    _, url = node
    body = {"prompt": "긍정 아", "max_tokens": 2}
    status, _ = await _post(url, body, {**AUTH, HOP_HEADER: str(MAX_HOPS - 1)})
    assert status == 200
    status, data = await _post(url, body, {**AUTH, HOP_HEADER: str(MAX_HOPS)})
    assert status == 400 and "engine.url" in data["error"]["message"] and "loop" in data["error"]["message"]
    status, data = await _post(url, body, {**AUTH, HOP_HEADER: "lots"})
    assert status == 400 and HOP_HEADER in data["error"]["message"]


async def test_a_node_relaying_to_itself_stops_after_the_hop_limit(tiny_dir, tmp_path):
    port = _free_port()
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": f"http://127.0.0.1:{port}"},
                             web={"port": port, "host": "127.0.0.1"})
    remote = await start_backend(settings)
    posts = []

    @web.middleware
    async def count(request, handler):
        if request.method == "POST":
            posts.append(request.headers.get(HOP_HEADER))
        return await handler(request)

    app = create_app(BotCore.create(settings, remote))
    app.middlewares.append(count)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        status, data = await _post(f"http://127.0.0.1:{port}", {"prompt": "긍정 아", "max_tokens": 2}, {})
    finally:
        await runner.cleanup()
        await remote.stop()
    assert status == 400 and "loop" in data["error"]["message"]
    assert posts == [None, "1", "2", "3", "4"]  # one request became MAX_HOPS + 1, not a storm


@pytest.mark.parametrize(("url", "host", "port", "itself"), [
    ("http://127.0.0.1:8000", "127.0.0.1", 8000, True),
    ("http://localhost:8000/v1", "127.0.0.1", 8000, True),
    ("http://[::1]:8000", "0.0.0.0", 8000, True),
    ("http://127.0.0.1:8000", "0.0.0.0", 8000, True),
    ("http://127.0.0.1:8001", "127.0.0.1", 8000, False),
    ("http://192.0.2.7:8000", "127.0.0.1", 8000, False),  # another machine (TEST-NET address)
    ("http://127.0.0.1", "127.0.0.1", 80, True),
])
def test_a_bot_refuses_to_start_as_its_own_remote(tiny_dir, tmp_path, url, host, port, itself):
    settings = make_settings(tiny_dir, tmp_path, engine={"backend": "openai", "url": url},
                             web={"host": host, "port": port})
    if itself:
        with pytest.raises(UserError, match="engine.url"):
            check_not_own_node(settings)
    else:
        check_not_own_node(settings)


def test_python_m_bot_says_one_sentence_when_pointed_at_itself(tiny_dir, tmp_path, monkeypatch, capsys):
    import bot.__main__ as entry

    monkeypatch.setattr(entry, "limit_repeats", lambda: None)  # the test run's log handlers are pytest's
    monkeypatch.setenv("BOT_MODEL__PRETRAINED", str(tiny_dir))
    monkeypatch.setenv("BOT_STORE__PATH", str(tmp_path / "s.sqlite3"))
    monkeypatch.setenv("BOT_ENGINE__BACKEND", "openai")
    monkeypatch.setenv("BOT_ENGINE__URL", "http://localhost:8123")
    monkeypatch.setenv("BOT_WEB__PORT", "8123")
    assert entry.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: engine.url") and "itself" in err[0]


async def test_scoring_takes_prompts_as_long_as_a_whole_generation(node):
    """best_of's other-label side scores "label + prompt + candidate": longer than a prompt may be for generating."""
    core, url = node
    limits = core.settings.limits
    ids = (core.engine.tokenizer("긍정 아 정말 재밌다", add_special_tokens=False)["input_ids"] * limits.max_length)
    status, data = await _post(url, {"prompt": ids[:limits.max_length], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200 and len(data["choices"][0]["logprobs"]["tokens"]) == limits.max_length > limits.max_prompt_tokens
    status, data = await _post(url, {"prompt": ids[:limits.max_length + 1], "max_tokens": 0, "echo": True})
    assert status == 400 and str(limits.max_length) in data["error"]["message"]
    status, data = await _post(url, {"prompt": ids[:limits.max_prompt_tokens + 1], "max_tokens": 1})
    assert status == 400 and str(limits.max_prompt_tokens) in data["error"]["message"]


async def test_streamed_batched_prompts_match_the_unstreamed_choices(node):
    _, url = node
    for extra in ({"max_tokens": 8, "n": 2, "seed": 13}, {"max_tokens": 0, "echo": True, "logprobs": 0}):
        body = {"prompt": ["긍정 아 정말", "부정 영화가"], **extra}
        _, whole = await _post(url, body)
        texts: dict[int, str] = {}
        ends: dict[int, str] = {}
        async with aiohttp.ClientSession() as http, \
                http.post(url + "/v1/completions", json={**body, "stream": True}, headers=AUTH) as resp:
            lines = [line async for line in resp.content if line.startswith(b"data: ")]
        assert lines[-1] == b"data: [DONE]\n"
        chunks = [json.loads(line[len(b"data: "):]) for line in lines[:-1]]
        for c in chunks:
            for choice in c["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                if choice["finish_reason"]:
                    ends[choice["index"]] = choice["finish_reason"]
        assert texts == {c["index"]: c["text"] for c in whole["choices"]}
        assert ends == {c["index"]: c["finish_reason"] for c in whole["choices"]}
        assert chunks[-1]["usage"] == whole["usage"]


async def test_the_chats_best_of_default_does_not_apply_to_v1(tiny_dir, tmp_path, caplog):
    """The dialect has no server-side rerank: a labelled prompt is sampled once even where chats default to best_of 4
    (the request line says what was done)."""
    settings = make_settings(tiny_dir, tmp_path, model={"quantize": "none"}, generation={"best_of": 4})
    async with running_core(settings) as core:
        server = TestServer(create_app(core), host="127.0.0.1")
        await server.start_server()
        try:
            caplog.set_level(logging.INFO, logger="core.requests")
            async with aiohttp.ClientSession() as http, \
                    http.post(str(server.make_url("/v1/completions")),
                              json={"prompt": "긍정 아 정말", "max_tokens": 4, "seed": 1}) as resp:
                assert resp.status == 200
        finally:
            await server.close()
    (line,) = [r.getMessage() for r in caplog.records if "frontend=openai" in r.getMessage()]
    assert "best_of=1" in line


@pytest.mark.parametrize("token", [TOKEN, None])
async def test_the_end_user_field_splits_shares_only_behind_a_token(tiny_dir, tmp_path, token):
    """A front end holding the token relays many people: each `user` gets its own share. Without a token anyone could
    mint users to dodge the per-user cap, so the address alone counts."""
    settings = make_settings(tiny_dir, tmp_path, model={"quantize": "none"}, web={"api_token": token})
    async with running_core(settings) as core:
        seen, submit = [], core.engine._submit
        core.engine._submit = lambda prepared, streaming: (seen.append(prepared.request.user), submit(prepared, streaming))[1]
        server = TestServer(create_app(core), host="127.0.0.1")
        await server.start_server()
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with aiohttp.ClientSession(headers=headers) as http, \
                    http.post(str(server.make_url("/v1/completions")),
                              json={"prompt": "긍정 아", "max_tokens": 2, "user": "telegram:7"}) as resp:
                assert resp.status == 200
        finally:
            await server.close()
    assert seen == (["web:127.0.0.1/telegram:7"] if token else ["web:127.0.0.1"])
