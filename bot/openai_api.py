"""The bot as an engine node: `POST /v1/completions` and `GET /v1/models` in the OpenAI dialect as vLLM speaks it.

One machine with the model serves many front-end processes (`[engine] backend = "openai"`) through a stock load
balancer. The subset: `prompt` (text or token ids), `max_tokens`, `min_tokens`, `temperature`, `top_p`, `top_k`,
`repetition_penalty`, `seed`, `n`, `stream` (server-sent events), and `no_repeat_ngram_size` as an extension. A field
outside it is refused with a 400 naming it, never ignored. Lengths here count new tokens, as in OpenAI's API; the bot's
own knobs count the prompt too, so they are converted with the model's tokenizer. Optional bearer token:
`web.api_token` (or `api_token_file`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from bot.auth import TOKEN_KEY, authorised
from bot.client_address import client_key
from core.errors import (
    BusyError,
    EngineUnavailable,
    RequestTimeout,
    ShuttingDown,
    UserError,
)
from core.knobs import VOCAB_TOP_K_MAX, validate_knobs
from core.remote_engine import ENGINE_NODE_OWNER
from core.service import BotCore
from core.types import Generation, GenRequest

log = logging.getLogger(__name__)

NODE_KEY = web.AppKey("openai_core", BotCore)
KNOB_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "n", "no_repeat_ngram_size")
ACCEPTED = {"model", "prompt", "max_tokens", "min_tokens", "stream", *KNOB_FIELDS}
# Accepted only at the value that means "off", since that is what the engine does anyway.
NEUTRAL = {"echo": (False,), "logprobs": (None,), "stop": (None, [], ""), "suffix": (None, ""), "user": None,
           "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "stream_options": None, "best_of": (None, 1)}
OPENAI_DEFAULT_MAX_TOKENS = 16


def add_routes(app: web.Application, core: BotCore) -> None:
    """The engine-node API on the web front end's app (bot/web.py calls this)."""
    app[NODE_KEY] = core
    if TOKEN_KEY not in app:
        app[TOKEN_KEY] = core.settings.web.api_secret()
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models)])


def model_id(core: BotCore) -> str:
    """The served model's name: the checkpoint's file or directory name, else model.pretrained."""
    checkpoint = core.settings.model.checkpoint.strip()
    return Path(checkpoint).name if checkpoint else core.settings.model.pretrained


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _authorised(request: web.Request, core: BotCore) -> bool:
    return authorised(request)  # the token read at start (bot/auth.py), shared with /api


def _unauthorised() -> web.Response:
    return _error(401, "API 토큰이 없거나 틀립니다. (missing or wrong bearer token)", "authentication_error")


async def models(request: web.Request) -> web.Response:
    core = request.app[NODE_KEY]
    if not _authorised(request, core):
        return _unauthorised()
    entry = {"id": model_id(core), "object": "model", "created": 0, "owned_by": ENGINE_NODE_OWNER,
             "max_model_len": core.settings.limits.max_length}
    return web.json_response({"object": "list", "data": [entry]})


