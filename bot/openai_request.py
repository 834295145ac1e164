"""The engine node's request: a `/v1/completions` body in vLLM's fields → one prepared engine request per prompt."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from core.errors import UserError
from core.grammar import reject_control_chars
from core.knobs import VOCAB_TOP_K_MAX, Knobs, validate_knobs
from core.prompt_rules import check_prompt_ids
from core.service import BotCore
from core.types import GenRequest, PreparedRequest

KNOB_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "n", "no_repeat_ngram_size")
FLAGS = ("stream", "echo", "return_tokens_as_token_ids", "return_token_ids")
ACCEPTED = {"model", "prompt", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", *FLAGS, *KNOB_FIELDS}
# Accepted only at the value that means "off", since that is what the engine does anyway.
NEUTRAL = {"stop": (None, [], ""), "suffix": (None, ""), "user": None, "presence_penalty": (None, 0, 0.0),
           "frequency_penalty": (None, 0, 0.0), "stream_options": None, "best_of": (None, 1),
           "ignore_eos": (None, False), "skip_special_tokens": (None, True)}
OPENAI_DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


@dataclass(frozen=True)
class Completion:
    """A parsed /v1/completions request: one prepared engine request per prompt, and how to answer."""

    prepared: tuple[PreparedRequest, ...]
    texts: tuple[str, ...]  # each prompt as text (echo)
    stream: bool
    echo: bool
    scoring_only: bool  # max_tokens 0 with echo: the prompt's log-probabilities, nothing generated
    logprobs: int | None
    prompt_logprobs: int | None
    as_ids: bool  # return_tokens_as_token_ids
    token_ids: bool  # return_token_ids


def model_id(core: BotCore) -> str:
    """The served model's name: the checkpoint's file or directory name, else model.pretrained."""
    checkpoint = core.settings.model.checkpoint.strip()
    return Path(checkpoint).name if checkpoint else core.settings.model.pretrained


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompts(value: object) -> list[str | list[int]]:
    """A string, a list of token ids, or a non-empty list of either, as a list of prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(map(_is_int, value)):
            return [value]
        if all(isinstance(p, str) for p in value) or all(
                isinstance(p, list) and p and all(map(_is_int, p)) for p in value):
            return list(value)
    raise UserError("prompt는 문자열, 토큰 id 목록, 또는 그 둘 중 한 가지의 목록이어야 합니다. (prompt must be a "
                    "string, a list of token ids, or a list of strings or of token-id lists)")


