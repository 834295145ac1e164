"""The web front end: the tutorial's JSON API, its errors, health, and the page in headless Chromium."""

from __future__ import annotations

import json
import threading
import urllib.parse
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from browser import CHROMIUM, chromium_page
from conftest import gen_request
from helpers import held_after

import bot.web as web_module
from bot.web import create_app
from core.service import BotCore

TUTORIAL_BODY = {"prompt": "긍정 아 정말", "min_length": 10, "max_length": 20, "top_p": 1.0, "top_k": 50,
                 "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "temperature": 1.0}


@pytest.fixture
async def client(core: BotCore):
    async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as c:
        yield c


async def test_tutorial_json_gives_prompt_plus_continuation(client: TestClient):
    resp = await client.post("/api", json=TUTORIAL_BODY)
    assert resp.status == 200
    data = await resp.json()
    assert data["result"].startswith("긍정 아 정말") and len(data["result"]) > len("긍정 아 정말")
    assert data["results"] == [data["result"]] and len(data["seeds"]) == 1


async def test_page_strings_and_empty_fields_mean_defaults(client: TestClient):
    body = {"prompt": "pos 아 정말", "min_length": "", "max_length": "30", "top_p": "0.9", "top_k": "",
            "repetition_penalty": "", "no_repeat_ngram_size": "", "temperature": "", "seed": "5", "n": "2"}
    data = await (await client.post("/api", json=body)).json()
    assert len(data["results"]) == 2 and data["seeds"] == [5, 6]
    assert all(text.startswith("긍정 아 정말") for text in data["results"])
    again = await (await client.post("/api", json=body)).json()
    assert again["results"] == data["results"]  # seed makes it reproducible


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({**TUTORIAL_BODY, "top_p": 1.5}, 422, "top_p"),
        ({**TUTORIAL_BODY, "top_k": "abc"}, 422, "top_k"),
        ({**TUTORIAL_BODY, "max_length": 100000}, 422, "128 이하"),
        ({**TUTORIAL_BODY, "n": 1000}, 422, "n"),
        ({**TUTORIAL_BODY, "temprature": 1}, 422, "temperature"),
        ({**TUTORIAL_BODY, "prompt": 5}, 422, "prompt"),
        ({**TUTORIAL_BODY, "prompt": ""}, 422, "비어"),
        ({**TUTORIAL_BODY, "prompt": "가" * 5000}, 422, "너무 깁니다"),
        ({**TUTORIAL_BODY, "top_k": True}, 422, "top_k"),
        ([1, 2], 422, "JSON 객체"),
    ],
)
async def test_invalid_input_is_422_with_the_bots_message(client: TestClient, body, status, fragment):
    resp = await client.post("/api", json=body)
    assert resp.status == status
    assert fragment in (await resp.json())["error"]


