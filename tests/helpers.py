"""What many test files need, once: a free loopback port and a clean environment for `python -m bot` subprocesses.

Fake servers live beside this module (`fake_bot_api.FakeBotAPI` for Telegram's Bot API, `fake_vllm.FakeVLLM` for an
OpenAI/vLLM server); settings over the tiny model come from `conftest.make_settings`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on now: bind it to get one, then close it. Connections to it are refused
    until someone binds it again (a test's own server, or nobody: a 'closed' address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_url() -> str:
    """An http:// address where connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of the bot: this one's without any BOT_* variable, the developer's .env
    replaced by an empty file, the hub offline, this checkout first on the import path, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    path = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", BOT_ENV_FILE=os.devnull,
               PYTHONPATH=os.pathsep.join(dict.fromkeys(path)), **extra)
    return env
