"""Issue 12, items 1 and 3: every web error is JSON, and slow or idle clients cannot starve the server.

The server is started as `bot.web.serve` starts it (GuardedRunner on a loopback port); the deadlines are shortened
for the test, and every wait is for an event (a closed socket, an answer) bounded only to fail instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json

import aiohttp
import pytest
from aiohttp import web

import bot.web_body as web_body
import bot.web_server as web_server
from bot.web import create_app
from bot.web_server import GuardedRunner
from core.service import BotCore

BOUND_S = 20.0  # only a failing test waits this long


@contextlib.asynccontextmanager
async def guarded_server(core: BotCore):
    runner = GuardedRunner(create_app(core), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def raw_exchange(port: int, request: bytes) -> tuple[int, str, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), BOUND_S)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    content_type = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-type:")), "")
    return status, content_type, json.loads(body) if body else {}


async def test_every_error_is_json(core: BotCore):
    async with guarded_server(core) as port, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}"
        async with http.get(f"{base}/nowhere") as resp:
            assert resp.status == 404 and set(await resp.json()) == {"error"}
        async with http.get(f"{base}/api") as resp:
            assert resp.status == 405 and "메서드" in (await resp.json())["error"]
        async with http.post(f"{base}/api", data=b"{" + b" " * 200_000 + b"}") as resp:
            assert resp.status == 413 and "KiB" in (await resp.json())["error"]
        bad_gzip = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        async with http.post(f"{base}/api", data=b"not gzip at all", headers=bad_gzip) as resp:
            assert resp.status == 400 and "Content-Encoding" in (await resp.json())["error"]
        good_gzip = gzip.compress(json.dumps({"prompt": "긍정 아 정말", "max_length": 16}).encode())
        async with http.post(f"{base}/api", data=good_gzip, headers=bad_gzip) as resp:
            assert resp.status == 200 and (await resp.json())["result"].startswith("긍정 아 정말")
    # aiohttp's own parser errors (a broken request line, a bad header) never reach a handler.
    async with guarded_server(core) as port:
        for raw in (b"NOT AN HTTP REQUEST\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
            status, content_type, body = await raw_exchange(port, raw)
            assert status == 400 and content_type.startswith("application/json") and set(body) == {"error"}, raw


async def test_half_sent_headers_are_cut_off_and_healthz_still_answers(core: BotCore, monkeypatch):
    monkeypatch.setattr(web_server, "HEADER_TIMEOUT_S", 0.2)
    async with guarded_server(core) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), BOUND_S) == b"", "the server closes a connection whose headers stall"
        writer.close()
        status, _, body = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and body["status"] == "ok"


async def test_a_stalled_body_gets_408(core: BotCore, monkeypatch):
    monkeypatch.setattr(web_body, "BODY_TIMEOUT_S", 0.2)
    async with guarded_server(core) as port:
        status, _, body = await raw_exchange(
            port, b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
        assert status == 408 and "제때" in body["error"]


async def test_open_connections_are_capped_oldest_idle_first(core: BotCore, monkeypatch):
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS", 4)
    async with guarded_server(core) as port:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
        for _, writer in idle:
            writer.write(b"GET / HTTP/1.1\r\n")  # headers never finished
            await writer.drain()
        # The two oldest were closed to keep within the cap; a new client is answered.
        for reader, _ in idle[:2]:
            assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
        status, _, body = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and body["status"] == "ok"
        for _, writer in idle:
            writer.close()


@pytest.mark.parametrize("raw", [b'{"prompt": "\\ud800"}', b'{"prompt": "a", "top_k": ' + b"1" * 5000 + b"}"])
async def test_broken_unicode_and_huge_ints_are_4xx_json(core: BotCore, raw: bytes):
    headers = {"Content-Type": "application/json"}
    async with guarded_server(core) as port, aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{port}/api", data=raw, headers=headers) as resp:
        assert resp.status in (400, 422) and resp.content_type == "application/json"
        assert set(await resp.json()) == {"error"}
