"""Telegram inline mode: `@YourBot 긍정 아 정말 top_p=0.9` in any chat offers up to three candidates to send.

The query goes through the `/gen` door (grammar, allowlist by user, prompt length, rate limit) once the user has
stopped typing (core.inline), and is answered within Telegram's inline time limit or not at all. Enable it with
BotFather's /setinline."""

from __future__ import annotations

import asyncio
import logging

from telegram import InlineQueryResultArticle, InputTextMessageContent, Update
from telegram.constants import ParseMode
from telegram.ext import ContextTypes

from bot.telegram_bot import NO_PREVIEW, _conversation, _who, inline_hint, render
from core.inline import CANDIDATES, DEADLINE_S, candidates
from core.replies import shorten
from core.types import Generation

log = logging.getLogger(__name__)

CACHE_TIME_S = 30  # Telegram's own cache of an answer (per user: is_personal, since the allowlist is per user)
DESCRIPTION_LIMIT = 120
EMPTY_HINT = "예: 긍정 아 정말 top_p=0.9 (type a prompt)"


def articles(gen: Generation) -> list[InlineQueryResultArticle]:
    """One result per candidate: its label, seed and (with best_of) confidence in the title; the message sent is the
    candidate as /gen shows it."""
    label = gen.request.label or "라벨 없음"
    results = []
    for i, one in enumerate(candidates(gen), 1):
        sure = f" · {label} {one.confidence[0]:.0%}" if one.confidence is not None and gen.request.label else ""
        results.append(InlineQueryResultArticle(
            id=f"{i}-{one.seeds[0]}", title=f"{i}. {label} · seed={one.seeds[0]}{sure}",
            description=shorten(gen.request.model_prompt + one.continuations[0], DESCRIPTION_LIMIT),
            input_message_content=InputTextMessageContent(render(one), parse_mode=ParseMode.HTML,
                                                          link_preview_options=NO_PREVIEW)))
    return results


async def inline_query(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.inline_query.query
    conversation = _conversation(context)
    core, who = conversation.core, _who(update)
    if not query.strip():
        await inline_hint(update, EMPTY_HINT)
        return
    if not await core.inline.settled(who.user):
        return  # typed on: the newer query answers
    # The allowlist (by user: an inline query has no chat) was checked by the access gate before this handler.
    gen = core.inline.cached(query)
    if gen is None:
        prepared = conversation.from_text(query, who, candidates=CANDIDATES)
        try:
            gen = await asyncio.wait_for(conversation.backend_of(prepared.request).generate(prepared),
                                         DEADLINE_S - core.inline.debounce_s)
        except TimeoutError:  # cancelled, so the engine frees its rows; a late answer would be refused anyway
            log.info("telegram inline: not answered within %.0f s", DEADLINE_S)
            return
        core.inline.remember(query, gen)
    await update.inline_query.answer(articles(gen), cache_time=CACHE_TIME_S, is_personal=True)
