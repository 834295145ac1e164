"""The bot over real vLLM (opt-in): set VLLM_PYTHON to a Python that has vLLM installed (the CPU build does; see the
README's "Scale out"). vLLM's OpenAI server is started on loopback with the embedded model, and the bot is driven
through it: best_of 4, n 2, seeds, streaming, and vLLM restarted mid-run. Starting vLLM takes a minute or more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.web import create_app
from core.backends import start_backend
from core.errors import EngineUnavailable
from core.grammar import parse_gen
from core.remote_engine import UNREACHABLE
from core.service import BotCore
from core.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "nsmc-small"
VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "")
STARTUP_S = 900  # vLLM's CPU start-up (model load, warm-up) on a busy 2-core machine

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="VLLM_PYTHON does not name a Python with vLLM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    def __init__(self, port: int, log_path: Path):
        self.port, self.log_path, self.proc = port, log_path, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        env.pop("PYTHONPATH", None)  # vLLM's own environment, not this checkout's
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL), "--served-model-name",
                 "nsmc-small", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        async with aiohttp.ClientSession() as http:
            for _ in range(STARTUP_S * 2):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited ({self.proc.returncode}); see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/v1/models") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"vLLM did not start in {STARTUP_S} s; see {self.log_path}")

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
async def vllm(tmp_path):
    server = VLLMServer(free_port(), tmp_path / "vllm.log")
    try:
        await server.start()
        yield server
    finally:
        server.stop()


async def test_the_bot_over_real_vllm_keeps_its_promises(vllm, tmp_path):
    settings = load_settings(model={"pretrained": str(MODEL)}, store={"path": str(tmp_path / "s.db")},
                             engine={"backend": "openai", "url": vllm.url, "model": "nsmc-small", "retries": 1})
    engine = await start_backend(settings)
    core = BotCore.create(settings, engine)
    try:
        assert engine.logprobs is True and engine.notice == "" and engine.defaults.best_of == 4
        async with TestClient(TestServer(create_app(core), host="127.0.0.1")) as client:
            health = await (await client.get("/healthz")).json()
            assert health["engine"]["remote"] == "reachable" and "notice" not in health
            # best_of 4, n 2, a seed: two reranked replies, each with its confidence and the seed that made it
            body = {"prompt": "부정 배우들 연기가", "n": 2, "best_of": 4, "seed": 1234, "max_length": 30}
            first = await (await client.post("/api", json=body)).json()
            again = await (await client.post("/api", json=body)).json()
            assert len(first["results"]) == 2 and len(first["confidence"]) == 2
            assert first["results"] == again["results"] and first["seeds"] == again["seeds"]
            # a pick's seed reproduces it alone, streamed
            alone = {"prompt": "부정 배우들 연기가", "best_of": 1, "seed": first["seeds"][0], "max_length": 30}
            resp = await client.post("/api/stream", json=alone)
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line]
            # partial lines come as vLLM's tokens arrive; a 30-token reply can all be there before the first is read
            assert resp.status == 200 and "results" in lines[-1] and all("partial" in line for line in lines[:-1])
            assert lines[-1]["results"] == first["results"][:1] and lines[-1]["seeds"] == first["seeds"][:1]

        # vLLM restarted mid-run: a request in flight hears "restarting or unreachable" (not a timeout) …
        long = engine.prepare(parse_gen("긍정 아 정말 best_of=1 max_length=128 min_length=127", engine.defaults,
                                        engine.limits))
        stream = engine.stream(long)
        await anext(stream)  # text is coming: the request is in flight
        vllm.terminate()
        with pytest.raises(EngineUnavailable) as caught:
            async with asyncio.timeout(30):  # the request's own timeout is 60 s
                async for _ in stream:
                    pass
        assert str(caught.value) == UNREACHABLE
        await asyncio.to_thread(vllm.stop)
        while (await engine.health())["ok"]:
            await asyncio.sleep(0.5)
        # … and once vLLM is back, the same seed gives the same replies again
        await vllm.start()
        while not (await engine.health())["ok"]:
            await asyncio.sleep(0.5)
        after = await engine.generate(engine.prepare(parse_gen(
            "부정 배우들 연기가 n=2 best_of=4 seed=1234 max_length=30", engine.defaults, engine.limits)))
        assert list(after.texts()) == first["results"]
    finally:
        core.store.close()
        await engine.stop()
