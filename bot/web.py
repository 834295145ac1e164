"""The tutorial's web page and its JSON API, on aiohttp (already a dependency of discord.py).

`POST /api` answers the tutorial's JSON at once; `POST /api/stream` takes the same body and answers JSON lines as the
text grows (`{"partial": …, "stop": key}` … then the final object, or `{"error": …}`); `POST /api/stop
{"stop": key}` ends that stream early with the text so far (`"stopped": true`). Every error, aiohttp's own included, is
JSON `{"error": …}`. A body must arrive in time; the connection-level bounds are in bot/web_server.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from bot.auth import TOKEN_KEY, authorised, guarded
from bot.client_address import PROXIES_KEY, client_key
from bot.openai_api import add_routes as add_openai_routes
from bot.web_body import MAX_BODY, TOO_LARGE, TOO_SLOW, BodyRefused, check_text, read_json
from bot.web_server import GuardedRunner, client_left, dumps
from core.conversation import Conversation, Reply, Style, Who, error_text
from core.errors import BusyError, ClientLeft, EngineUnavailable, RequestTimeout, ShuttingDown, UserError
from core.followups import stop_data
from core.knobs import knob_specs
from core.service import BotCore
from core.types import Generation

log = logging.getLogger(__name__)

CONVERSATION_KEY = web.AppKey("conversation", Conversation)
PUBLIC_PAGE_KEY = web.AppKey("public_page", bool)
UNAUTHORISED = "API 토큰이 없거나 틀립니다. Authorization: Bearer <토큰> 헤더를 보내 주세요. (missing or wrong bearer token)"
STREAM_INTERVAL_S = 0.1  # partial results on /api/stream at most this often
STATUS_TEXT = {
    400: "요청을 이해할 수 없습니다. (bad request)",
    404: "없는 주소입니다. /, /api, /api/stream, /api/stop, /healthz, /metrics, /v1/completions, /v1/models 를 쓰세요. (not found)",
    405: "이 주소에서 쓸 수 없는 메서드입니다. (method not allowed)",
    408: TOO_SLOW,
    413: TOO_LARGE,
    431: "요청 헤더가 너무 큽니다. (request headers too large)",
}


def _json(payload: object, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status, dumps=dumps)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _result(gen: Generation) -> dict:
    texts = gen.texts()
    out = {"result": texts[0], "results": list(texts), "seeds": list(gen.seeds)}
    if gen.confidence is not None:  # best_of > 1: the model's own P(label | text) for each pick
        out["confidence"] = [round(c, 4) for c in gen.confidence]
    return out


class _Refused(Exception):
    def __init__(self, response: web.Response):
        self.response = response


async def _prepared(request: web.Request, base: str):  # noqa: ANN202
    """The body → a PreparedRequest through the typed-fields door; a refusal raises _Refused with its response."""
    conversation = request.app[CONVERSATION_KEY]

    def refuse(status: int, message: str) -> _Refused:
        conversation.backend.telemetry.refused("web", "user_error")
        return _Refused(_error(status, message))

    try:
        payload = await read_json(request, example='{"prompt": "긍정 아 정말"}')
    except BodyRefused as exc:
        conversation.backend.telemetry.refused("web", "user_error")
        raise _Refused(exc.response(_error)) from None
    if not isinstance(payload, dict):
        raise refuse(422, '요청 본문은 JSON 객체여야 합니다. 예: {"prompt": "긍정 아 정말"} (body must be a JSON object)')
    try:
        check_text(payload)
    except UserError as exc:
        raise refuse(422, str(exc)) from None
    try:
        who = Who(chat="web", client=client_key(request))
        return conversation.from_fields(payload, who, base=base)  # the door counts its own refusals
    except UserError as exc:
        raise _Refused(_error(422, str(exc))) from None


async def api(request: web.Request) -> web.Response:
    try:
        prepared = await _prepared(request, "tutorial")  # the tutorial's API: best_of 1 unless the JSON asks
    except _Refused as refused:
        return refused.response
    try:
        conversation = request.app[CONVERSATION_KEY]
        result = await conversation.backend_of(prepared.request).generate(prepared)  # counted from here by the engine
    except BusyError as exc:
        return _error(429, str(exc))
    except (RequestTimeout, ShuttingDown, EngineUnavailable) as exc:
        return _error(503, str(exc))
    except UserError as exc:
        return _error(422, str(exc))
    return _json(_result(result))


class _LinesTarget:
    """/api/stream's ReplyTarget: one JSON line per state of the reply."""

    style = Style(limit=1 << 20)

    def __init__(self, response: web.StreamResponse):
        self.response = response
        self.edit_interval = STREAM_INTERVAL_S
        self.gone = False  # the client closed the connection

    async def send(self, reply: Reply) -> None:
        if reply.error:
            line: dict = {"error": reply.text}
        elif reply.final:
            line = {**_result(reply.generation), "prompt": reply.generation.request.model_prompt}
            if reply.stopped:
                line["stopped"] = True
        else:
            line = {"partial": list(reply.generation.texts()), "prompt": reply.generation.request.model_prompt,
                    "stop": reply.stop}
        try:
            await self.response.write((dumps(line) + "\n").encode("utf-8"))
        except ConnectionResetError:
            self.gone = True
            raise ClientLeft from None

    edit = send

    async def typing(self) -> None:
        """A page shows its own progress."""

    def spare(self) -> bool:
        return True


