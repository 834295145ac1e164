"""Issue 12, items 1 and 3: every web error is JSON, and slow or idle clients cannot starve the server.

The server is started as `bot.web.serve` starts it (GuardedRunner on a loopback port); the deadlines are shortened
for the test, and every wait is for an event (a closed socket, an answer) bounded only to fail instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging

import aiohttp
import pytest
from aiohttp import web
from conftest import make_settings, running_core

import bot.web as web_module
import bot.web_body as web_body
import bot.web_server as web_server
from bot.log_limits import RepeatLimiter, limit_repeats
from bot.web import create_app
from bot.web_server import GuardedRunner
from core.service import BotCore
from core.types import Generation

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


# ---- issue 19 items 4, 5, 12: the engine node's surface ------------------------------------------------------------
V1_HEAD = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"


@pytest.fixture
async def token_core(tiny_dir, tmp_path):
    async with running_core(make_settings(tiny_dir, tmp_path, web={"api_token": "t0ken"})) as core:
        yield core


def _raw_post(body: bytes, headers: str = "Authorization: Bearer t0ken\r\n") -> bytes:
    return (V1_HEAD + headers + f"Content-Length: {len(body)}\r\n\r\n").encode("utf-8", "surrogateescape") + body


V1_BAD = [
    ("lone-surrogate", _raw_post(b'{"prompt": "\\ud800"}')),
    ("4301-digit-int", _raw_post(b'{"prompt": "a", "max_tokens": ' + b"1" * 4301 + b"}")),
    ("broken-gzip", _raw_post(b"not gzip at all", "Authorization: Bearer t0ken\r\nContent-Encoding: gzip\r\n")),
    ("broken-deflate", _raw_post(b"not deflate", "Authorization: Bearer t0ken\r\nContent-Encoding: deflate\r\n")),
    ("non-utf8-authorization", _raw_post(b'{"prompt": "a"}', "Authorization: Bearer t0k\udcffen\r\n")),
]


@pytest.mark.parametrize(("name", "raw"), V1_BAD, ids=[name for name, _ in V1_BAD])
async def test_v1_bad_inputs_are_4xx_json_without_a_traceback(token_core, name, raw, caplog):
    async with guarded_server(token_core) as port:
        status, content_type, body = await raw_exchange(port, raw)
    assert 400 <= status < 500 and content_type.startswith("application/json"), (name, status)
    assert set(body) == {"error"} and body["error"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], name


async def test_v1_stalled_body_gets_408(token_core, monkeypatch):
    monkeypatch.setattr(web_body, "BODY_TIMEOUT_S", 0.2)
    async with guarded_server(token_core) as port:
        raw = (V1_HEAD + "Authorization: Bearer t0ken\r\nContent-Length: 100\r\n\r\n{\"pro").encode()
        status, _, body = await raw_exchange(port, raw)
    assert status == 408 and "제때" in body["error"]["message"]


async def test_half_sent_v1_bodies_are_capped_oldest_first(token_core, monkeypatch):
    monkeypatch.setattr(web_server, "MAX_CONNECTIONS", 4)
    runner = GuardedRunner(create_app(token_core), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        stalled = []
        for count in range(1, 7):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write((V1_HEAD + "Authorization: Bearer t0ken\r\nContent-Length: 100\r\n\r\n{\"pro").encode())
            await writer.drain()
            stalled.append((reader, writer))
            if count <= 4:  # wait until the server is reading this body (an event, bounded only to fail)
                for _ in range(2000):
                    if sum(h.body_pending for h in runner.server._waiting) == count:
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise AssertionError("the server never started reading the body")
        for reader, _ in stalled[:2]:  # the two oldest half-sent bodies made room for the newer connections
            assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
        status, _, body = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200 and body["status"] == "ok"
        for _, writer in stalled:
            writer.close()
    finally:
        await runner.cleanup()


def test_repeated_errors_are_rate_limited_but_request_lines_are_not():
    now = [0.0]
    limiter = RepeatLimiter(burst=5, window_s=60, clock=lambda: now[0])

    def record(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", level, __file__, 1, msg, args, None)

    passed = [limiter.filter(record(logging.ERROR, "Error handling request from %s", f"10.0.0.{i % 250}"))
              for i in range(10_000)]
    assert sum(passed) == 5  # 10,000 half-sent bodies' errors: five lines, not 10,000 tracebacks
    assert all(limiter.filter(record(logging.INFO, "request %s ok", i)) for i in range(100))
    now[0] = 61.0
    later = record(logging.ERROR, "Error handling request from %s", "10.0.0.1")
    assert limiter.filter(later) and "9995 more like this" in later.getMessage()


async def _endless(prepared):
    """A generation that never ends: a client leaving is the only way out."""
    request, step = prepared.request, 0
    try:
        while True:
            step += 1
            yield Generation(request, ("가" * step,) * request.knobs.n, (1,) * request.knobs.n, step, False)
            await asyncio.sleep(0.001)
    finally:
        _endless.closed = True


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "긍정 아 정말", "max_tokens": 20, "stream": True}),
    ("/api/stream", {"prompt": "긍정 아 정말"}),
])
async def test_a_client_leaving_a_stream_is_one_info_line(token_core, monkeypatch, caplog, path, body):
    monkeypatch.setattr(token_core.engine, "stream", _endless)
    monkeypatch.setattr(web_module, "STREAM_INTERVAL_S", 0.0)
    _endless.closed = False
    caplog.set_level(logging.INFO)
    async with guarded_server(token_core) as port:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0ken"}) as http:
            resp = await http.post(f"http://127.0.0.1:{port}{path}", json=body)
            assert resp.status == 200
            await resp.content.readline()
            resp.close()  # the client goes away mid-stream
        for _ in range(4000):  # waits for the server to notice; bounded only to fail
            if _endless.closed and any("left" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.005)
    left = [r for r in caplog.records if "left" in r.getMessage()]
    assert len(left) == 1 and left[0].levelno == logging.INFO and left[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert _endless.closed  # the generation was stopped, not left running


def test_the_limiter_goes_on_the_log_handlers_once():
    logger = logging.getLogger("limiter-test")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        limit_repeats(logger)
        limit_repeats(logger)
        assert sum(isinstance(f, RepeatLimiter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)