@pytest.mark.parametrize("raw, fragment", [(b"{not json", "JSON"), (b"\xff\xfe\x00", "UTF-8"), (b"", "JSON")])
async def test_malformed_bodies_are_400(client: TestClient, raw, fragment):
    resp = await client.post("/api", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and fragment in (await resp.json())["error"]


async def test_huge_body_is_refused(client: TestClient):
    resp = await client.post("/api", data=b"{" + b" " * 200_000 + b"}")
    assert resp.status == 413


async def test_healthz_and_page(client: TestClient):
    assert (await (await client.get("/healthz")).json())["status"] == "ok"
    html = await (await client.get("/")).text()
    assert "<form" in html and "temperature" in html and "__CONFIG__" not in html


async def test_stream_sends_growing_text_then_the_tutorial_result(client: TestClient, monkeypatch):

    from core.engine import _Batch
    from core.gpt2_decode import DecodeBatch

    # No timing in the test: the worker is held at its first decoding step until the page has read a partial line,
    # and partial lines are not throttled. (A fast machine may otherwise finish before the first edit is due.)
    monkeypatch.setattr(web_module, "STREAM_INTERVAL_S", 0.0)
    gate = threading.Event()

    def held(real_step):
        def held_step(self, last_tokens):
            gate.wait(60)
            return real_step(self, last_tokens)
        return held_step

    for batch_type in (_Batch, DecodeBatch):  # whichever the engine runs this model with
        monkeypatch.setattr(batch_type, "step", held(batch_type.step))
    body = {"prompt": "아 정말", "label": "긍정", "min_length": 40, "max_length": 40, "seed": 4, "n": 2}
    resp = await client.post("/api/stream", json=body)
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    first = json.loads(await resp.content.readline())
    gate.set()
    lines = [first] + [json.loads(line) for line in (await resp.text()).splitlines()]
    *partials, final = lines
    assert partials and all(len(p["partial"]) == 2 and p["prompt"] == "긍정 아 정말" for p in partials)
    assert final["seeds"] == [4, 5] and final["result"] == final["results"][0]
    same = await (await client.post("/api", json=body)).json()
    assert same["results"] == final["results"]  # the same request through POST /api gives the same text
    refused = await client.post("/api/stream", json={**body, "top_p": 7})
    assert refused.status == 422 and "top_p" in (await refused.json())["error"]


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_works_in_headless_chromium(core: BotCore, tmp_path):
    """The page streams from /api/stream, numbers the candidates, sets the prompt apart, shows the seeds, shows the
    server's Korean message for a bad value, and clears the last result on a new submit. Screenshots go to
    test-artifacts/ (git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    async with TestServer(create_app(core), host="127.0.0.1") as server, chromium_page(tmp_path / "profile") as page:
        query = urllib.parse.urlencode({"label": "긍정", "prompt": "아 정말 <b>", "max_length": "24", "seed": "3", "n": "2",
                                        "run": "1"})
        await page.goto(f"http://127.0.0.1:{server.port}/?{query}")
        await page.wait_for("document.getElementById('results').dataset.done === '1'")
        await page.screenshot(ARTIFACTS / "web-page-result.png")
        dom = await page.evaluate("document.getElementById('results').outerHTML")
        seeds = await page.evaluate("document.getElementById('seeds').textContent")
        # A bad value: the server's Korean sentence, and the last result is gone.
        await page.evaluate("document.getElementById('top_p').value = '7'; document.getElementById('submit').click()")
        error = await page.wait_for("document.getElementById('error').textContent")
        await page.screenshot(ARTIFACTS / "web-page-error.png")
        left = await page.evaluate("document.querySelectorAll('.candidate').length")
        # The label choice "none": the prompt is taken as typed.
        await page.evaluate("""document.querySelector('input[name=label][value=""]').checked = true;
            document.getElementById('top_p').value = ''; document.getElementById('prompt').value = '부정 별로';
            document.getElementById('submit').click()""")
        await page.wait_for("document.getElementById('results').dataset.done === '1'")
        unlabeled = await page.evaluate("document.querySelector('.candidate .prompt').textContent")
    assert dom.count('class="candidate"') == 2 and '<span class="number">1.</span>' in dom and "2.</span>" in dom
    assert '<span class="prompt">긍정 아 정말 &lt;b&gt;</span>' in dom  # set apart, and shown literally
    assert seeds.startswith("seed = 3, 4")
    expected = await core.engine.generate(gen_request(core, "긍정 아 정말 <b> max_length=24 seed=3 n=2", "web", "test"))
    for continuation in expected.continuations:
        shown = continuation.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert f'<span class="continuation">{shown}</span>' in dom
    assert "top_p은(는) 0 초과 1 이하" in error and left == 0
    assert unlabeled == "부정 별로"
    assert (ARTIFACTS / "web-page-result.png").stat().st_size > 0


async def test_api_keeps_one_sample_unless_asked_while_the_page_gets_the_chat_default(tiny_dir, tmp_path):
    from conftest import make_settings, running_core

    from core.engine import row_seeds

    settings = make_settings(tiny_dir, tmp_path, generation={"best_of": 4}, model={"quantize": "none"})
    async with running_core(settings) as bot_core, TestClient(TestServer(create_app(bot_core), host="127.0.0.1")) as c:
        seed = {"prompt": "긍정 아 정말", "seed": 11, "max_length": 16}
        tutorial = await (await c.post("/api", json=seed)).json()
        assert tutorial["seeds"] == [11] and "confidence" not in tutorial  # best_of 1: seed 11 itself, unscored
        asked = await (await c.post("/api", json={**seed, "best_of": 4})).json()
        assert asked["seeds"][0] in row_seeds(11, 1, 4) and len(asked["confidence"]) == 1
        lines = [json.loads(line) for line in (await (await c.post("/api/stream", json=seed)).text()).splitlines()]
        assert lines[-1]["seeds"] == asked["seeds"] and lines[-1]["results"] == asked["results"]
        no_label = await c.post("/api", json={"prompt": "아 정말", "best_of": 4})
        assert no_label.status == 422 and "라벨" in (await no_label.json())["error"]


# ---- stop ------------------------------------------------------------------------------------------------------


async def test_stream_can_be_stopped_with_its_key(client: TestClient, core: BotCore, monkeypatch):
    monkeypatch.setattr(web_module, "STREAM_INTERVAL_S", 0.0)
    body = {"prompt": "아 정말", "label": "긍정", "min_length": 100, "max_length": 100, "seed": 4, "best_of": 1}
    with held_after(core.engine, 3):
        resp = await client.post("/api/stream", json=body)
        first = json.loads(await resp.content.readline())
        key = first["stop"]
        assert first["partial"] and isinstance(key, str)
        for bad, status in (({"stop": "nope"}, 422), ({"stop": 5}, 422), ({}, 422)):
            refused = await client.post("/api/stop", json=bad)
            assert refused.status == status and "error" in await refused.json()
        stopped = await client.post("/api/stop", json={"stop": key})
        assert stopped.status == 200 and await stopped.json() == {"stopping": True}
        *_, final = [first] + [json.loads(line) for line in (await resp.text()).splitlines()]
    assert final["stopped"] is True and final["seeds"] == [4]
    assert len(final["result"]) < 200 and final["result"].startswith("긍정 아 정말")
    assert core.engine.telemetry.metrics.requests.labels("web", "cancelled")._value.get() == 1
    again = await client.post("/api/stop", json={"stop": key})
    assert again.status == 422 and "이미 끝났거나" in (await again.json())["error"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_stop_control_in_headless_chromium(core: BotCore, tmp_path, monkeypatch):
    monkeypatch.setattr(web_module, "STREAM_INTERVAL_S", 0.0)
    with held_after(core.engine, 3):
        async with TestServer(create_app(core), host="127.0.0.1") as server, chromium_page(tmp_path / "p") as page:
            query = urllib.parse.urlencode({"label": "긍정", "prompt": "아 정말", "min_length": "100",
                                            "max_length": "100", "best_of": "1", "seed": "6", "run": "1"})
            await page.goto(f"http://127.0.0.1:{server.port}/?{query}")
            await page.wait_for("!document.getElementById('stop').hidden")
            await page.evaluate("document.getElementById('stop').click()")
            await page.wait_for("document.getElementById('results').dataset.done === '1'")
            seeds = await page.evaluate("document.getElementById('seeds').textContent")
            hidden = await page.evaluate("document.getElementById('stop').hidden")
    assert "seed = 6" in seeds and "중지됨" in seeds and hidden