def parse_completion(body: object, core: BotCore) -> tuple[GenRequest, int, bool]:
    """The bot's request, the prompt's token count, and whether to stream; UserError naming what is wrong."""
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
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(core.engine.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise UserError(f"prompt의 토큰 id는 0 이상 {vocab} 미만이어야 합니다. (token ids must be in [0, {vocab}))")
        prompt = core.engine.tokenizer.decode(prompt, skip_special_tokens=False)
    if not isinstance(prompt, str):
        raise UserError("prompt는 문자열 하나 또는 토큰 id 목록 하나여야 합니다. (prompt must be one string or one "
                        "list of token ids)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise UserError("stream은 true 또는 false여야 합니다. (stream must be a boolean)")
    ids = core.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    raw = {k: body[k] for k in KNOB_FIELDS if body.get(k) is not None}
    if raw.get("top_k") in (-1, 0):  # vLLM's "no top-k"
        raw["top_k"] = VOCAB_TOP_K_MAX
    max_tokens = body.get("max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
    min_tokens = body.get("min_tokens", 0)
    for field, value in (("max_tokens", max_tokens), ("min_tokens", min_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{field}는 0 이상의 정수여야 합니다. ({field} must be a non-negative integer)")
    raw["max_length"] = len(ids) + max(1, max_tokens)
    raw["min_length"] = min(len(ids) + min_tokens, raw["max_length"])
    knobs = validate_knobs(raw, core.engine.defaults, core.settings.limits)
    request = GenRequest(label=None, prompt=prompt, knobs=knobs, origin="openai")
    core.engine.prepare(request)  # the length rules, before anything is generated
    return request, len(ids), stream


def _finish_reason(core: BotCore, gen: Generation, index: int, prompt_tokens: int) -> str:
    used = len(core.engine.tokenizer(gen.continuations[index], add_special_tokens=False)["input_ids"])
    return "length" if prompt_tokens + used >= gen.request.knobs.max_length else "stop"


def _usage(gen: Generation, prompt_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen.new_tokens,
            "total_tokens": prompt_tokens + gen.new_tokens}


async def completions(request: web.Request) -> web.StreamResponse:
    core = request.app[NODE_KEY]
    if not _authorised(request, core):
        return _unauthorised()
    try:
        body = json.loads((await request.read()).decode("utf-8"))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "요청이 너무 큽니다. (request body too large)")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return _error(400, "요청 본문이 올바른 JSON이 아닙니다. (malformed JSON)")
    try:
        gen_request, prompt_tokens, stream = parse_completion(body, core)
    except LookupError as exc:
        core.engine.telemetry.refused("openai", "user_error")
        return _error(404, str(exc.args[0]), "NotFoundError", "model")
    except UserError as exc:
        core.engine.telemetry.refused("openai", "user_error")
        return _error(400, str(exc))
    gen_request = replace(gen_request, user=client_key(request))  # the engine's fair share is the client's
    ident, created, name = f"cmpl-{secrets.token_hex(12)}", int(time.time()), model_id(core)
    if stream:
        return await _stream(request, core, gen_request, prompt_tokens, ident, created, name)
    try:
        gen = await core.engine.generate(gen_request)
    except Exception as exc:  # noqa: BLE001 (mapped to a status; unexpected ones are logged there)
        return _engine_error(exc)
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": _finish_reason(core, gen, i, prompt_tokens)}
               for i, text in enumerate(gen.continuations)]
    return web.json_response({"id": ident, "object": "text_completion", "created": created, "model": name,
                              "choices": choices, "usage": _usage(gen, prompt_tokens)},
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


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


async def _stream(request: web.Request, core: BotCore, gen_request: GenRequest, prompt_tokens: int,
                  ident: str, created: int, name: str) -> web.StreamResponse:
    """Server-sent events as vLLM sends them: one `data: {chunk}` per text delta, then `data: [DONE]`."""
    updates = core.engine.stream(core.engine.prepare(gen_request))  # stream takes a PreparedRequest
    try:
        first = await anext(updates)  # errors before any text still get a proper status code
    except Exception as exc:  # noqa: BLE001
        await updates.aclose()
        return _engine_error(exc)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    sent = [""] * gen_request.knobs.n

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await response.write(f"data: {data}\n\n".encode())

    async def emit(gen: Generation) -> None:
        for i, text in enumerate(gen.continuations):
            # A trailing "�" is half a character that the next step completes: hold it back until then.
            stable = text if gen.done else text.rstrip("�")
            if stable.startswith(sent[i]) and len(stable) > len(sent[i]):
                delta, sent[i] = stable[len(sent[i]):], stable
                await send({"id": ident, "object": "text_completion", "created": created, "model": name,
                            "choices": [{"index": i, "text": delta, "logprobs": None, "finish_reason": None}]})
        if gen.done:
            for i in range(len(gen.continuations)):
                await send({"id": ident, "object": "text_completion", "created": created, "model": name,
                            "choices": [{"index": i, "text": "", "logprobs": None,
                                         "finish_reason": _finish_reason(core, gen, i, prompt_tokens)}]})
            await send({"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [],
                        "usage": _usage(gen, prompt_tokens)})

    try:
        await emit(first)
        async for gen in updates:
            await emit(gen)
        await send("[DONE]")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 (the status line is gone: the error goes in the stream, as vLLM does)
        await send({"error": {"message": str(exc) if isinstance(exc, UserError) else "generation failed",
                              "type": "server_error", "code": 503}})
    finally:
        await updates.aclose()
    await response.write_eof()
    return response