async def api_stream(request: web.Request) -> web.StreamResponse:
    try:
        prepared = await _prepared(request, "server")  # the page: the server's chat defaults, best_of included
    except _Refused as refused:
        return refused.response
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8",
                                           "Cache-Control": "no-store"})
    await response.prepare(request)
    target = _LinesTarget(response)
    await request.app[CONVERSATION_KEY].reply(target, prepared, "web /api/stream")
    if target.gone:
        client_left(request, "/api/stream")
    else:
        await response.write_eof()
    return response


async def api_stop(request: web.Request) -> web.Response:
    """`{"stop": "<key>"}` from a /api/stream partial: that stream ends with the text so far, marked stopped. The key
    went only to whoever asked, so holding it is the permission."""
    conversation = request.app[CONVERSATION_KEY]
    try:
        payload = await read_json(request, example='{"stop": "<키>"}')  # the one body reader every route uses
    except BodyRefused as exc:
        conversation.backend.telemetry.refused("web", "user_error")
        return exc.response(_error)
    key = payload.get("stop") if isinstance(payload, dict) else None
    if not isinstance(key, str):
        conversation.backend.telemetry.refused("web", "user_error")
        return _error(422, '요청 본문은 {"stop": "<키>"} 이어야 합니다 (/api/stream의 "stop" 값). (body must be {"stop": key})')
    try:
        conversation.from_button(stop_data(key), Who(chat="web", client=client_key(request)))  # the door: strict parse, counted
    except UserError as exc:
        return _error(422, str(exc))
    return _json({"stopping": True})


async def healthz(request: web.Request) -> web.Response:
    """200 while the generation backend can take a request (the local worker is alive, or the remote server is
    reachable); 503 otherwise, so a load balancer stops sending work here: `degraded` (it cannot answer) or
    `saturated` (its queue is full: a new request would be refused as busy; the process itself is fine)."""
    backend = request.app[CONVERSATION_KEY].backend
    engine = await backend.health()
    status = "degraded" if not engine["ok"] else "saturated" if engine.get("saturated") else "ok"
    body = {"status": status, "queue_depth": backend.queue_depth, "engine": engine}
    if status == "degraded":
        body["error"] = engine.get("error") or "생성 엔진에 연결할 수 없습니다. (generation backend unavailable)"
    elif status == "saturated":
        body["error"] = "대기열이 가득 찼습니다. 새 요청은 거절됩니다. (saturated: the queue is full, new requests are refused)"
    if backend.notice:
        body["notice"] = backend.notice
    return _json(body, 200 if status == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the series are documented in core/metrics.py."""
    body, content_type = request.app[CONVERSATION_KEY].backend.telemetry.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def page(request: web.Request) -> web.Response:
    backend = request.app[CONVERSATION_KEY].backend
    html = resources.files("bot").joinpath("web_page.html").read_text(encoding="utf-8")
    served = request.app[CONVERSATION_KEY].core.served
    config = {
        "models": [{"name": name, "steered": getattr(b, "sentiment", True)} for name, b in served.backends.items()],
        "model": served.default,
        "defaults": backend.defaults.as_dict(),
        "knobs": {
            name: {"min": spec.low, "max": spec.high, "int": spec.kind is int, "range": spec.range_ko(), "help": spec.help_ko}
            for name, spec in knob_specs(backend.limits).items()
        },
    }
    # `</` cannot appear inside the JSON, so it cannot close the script element early.
    blob = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")
    return web.Response(text=html.replace("__CONFIG__", blob), content_type="text/html")


@web.middleware
async def require_token(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):  # noqa: ANN201
    """With `web.api_token` set, the generation routes (and the page, unless public) answer 401 without it. /v1/*
    answers its own 401 in the OpenAI error shape (bot/openai_api.py)."""
    if guarded(request, request.app[PUBLIC_PAGE_KEY]) and not request.path.startswith("/v1/") and not authorised(request):
        return web.json_response({"error": UNAUTHORISED}, status=401, headers={"WWW-Authenticate": "Bearer"}, dumps=dumps)
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):  # noqa: ANN201
    """404, 405, 413 … and anything unexpected answer JSON `{"error": …}` (an apology with a request id for a 500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, STATUS_TEXT.get(exc.status, f"{exc.status} {exc.reason}"))
    except asyncio.CancelledError:
        # The server cancels a handler whose client went away (bot/web_server.py): normal, one INFO line.
        if request.transport is None or request.transport.is_closing():
            client_left(request, request.path)
        raise
    except Exception as exc:  # noqa: BLE001
        return _error(500, error_text(exc, f"web {request.method} {request.path}"))


def create_app(core: BotCore) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors, require_token])
    app[CONVERSATION_KEY] = Conversation(core)
    app[TOKEN_KEY] = core.settings.web.api_secret()  # read once, when the settings were loaded
    app[PUBLIC_PAGE_KEY] = core.settings.web.public_page
    app[PROXIES_KEY] = core.settings.web.proxy_networks()
    app.add_routes([web.get("/", page), web.post("/api", api), web.post("/api/stream", api_stream),
                    web.post("/api/stop", api_stop),
                    web.get("/healthz", healthz), web.get("/metrics", metrics)])
    add_openai_routes(app, core)  # the engine-node API: /v1/completions, /v1/models
    return app


async def serve(core: BotCore, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    settings = core.settings.web
    runner = GuardedRunner(create_app(core), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("web page on http://%s:%d/", settings.host, settings.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
