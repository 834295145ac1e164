"""Shared fixtures: a tiny KoGPT2-format model built offline once per session, and a running engine over it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny

from core.conversation import Conversation, Who
from core.engine import Engine
from core.model_loading import load_model
from core.service import BotCore
from core.settings import Settings, load_settings
from core.types import PreparedRequest

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("httpx").setLevel(logging.WARNING)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What is loaded by now (torch, transformers, the collected tests) lives to the end: full garbage collections
    # need not walk it again (one such pass cost a fast test file half its time).
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "kogpt2-tiny")


@pytest.fixture(scope="module")
def trained(tiny_dir: Path) -> transformers.GPT2LMHeadModel:
    """The tiny model with different weights, as if fine-tuned, so loading it is observable."""
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


@pytest.fixture(scope="session")
def _empty_hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, _empty_hf_home: Path) -> None:
    # A developer's own BOT_* variables must not leak into tests.
    import os

    for key in list(os.environ):
        if key.startswith("BOT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BOT_ENV_FILE", os.devnull)  # nor a developer's .env in the working directory
    # Nor their Hugging Face cache: bots started by a test see an empty one (and the hub is offline for them).
    monkeypatch.setenv("HF_HOME", str(_empty_hf_home))


def make_settings(tiny_dir: Path, tmp_path: Path, **sections: dict) -> Settings:
    """Settings over the tiny model with a private store; `sections` override whole-section values."""
    # best_of 1: the tiny model's weights are random, so a rerank would only change which seed a test sees; the
    # best_of tests ask for it explicitly.
    base = {"model": {"pretrained": str(tiny_dir)}, "store": {"path": str(tmp_path / "store.sqlite3")},
            "generation": {"best_of": 1}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(**base)


@pytest.fixture
def settings(tiny_dir: Path, tmp_path: Path) -> Settings:
    return make_settings(tiny_dir, tmp_path)


@contextlib.asynccontextmanager
async def running_engine(settings: Settings) -> AsyncIterator[Engine]:
    """An engine over `settings`' model, started, and stopped on the way out."""
    eng = Engine(load_model(settings.model), settings)
    eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


@contextlib.asynccontextmanager
async def running_core(settings: Settings) -> AsyncIterator[BotCore]:
    """What `python -m bot` shares between front ends: a core over a running engine."""
    async with running_engine(settings) as eng:
        bot_core = BotCore.create(settings, eng)
        try:
            yield bot_core
        finally:
            bot_core.store.close()


@contextlib.asynccontextmanager
async def telegram_running(bot_core: BotCore, fake) -> AsyncIterator[None]:
    """The Telegram front end's `serve()` as bot/runner.py runs it, polling `fake`; it must stop promptly after.

    `fake.settled()` works inside: it joins PTB's update queue, which counts an update done once its handler returned.
    """
    import bot.telegram_app as tg

    built = []

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    real_build, stop = tg.build_application, asyncio.Event()
    polls = len(fake.called("getUpdates", status=None))  # a fake that served an earlier bot has seen polls already
    with mock.patch.object(tg, "build_application", build):
        task = asyncio.create_task(tg.serve(bot_core, stop))
        await fake.wait_for(lambda: len(fake.called("getUpdates", status=None)) > polls or task.done())
    if task.done():
        task.result()
    fake.handlers_done = built[0].update_queue.join
    try:
        yield
    finally:
        fake.handlers_done = None
        stop.set()
        await asyncio.wait_for(task, 10)


def gen_request(bot_core: BotCore, args: str, chat: str, user: str) -> PreparedRequest:
    """`/gen args` through the text door, as a chat front end sends it."""
    return Conversation(bot_core).from_text(args, Who(chat, user))


def shared_steps(engine: Engine, rows: int) -> float:
    """How many engine steps decoded more than `rows` rows together (from the batch-size histogram)."""
    total = within = 0.0
    for metric in engine.telemetry.metrics.batch.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == rows:
                within = sample.value
    return total - within


@pytest.fixture
async def engine(settings: Settings):
    async with running_engine(settings) as eng:
        yield eng


@pytest.fixture
async def core(settings: Settings, engine: Engine):
    bot_core = BotCore.create(settings, engine)
    yield bot_core
    bot_core.store.close()
