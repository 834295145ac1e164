"""The bot as an engine node: `POST /v1/completions` and `GET /v1/models` in the OpenAI dialect as vLLM speaks it.

One machine with the model serves many front-end processes (`[engine] backend = "openai"`) through a stock load
balancer. Request fields: `prompt` (a string, a list of token ids, or a list of either: one completion per prompt),
`max_tokens` (0 only with `echo`: the prompt scored, nothing generated), `min_tokens`, `temperature` (0 = greedy),
`top_p`, `top_k` (0 or -1 = off), `repetition_penalty`, `seed`, `n`, `stream` (server-sent events), `echo`, `logprobs`
(0-20), vLLM's `prompt_logprobs` (0-20), `return_tokens_as_token_ids` and `return_token_ids`, and
`no_repeat_ngram_size` as an extension. Log-probabilities are of the model's raw distribution (log-softmax of its
logits before temperature, top-k/top-p and penalties), as vLLM reports them by default. A field outside this is
refused with a 400 naming it, never ignored. Lengths here count new tokens, as in OpenAI's API; `usage` counts each
completion's new tokens without the end-of-text token. Optional bearer token: `web.api_token` (or `api_token_file`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from bot.web_body import BodyRefused, check_text, read_json
from bot.web_server import client_left, dumps
from core.errors import BusyError, EngineUnavailable, RequestTimeout, ShuttingDown, UserError
from core.grammar import reject_control_chars
from core.hops import HOP_HEADER, MAX_HOPS, incoming_hops
from core.knobs import VOCAB_TOP_K_MAX, Knobs, validate_knobs
from core.prompt_rules import check_prompt_ids
from core.remote_engine import ENGINE_NODE_OWNER
from core.service import BotCore
from core.settings import Settings
from core.types import Generation, GenRequest, PreparedRequest, TokenLogprob

log = logging.getLogger(__name__)

NODE_KEY = web.AppKey("openai_core", BotCore)
KNOB_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "n", "no_repeat_ngram_size")
FLAGS = ("stream", "echo", "return_tokens_as_token_ids", "return_token_ids")
ACCEPTED = {"model", "prompt", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", *FLAGS, *KNOB_FIELDS}
# Accepted only at the value that means "off", since that is what the engine does anyway.
NEUTRAL = {"stop": (None, [], ""), "suffix": (None, ""), "user": None, "presence_penalty": (None, 0, 0.0),
           "frequency_penalty": (None, 0, 0.0), "stream_options": None, "best_of": (None, 1),
           "ignore_eos": (None, False), "skip_special_tokens": (None, True)}
OPENAI_DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
LOGPROB_FLOOR = -9999.0  # what vLLM sends for -inf (JSON has no infinity)


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


def add_routes(app: web.Application, core: BotCore) -> None:
    """The engine-node API on the web front end's app (bot/web.py calls this)."""
    app[NODE_KEY] = core
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models)])


def model_id(core: BotCore) -> str:
    """The served model's name: the checkpoint's file or directory name, else model.pretrained."""
    checkpoint = core.settings.model.checkpoint.strip()
    return Path(checkpoint).name if checkpoint else core.settings.model.pretrained


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, dumps=dumps)


def _authorised(request: web.Request, core: BotCore) -> bool:
    """`Authorization: Bearer <token>`; the scheme's case does not matter (RFC 9110), the token's does."""
    token = core.settings.web.api_secret()
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as the bytes they were.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, token.encode())


def _unauthorised() -> web.Response:
    return _error(401, "API 토큰이 없거나 틀립니다. (missing or wrong bearer token)", "authentication_error")


async def models(request: web.Request) -> web.Response:
    core = request.app[NODE_KEY]
    if not _authorised(request, core):
        return _unauthorised()
    entry = {"id": model_id(core), "object": "model", "created": 0, "owned_by": ENGINE_NODE_OWNER,
             "max_model_len": core.settings.limits.max_length}
    return web.json_response({"object": "list", "data": [entry]}, dumps=dumps)


# ---- parsing ----------------------------------------------------------------------------------------------------
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
    return validate_knobs(raw, core.engine.defaults, core.settings.limits)


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