def _count(body: dict, field: str, default: int | None, high: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return default
    if not _is_int(value) or value < 0 or (high is not None and value > high):
        allowed = "0 이상의 정수" if high is None else f"0 이상 {high} 이하의 정수"
        english = "a non-negative integer" if high is None else f"an integer from 0 to {high}"
        raise UserError(f"{field}는 {allowed}여야 합니다. ({field} must be {english})")
    return value


def _flag(body: dict, field: str) -> bool:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise UserError(f"{field}는 true 또는 false여야 합니다. ({field} must be a boolean)")
    return bool(value)


def _knobs(body: dict, core: BotCore) -> Knobs:
    """The sampling knobs the body sets, over the server's defaults (lengths are set per prompt later)."""
    raw = {k: body[k] for k in KNOB_FIELDS if body.get(k) is not None}
    if raw.get("top_k") in (-1, 0):  # vLLM's "no top-k"
        raw["top_k"] = VOCAB_TOP_K_MAX
    temperature = raw.get("temperature")
    if (_is_int(temperature) or isinstance(temperature, float)) and temperature == 0:
        raw.update(temperature=1.0, top_k=1)  # greedy, as OpenAI and vLLM read temperature 0: the most likely token
    # No server-side rerank in this dialect (best_of is accepted only as 1): the chats' default does not apply.
    return replace(validate_knobs(raw, core.engine.defaults, core.settings.limits), best_of=1)


def _ids_of(prompt: str | list[int], core: BotCore) -> tuple[str, list[int]]:
    """A prompt's text and token ids: a string is checked and tokenized once; ids stay as they are."""
    tokenizer, limits = core.engine.tokenizer, core.settings.limits
    if isinstance(prompt, list):
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise UserError(f"prompt의 토큰 id는 0 이상 {vocab} 미만이어야 합니다. (token ids must be in [0, {vocab}))")
        return tokenizer.decode(prompt), prompt
    if not prompt:
        raise UserError("prompt가 비어 있습니다. (prompt is empty)")
    reject_control_chars(prompt)
    if len(prompt) > limits.max_prompt_chars:
        raise UserError(f"prompt가 너무 깁니다: {len(prompt)}자. 최대 {limits.max_prompt_chars}자까지 가능합니다. "
                        f"(prompt too long: {len(prompt)} characters, at most {limits.max_prompt_chars})")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("prompt가 비어 있습니다. (prompt is empty)")
    return prompt, ids


def parse_completion(body: object, core: BotCore) -> Completion:
    """The request's prompts prepared for the engine, and how to answer; UserError (LookupError for an unknown model)
    naming the field that is wrong and its allowed range."""
    if not isinstance(body, dict):
        raise UserError("요청 본문은 JSON 객체여야 합니다. (body must be a JSON object)")
    unknown = sorted(k for k in body if k not in ACCEPTED and k not in NEUTRAL)
    ignored = sorted(k for k, ok in NEUTRAL.items() if k in body and ok is not None and body[k] not in ok)
    if unknown or ignored:
        names = ", ".join(unknown + ignored)
        raise UserError(f"이 서버는 {names}을(를) 지원하지 않습니다. (unsupported field(s): {names})")
    name = body.get("model")
    if name not in (None, "", model_id(core)):
        raise LookupError(f"모델 '{name}'이(가) 없습니다. 이 서버의 모델: {model_id(core)} (the model does not exist)")
    stream, echo, as_ids, token_ids = (_flag(body, f) for f in FLAGS)
    prompts = _prompts(body.get("prompt"))
    max_tokens = _count(body, "max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
    min_tokens = _count(body, "min_tokens", 0)
    logprobs = _count(body, "logprobs", None, MAX_LOGPROBS)
    prompt_logprobs = _count(body, "prompt_logprobs", None, MAX_LOGPROBS)
    if max_tokens == 0 and not echo:
        raise UserError("max_tokens 0은 echo: true와 함께일 때만 쓸 수 있습니다 (프롬프트만 채점). (max_tokens 0 needs "
                        "echo: true: the prompt is scored, nothing generated)")
    if min_tokens > max_tokens:
        raise UserError(f"min_tokens({min_tokens})는 max_tokens({max_tokens}) 이하여야 합니다. "
                        f"(min_tokens must be ≤ max_tokens)")
    if stream and prompt_logprobs is not None:
        raise UserError("prompt_logprobs는 stream과 함께 쓸 수 없습니다. (prompt_logprobs is not available with stream)")
    knobs = _knobs(body, core)
    limits = core.settings.limits
    if len(prompts) * knobs.n > limits.max_rows_per_request:
        raise UserError(f"prompt 수 × n은 {limits.max_rows_per_request} 이하여야 합니다. (prompts × n must be at most "
                        f"{limits.max_rows_per_request})")
    scoring_only = max_tokens == 0
    sampled = None if scoring_only else logprobs
    # The prompt's side: asked outright, or for echo's log-probabilities (with at least as many alternatives).
    scored = max(prompt_logprobs or 0, logprobs or 0) if prompt_logprobs is not None or (echo and logprobs is not None) else None
    if (sampled is not None or scored is not None) and getattr(core.engine, "backend", "") != "local":
        raise UserError("이 노드는 다른 생성 서버에 생성을 맡기므로 log-probability를 줄 수 없습니다. (this node relays "
                        "to another server and cannot report log-probabilities)")
    prepared, texts = [], []
    for prompt in prompts:
        text, ids = _ids_of(prompt, core)
        if scoring_only:  # a prompt to score, not to continue: it may be as long as a whole generation
            if len(ids) > limits.max_length:
                raise UserError(f"채점할 prompt가 너무 깁니다: {len(ids)}토큰. 최대 {limits.max_length}토큰까지 가능합니다. "
                                f"(prompt too long to score: {len(ids)} tokens, at most {limits.max_length})")
        elif len(ids) + max_tokens > limits.max_length and len(ids) <= limits.max_prompt_tokens:
            room = limits.max_length - len(ids)
            raise UserError(f"max_tokens({max_tokens})가 너무 큽니다: 프롬프트가 {len(ids)}토큰이라 최대 {room}까지 "
                            f"가능합니다. (max_tokens too large: the prompt has {len(ids)} tokens and at most "
                            f"{limits.max_length} fit, so max_tokens ≤ {room})")
        max_length = len(ids) + max(1, max_tokens)
        request = GenRequest(label=None, prompt=text, origin="openai", logprobs=sampled, prompt_logprobs=scored,
                             knobs=replace(knobs, max_length=max_length, min_length=min(len(ids) + min_tokens, max_length)))
        # One token is sampled after a prompt that is only scored, and dropped: the engine always samples one.
        prepared.append(PreparedRequest(request, tuple(check_prompt_ids(ids, request, limits, scoring_only)),
                                        scoring_only))
        texts.append(text)
    return Completion(tuple(prepared), tuple(texts), stream, echo, scoring_only, logprobs, prompt_logprobs, as_ids,
                      token_ids)
