"""Graceful shutdown: SIGTERM while a reply is in flight (a real `python -m bot` process against the fake Bot API),
work unfinished after the grace gets the Korean "restarting" error, and a restart does not answer old updates."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path

from conftest import make_settings
from fake_bot_api import FakeBotAPI, finished
from helpers import ROOT, subprocess_env
from test_faults import engine_over

from bot.runner import run_front_ends
from core.engine import RESTARTING
from core.service import BotCore

TOKEN = "123456789:AAF-shutdown_Token-xyz"
CHAT = 4001


async def start_bot(fake: FakeBotAPI, tiny_dir: Path, tmp_path: Path) -> asyncio.subprocess.Process:
    env = subprocess_env(
        BOT_MODEL__PRETRAINED=str(tiny_dir), BOT_WEB__ENABLED="false",
        BOT_TELEGRAM__TOKEN=TOKEN, BOT_TELEGRAM__BASE_URL=fake.base_url, BOT_TELEGRAM__BASE_FILE_URL=fake.file_url,
        BOT_STORE__PATH=str(tmp_path / "store.sqlite3"), BOT_LIMITS__USER_INTERVAL_S="0", BOT_LIMITS__SHUTDOWN_GRACE_S="20",
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    polls = len(fake.calls_of("getUpdates", status=None))
    await fake.wait_for(lambda: len(fake.calls_of("getUpdates", status=None)) > polls or proc.returncode is not None,
                        timeout=90)
    return proc


async def terminate(proc: asyncio.subprocess.Process, signalled: bool = False) -> str:
    """SIGTERM (unless `signalled` already) and the output until the process exits."""
    if not signalled:
        proc.send_signal(signal.SIGTERM)
    output, _ = await asyncio.wait_for(proc.communicate(), 40)
    return output.decode()


async def read_until(proc: asyncio.subprocess.Process, text: str) -> str:
    """The process's output up to the line containing `text` (the process goes on)."""
    lines = []
    while not lines or text not in lines[-1]:
        line = (await proc.stdout.readline()).decode()
        assert line, "".join(lines) + f"\n(ended without {text!r})"
        lines.append(line)
    return "".join(lines)


async def test_sigterm_sends_the_reply_in_flight_then_restart_does_not_answer_again(tiny_dir, tmp_path):
    fake = await FakeBotAPI(TOKEN).start()
    proc = None
    try:
        proc = await start_bot(fake, tiny_dir, tmp_path)
        answer = asyncio.Event()  # the fake answers the reply's send only once the bot is stopping
        fake.fail_next("sendMessage", chat_id=CHAT, status=None, hold=answer)
        message = fake.user_message(CHAT, "/gen 긍정 아 정말 seed=7")
        handled = fake.last_update_id
        await fake.wait_for(lambda: fake.calls_of("sendMessage", status=None), timeout=30)
        proc.send_signal(signal.SIGTERM)  # the reply is on its way …
        stopping = await asyncio.wait_for(read_until(proc, "finishing in-flight"), 40)
        answer.set()  # … and arrives while the bot stops
        output = stopping + await terminate(proc, signalled=True)
        assert proc.returncode == 0, output
        assert "Traceback" not in output, output
        replies = fake.replies_to(message)
        assert len(replies) == 1 and replies[0]["text"].startswith("긍정 아 정말") and "reply_markup" in replies[0], output
        # PTB confirmed the handled update on the way out: its last poll asked for the next one.
        assert fake.called("getUpdates")[-1].get("offset") == handled + 1

        # The restarted bot answers the new message, never the old one again.
        proc = await start_bot(fake, tiny_dir, tmp_path)
        fresh = fake.user_message(CHAT, "/gen 부정 스토리가 seed=8")
        await fake.wait_for(lambda: any(finished(m) for m in fake.replies_to(fresh)), timeout=30)
        output = await terminate(proc)  # it has exited: whatever it would have sent has arrived
        assert proc.returncode == 0, output
        assert len(fake.replies_to(message)) == 1 and len(fake.replies_to(fresh)) == 1
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await fake.close()


class HeldOnceShown:
    """A model hook: a slow model (at least 50 ms a decoding step, so 120 tokens outlast the wait for the first text)
    until the test has seen the reply's first text, then held, until the test lets go, past any grace."""

    def __init__(self):
        self.shown, self.go = threading.Event(), threading.Event()

    def __call__(self, input_ids, position_ids):
        if self.shown.wait(0.05):
            self.go.wait(30)


async def test_work_unfinished_after_the_grace_is_told_the_bot_is_restarting(tiny_dir, tmp_path):
    fake = await FakeBotAPI(TOKEN).start()
    settings = make_settings(tiny_dir, tmp_path, web={"enabled": False},
                             limits={"user_interval_s": 0, "shutdown_grace_s": 0.5},
                             telegram={"token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.file_url})
    held = HeldOnceShown()
    engine = engine_over(settings, held)
    engine.start()
    core = BotCore.create(settings, engine)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_front_ends(core, stop))
    try:
        await fake.wait_for(lambda: fake.called("getUpdates", status=None))
        message = fake.user_message(CHAT, "/gen 긍정 아 정말 min_length=120 max_length=120")
        await fake.wait_for(lambda: fake.replies_to(message), timeout=20)  # generating, first text shown
        held.shown.set()  # from the next step on, the work cannot finish
        stop.set()  # what SIGTERM does
        await asyncio.wait_for(runner, 20)
        (reply,) = fake.replies_to(message)
        assert reply["text"] == RESTARTING and "reply_markup" not in reply
        assert fake.called("getUpdates")[-1].get("offset") == fake.last_update_id + 1  # confirmed, not fetched again
    finally:
        held.go.set()
        core.store.close()
        await engine.stop()
        await fake.close()