# ---- answering --------------------------------------------------------------------------------------------------
def _floor(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class _Tokens:
    """Token ids → the strings `logprobs.tokens` shows (the token decoded, or `token_id:N` when asked)."""

    def __init__(self, core: BotCore, as_ids: bool):
        self.tokenizer, self.as_ids = core.engine.tokenizer, as_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.tokenizer.decode([token])


def logprobs_block(positions: Sequence[tuple[int, TokenLogprob | None]], top: int, text: Callable[[int], str],
                   offset: int = 0) -> dict:
    """OpenAI's `logprobs` object for these (token, entry) positions: each token, its log-probability (None for a
    prompt's first token), its `top` alternatives with the token itself first, and where its text starts."""
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token, entry in positions:
        shown = text(token)
        out["text_offset"].append(offset)
        out["tokens"].append(shown)
        offset += len(shown)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_floor(entry.logprob))
        alternatives = {shown: _floor(entry.logprob)}
        for other, value in entry.top[:top]:
            alternatives.setdefault(text(other), _floor(value))
        out["top_logprobs"].append(alternatives)
    return out


def _prompt_logprobs(entries: Sequence[TokenLogprob], top: int, text: Callable[[int], str]) -> list:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}} with the
    prompt's own token and its `top` alternatives."""
    out: list = [None]
    for entry in entries:
        position = {entry.token: {"logprob": _floor(entry.logprob), "rank": entry.rank, "decoded_token": text(entry.token)}}
        for rank, (other, value) in enumerate(entry.top[:top], 1):
            position.setdefault(other, {"logprob": _floor(value), "rank": rank, "decoded_token": text(other)})
        out.append({str(token): value for token, value in position.items()})
    return out


def _prompt_positions(prepared: PreparedRequest, gen: Generation) -> list[tuple[int, TokenLogprob | None]]:
    ids = prepared.prompt_ids
    return [(ids[0], None), *((e.token, e) for e in (gen.prompt_logprobs or ()))]


def _sampled_positions(gen: Generation, i: int) -> list[tuple[int, TokenLogprob | None]]:
    return [(e.token, e) for e in (gen.logprobs[i] if gen.logprobs else ())]


def _choices(completion: Completion, gens: Sequence[Generation], core: BotCore) -> tuple[list[dict], int]:
    """The non-streamed choices (prompt p's i-th completion at index p × n + i) and the completion tokens."""
    text = _Tokens(core, completion.as_ids)
    choices, new_tokens = [], 0
    for prepared, prompt_text, gen in zip(completion.prepared, completion.texts, gens):
        new_tokens += 0 if completion.scoring_only else _new_tokens(gen)
        for i, continuation in enumerate(gen.continuations):
            tokens = () if completion.scoring_only or not gen.token_ids else gen.token_ids[i]
            choice = {"index": len(choices), "text": continuation, "logprobs": None,
                      "finish_reason": "length" if completion.scoring_only else _finish(gen, i),
                      "stop_reason": None}
            positions = [] if completion.scoring_only else _sampled_positions(gen, i)
            if completion.echo:
                choice["text"] = prompt_text + ("" if completion.scoring_only else continuation)
                positions = _prompt_positions(prepared, gen) + positions
            if completion.logprobs is not None:
                choice["logprobs"] = logprobs_block(positions, completion.logprobs, text)
            if completion.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _prompt_logprobs(gen.prompt_logprobs or (), completion.prompt_logprobs, text)
            if completion.token_ids:
                choice["prompt_token_ids"] = list(prepared.prompt_ids)
                ended = _finish(gen, i) == "stop" and not completion.scoring_only
                choice["token_ids"] = [*tokens, *((core.engine.eos_id,) if ended else ())]
            choices.append(choice)
    return choices, new_tokens


def _finish(gen: Generation, i: int) -> str | None:
    """Why result i ended, as the backend says ("stop" or "length"); None where a backend does not say."""
    return gen.finish_reasons[i] if i < len(gen.finish_reasons) else None


def _new_tokens(gen: Generation) -> int:
    """The results' new tokens, the end-of-text token not counted (the engine's count where it gives no ids)."""
    return sum(map(len, gen.token_ids)) if gen.token_ids else gen.new_tokens


