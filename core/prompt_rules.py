"""The prompt's length rules, in tokens: one place for every generation backend (local or remote)."""

from __future__ import annotations

from core.errors import UserError
from core.settings import LimitsSettings
from core.types import GenRequest


def check_prompt_ids(ids: list[int], request: GenRequest, limits: LimitsSettings, continuing: bool = False) -> list[int]:
    """`ids` when the prompt fits the limits, else a UserError saying the allowed range.

    `continuing`: the prompt is the bot's own earlier output, held to max_length only, not the prompt cap.
    """
    if not ids:
        raise UserError("프롬프트가 비어 있습니다. (the prompt is empty)")
    if len(ids) > limits.max_prompt_tokens and not continuing:
        raise UserError(
            f"프롬프트가 너무 깁니다: {len(ids)}토큰. 최대 {limits.max_prompt_tokens}토큰까지 가능합니다. "
            f"(prompt too long: {len(ids)} tokens, at most {limits.max_prompt_tokens})"
        )
    if len(ids) >= request.knobs.max_length:
        raise UserError(
            f"프롬프트가 이미 {len(ids)}토큰이라 max_length({request.knobs.max_length}) 안에 이어 쓸 자리가 "
            f"없습니다. max_length를 {len(ids) + 1} 이상 {limits.max_length} 이하로 지정하세요. "
            f"(max_length counts the prompt's {len(ids)} tokens; use max_length between {len(ids) + 1} "
            f"and {limits.max_length})"
        )
    return ids
