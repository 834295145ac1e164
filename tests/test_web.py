"""The web front end: the tutorial's JSON API, its errors, health, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.parse

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import gen_request

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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
async def test_page_works_in_headless_chromium(core: BotCore, tmp_path):
    async with TestServer(create_app(core), host="127.0.0.1") as server:
        query = urllib.parse.urlencode({"prompt": "긍정 아 정말 <b>", "max_length": "24", "seed": "3", "run": "1"})
        url = f"http://127.0.0.1:{server.port}/?{query}"
        proc = await asyncio.create_subprocess_exec(
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom", url,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        dom, _ = await asyncio.wait_for(proc.communicate(), timeout=90)
    dom = dom.decode()
    assert 'class="candidate"' in dom, dom[-2000:]
    assert "긍정 아 정말 &lt;b&gt;" in dom  # the page shows user text literally
    expected = await core.engine.generate(core.engine.prepare(
        gen_request(core, "긍정 아 정말 <b> max_length=24 seed=3", "web", "test")))
    assert expected.texts()[0].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in dom