def _usage(prompt_tokens: int, new_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens, "total_tokens": prompt_tokens + new_tokens}


def _hops(request: web.Request) -> int:
    """The hop count the request came with; UserError when it is not a count or the request has looped."""
    raw = request.headers.get(HOP_HEADER, "0").strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 3:
        raise UserError(f"{HOP_HEADER} 헤더는 0 이상의 정수여야 합니다. ({HOP_HEADER} must be a non-negative integer)")
    hops = int(raw)
    if hops >= MAX_HOPS:
        raise UserError(f"요청이 봇 엔진 노드를 {hops}번 거쳐 왔습니다. engine.url이 돌고 도는지 확인하세요. (the request "
                        f"has passed through {hops} bot engine nodes: engine.url settings form a loop)")
    return hops


async def completions(request: web.Request) -> web.StreamResponse:
    core = request.app[NODE_KEY]
    if not _authorised(request, core):
        return _unauthorised()
    try:
        hops = _hops(request)
        body = await read_json(request)
        check_text(body)
        completion = parse_completion(body, core)
    except BodyRefused as exc:
        core.engine.telemetry.refused("openai", "user_error")
        return exc.response(_error)
    except LookupError as exc:
        core.engine.telemetry.refused("openai", "user_error")
        return _error(404, str(exc.args[0]), "NotFoundError", "model")
    except UserError as exc:
        core.engine.telemetry.refused("openai", "user_error")
        return _error(400, str(exc))
    ident, created, name = f"cmpl-{secrets.token_hex(12)}", int(time.time()), model_id(core)
    token = incoming_hops.set(hops)  # a remote backend's requests from here on carry hops + 1
    try:
        if completion.stream:
            return await _stream(request, core, completion, ident, created, name)
        try:
            gens = await _generate_all(core, completion.prepared)
        except Exception as exc:  # noqa: BLE001 (mapped to a status; unexpected ones are logged there)
            return _engine_error(exc)
    finally:
        incoming_hops.reset(token)
    choices, new_tokens = _choices(completion, gens, core)
    prompt_tokens = sum(len(p.prompt_ids) for p in completion.prepared)
    return web.json_response({"id": ident, "object": "text_completion", "created": created, "model": name,
                              "choices": choices, "usage": _usage(prompt_tokens, new_tokens)}, dumps=dumps)


