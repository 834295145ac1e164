"""Pick the generation backend named by `[engine] backend`: the model in this process, or a remote server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from core.backend import Backend
from core.errors import ModelLoadError
from core.settings import Settings

if TYPE_CHECKING:
    from core.tokenizer import TextTokenizer


async def start_backend(settings: Settings) -> Backend:
    """A started backend: `local` loads the model here; `openai` needs only the tokenizer, to count prompt tokens,
    and probes the server once (a server that does not serve `engine.model` stops the start with one sentence)."""
    if settings.engine.backend == "local":
        from core.engine import start_engine

        return await start_engine(settings)
    from core.remote_engine import RemoteEngine

    tokenizer = await asyncio.to_thread(load_counting_tokenizer, settings)
    engine = RemoteEngine(settings, tokenizer)
    await engine.connect()
    return engine


def load_counting_tokenizer(settings: Settings) -> TextTokenizer:
    """`engine.tokenizer` (a tokenizer.json or its directory), else model.pretrained's tokenizer."""
    from core.model_loading import SPECIAL_TOKENS, load_tokenizer
    from core.tokenizer import TextTokenizer

    source = settings.engine.tokenizer.strip() or settings.model.pretrained
    if Path(source).is_file():
        try:
            return TextTokenizer.from_files(Path(source), SPECIAL_TOKENS)
        except Exception as exc:  # noqa: BLE001 (the tokenizers library raises its own types for a broken file)
            raise ModelLoadError(f"engine.tokenizer {source}을(를) 토크나이저로 읽을 수 없습니다 (tokenizer.json이어야 "
                                 f"합니다). (cannot read engine.tokenizer as a tokenizer.json: {exc})") from None
    return load_tokenizer(source)
