"""The runner: a platform unreachable at start is retried with backoff while the other front ends keep serving."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import discord
import pytest
from conftest import make_settings, running_core
from helpers import free_port as _closed_port

import bot.runner as runner


async def _until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_discord_unreachable_at_start_is_retried_and_the_web_page_keeps_serving(
    tiny_dir, tmp_path, monkeypatch, caplog
):
    """Regression: a Discord connection failure at start ended the process, web page included."""
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{_closed_port()}/api/v10")
    monkeypatch.setattr(runner, "RETRY_FIRST_S", 0.05)  # the backoff's length is not what this test is about
    web_port = _closed_port()
    settings = make_settings(tiny_dir, tmp_path, web={"port": web_port}, discord={"token": "MTIz.fake.token"})
    retries = lambda: [r for r in caplog.records if r.name == "bot.runner" and "retrying" in r.getMessage()]  # noqa: E731
    caplog.set_level(logging.INFO)
    async with running_core(settings) as core:
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run_front_ends(core, stop))
        try:
            await _until(lambda: len(retries()) >= 2 or task.done())
            assert not task.done()
            assert "cannot reach Discord" in retries()[0].getMessage()
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{web_port}/healthz") as resp:
                assert resp.status == 200
        finally:
            stop.set()
            ok = await asyncio.wait_for(task, 60)
    assert ok


async def test_only_the_transient_failure_is_retried(monkeypatch):
    class Unreachable(RuntimeError):
        pass

    failures = [Unreachable("no route"), RuntimeError("invalid token")]
    calls = []

    async def serve(core, stop):
        calls.append(1)
        raise failures[len(calls) - 1]

    monkeypatch.setattr(runner, "RETRY_FIRST_S", 0)
    with pytest.raises(RuntimeError, match="invalid token"):
        await runner.retrying("x", serve, Unreachable)(None, asyncio.Event())
    assert len(calls) == 2  # retried once after "unreachable", then the rejection went up