async def _generate_all(core: BotCore, prepared: Sequence[PreparedRequest]) -> list[Generation]:
    """Every prompt's generation, side by side in the engine's batch; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(core.engine.generate(p)) for p in prepared]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    failed = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    if failed is not None:
        raise failed
    return [task.result() for task in tasks]


def _engine_error(exc: Exception) -> web.Response:
    if isinstance(exc, BusyError):
        return _error(429, str(exc), "rate_limit_error")
    if isinstance(exc, (RequestTimeout, ShuttingDown, EngineUnavailable)):
        return _error(503, str(exc), "server_error")
    if isinstance(exc, UserError):
        return _error(400, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    log.error("engine-node completion failed", exc_info=exc)
    return _error(500, "생성 중 오류가 났습니다. (generation failed)", "server_error")


async def _merged(streams: Sequence[AsyncIterator[Generation]]) -> AsyncIterator[tuple[int, Generation]]:
    """(prompt index, update) from several engine streams as each comes; every stream is closed on the way out."""
    pending = {asyncio.ensure_future(anext(s)): k for k, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                k = pending.pop(task)
                try:
                    gen = task.result()
                except StopAsyncIteration:
                    continue
                yield k, gen
                pending[asyncio.ensure_future(anext(streams[k]))] = k
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def _stream(request: web.Request, core: BotCore, completion: Completion, ident: str, created: int,
                  name: str) -> web.StreamResponse:
    """Server-sent events as vLLM sends them: `data: {chunk}` per text delta (with its tokens' log-probabilities when
    asked; prompt p's i-th choice at index p × n + i), a last chunk per choice with its finish_reason, one usage
    chunk, then `data: [DONE]`."""
    updates = _merged([core.engine.stream(p) for p in completion.prepared])
    try:
        first = await anext(updates)  # errors before any text still get a proper status code
    except Exception as exc:  # noqa: BLE001
        await updates.aclose()
        return _engine_error(exc)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    n = completion.prepared[0].request.knobs.n
    choices = n * len(completion.prepared)
    sent, tokens_sent, offsets = [""] * choices, [0] * choices, [0] * choices
    echoed, finished = [False] * len(completion.prepared), [0] * len(completion.prepared)
    text = _Tokens(core, completion.as_ids)

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    async def chunk(i: int, delta: str, positions: list, finish: str | None = None) -> None:
        choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if completion.logprobs is not None:
            choice["logprobs"] = logprobs_block(positions, completion.logprobs, text, offsets[i])
        offsets[i] += len(delta)
        await send({"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [choice]})

    async def emit(p: int, gen: Generation) -> None:
        if completion.echo and not echoed[p]:
            echoed[p] = True
            for i in range(p * n, (p + 1) * n):
                await chunk(i, completion.texts[p], _prompt_positions(completion.prepared[p], gen))
        if completion.scoring_only:
            if not finished[p]:
                finished[p] = 1
                for i in range(p * n, (p + 1) * n):
                    await chunk(i, "", [], "length")
            return
        for j, continuation in enumerate(gen.continuations):
            i = p * n + j
            # A trailing "�" is half a character that the next step completes: hold it back until then.
            stable = continuation if gen.done else continuation.rstrip("�")
            positions = _sampled_positions(gen, j)[tokens_sent[i]:]
            grew = stable.startswith(sent[i]) and len(stable) > len(sent[i])
            if grew or (positions and completion.logprobs is not None and not gen.done):
                delta = stable[len(sent[i]):] if grew else ""
                sent[i] = stable if grew else sent[i]
                tokens_sent[i] += len(positions)
                await chunk(i, delta, positions)
                positions = []
            if gen.done:
                tokens_sent[i] += len(positions)
                await chunk(i, "", positions, _finish(gen, j))
        if gen.done:
            finished[p] = _new_tokens(gen)

    try:
        update = first
        while True:
            await emit(*update)
            if completion.scoring_only and all(finished):  # every prompt scored: nothing more to wait for
                break
            try:
                update = await anext(updates)
            except StopAsyncIteration:
                break
        prompt_tokens = sum(len(p.prompt_ids) for p in completion.prepared)
        new_tokens = 0 if completion.scoring_only else sum(finished)
        await send({"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [],
                    "usage": _usage(prompt_tokens, new_tokens)})
        await send("[DONE]")
    except ConnectionResetError:
        client_left(request, "/v1/completions")
        return response
    except Exception as exc:  # the status line is gone: the error goes in the stream, as vLLM does
        if not isinstance(exc, UserError):
            log.error("engine-node stream failed", exc_info=exc)
        try:
            await send({"error": {"message": str(exc) if isinstance(exc, UserError) else "generation failed",
                                  "type": "server_error", "code": 503}})
        except ConnectionResetError:
            client_left(request, "/v1/completions")
            return response
    finally:
        await updates.aclose()
    await response.write_eof()
    return response


# ---- start-up ----------------------------------------------------------------------------------------------------
def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _this_machine(host: str) -> bool:
    """Whether `host` names this machine: a loopback name, or an address a socket here can bind to."""
    if _loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((address[0], 0))
        except OSError:
            continue
        return True
    return False


def check_not_own_node(settings: Settings) -> None:
    """A bot whose remote backend is its own web server would send every generation to itself: refuse to start."""
    if settings.engine.backend != "openai" or not settings.web.enabled:
        return
    url = urlsplit(settings.engine.url.strip())
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return  # a malformed URL is the settings' own error to report
    host, own = (url.hostname or "").lower(), settings.web.host.strip().lower()
    if port != settings.web.port or not host:
        return
    if own in ("0.0.0.0", "::", ""):  # listening everywhere: any address of this machine reaches it
        itself = _this_machine(host)
    elif _loopback(own):
        itself = _loopback(host)
    else:
        itself = host == own
    if itself:
        raise UserError(f"engine.url({settings.engine.url})이 이 봇 자신의 웹 서버(포트 {port})를 가리킵니다. 다른 "
                        f"생성 서버의 주소를 쓰세요. (engine.url points at this bot's own engine node, which would send "
                        f"every request to itself)")
