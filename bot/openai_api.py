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
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from aiohttp import web

from bot import openai_response as answer
from bot.auth import TOKEN_KEY, authorised
from bot.client_address import client_key
from bot.openai_request import Completion, model_id, parse_completion
from bot.web_body import BodyRefused, check_text, read_json
from bot.web_server import client_left, dumps
from core.errors import BusyError, EngineUnavailable, RequestTimeout, ShuttingDown, UserError
from core.hops import HOP_HEADER, MAX_HOPS, incoming_hops
from core.remote_engine import ENGINE_NODE_OWNER
from core.service import BotCore
from core.types import Generation, PreparedRequest

log = logging.getLogger(__name__)

NODE_KEY = web.AppKey("openai_core", BotCore)


def add_routes(app: web.Application, core: BotCore) -> None:
    """The engine-node API on the web front end's app (bot/web.py calls this)."""
    app[NODE_KEY] = core
    if TOKEN_KEY not in app:
        app[TOKEN_KEY] = core.settings.web.api_secret()
    app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models)])


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, dumps=dumps)


def _authorised(request: web.Request, core: BotCore) -> bool:
    """`Authorization: Bearer <token>` (bot/auth.py: the token read at start, shared with /api; the scheme's case does
    not matter, the token's does)."""
    return authorised(request)


def _unauthorised() -> web.Response:
    return _error(401, "API 토큰이 없거나 틀립니다. (missing or wrong bearer token)", "authentication_error")


async def models(request: web.Request) -> web.Response:
    core = request.app[NODE_KEY]
    if not _authorised(request, core):
        return _unauthorised()
    entry = {"id": model_id(core), "object": "model", "created": 0, "owned_by": ENGINE_NODE_OWNER,
             "max_model_len": core.settings.limits.max_length}
    return web.json_response({"object": "list", "data": [entry]}, dumps=dumps)

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
    user = client_key(request)  # the engine's fair share is the client's
    end_user = body.get("user")
    if request.app.get(TOKEN_KEY) is not None and isinstance(end_user, str) and end_user:
        # A caller holding the token is a trusted front end relaying many people (another bot's remote backend sends
        # each person's key): their shares stay apart. Without a token anyone could mint users, so the address counts.
        user = f"{user}/{end_user[:200]}"
    completion = replace(completion, prepared=tuple(replace(p, request=replace(p.request, user=user))
                                                    for p in completion.prepared))
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
    choices, new_tokens = answer.choices(completion, gens, core)
    prompt_tokens = sum(len(p.prompt_ids) for p in completion.prepared)
    return web.json_response({"id": ident, "object": "text_completion", "created": created, "model": name,
                              "choices": choices, "usage": answer.usage(prompt_tokens, new_tokens)}, dumps=dumps)


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
    text = answer.Tokens(core, completion.as_ids)

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    async def chunk(i: int, delta: str, positions: list, finish: str | None = None) -> None:
        choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if completion.logprobs is not None:
            choice["logprobs"] = answer.logprobs_block(positions, completion.logprobs, text, offsets[i])
        offsets[i] += len(delta)
        await send({"id": ident, "object": "text_completion", "created": created, "model": name, "choices": [choice]})

    async def emit(p: int, gen: Generation) -> None:
        if completion.echo and not echoed[p]:
            echoed[p] = True
            for i in range(p * n, (p + 1) * n):
                await chunk(i, completion.texts[p], answer.prompt_positions(completion.prepared[p], gen))
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
            positions = answer.sampled_positions(gen, j)[tokens_sent[i]:]
            grew = stable.startswith(sent[i]) and len(stable) > len(sent[i])
            if grew or (positions and completion.logprobs is not None and not gen.done):
                delta = stable[len(sent[i]):] if grew else ""
                sent[i] = stable if grew else sent[i]
                tokens_sent[i] += len(positions)
                await chunk(i, delta, positions)
                positions = []
            if gen.done:
                tokens_sent[i] += len(positions)
                await chunk(i, "", positions, answer.finish_reason(gen, j))
        if gen.done:
            finished[p] = answer.new_tokens(gen)

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
                    "usage": answer.usage(prompt_tokens, new_tokens)})
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
