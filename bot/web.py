"""The tutorial's web page and its JSON API, on aiohttp (already a dependency of discord.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources

from aiohttp import web

from bot import openai_api
from core.errors import BusyError, RequestTimeout, ShuttingDown, UserError
from core.grammar import GenRequest, normalise_label, request_from_text
from core.knobs import knob_specs, validate_knobs
from core.replies import APOLOGY
from core.service import BotCore

log = logging.getLogger(__name__)

CORE_KEY = web.AppKey("core", BotCore)
MAX_BODY = 64 * 1024


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _refused(core: BotCore, status: int, message: str) -> web.Response:
    """A request turned away before the engine saw it: counted as the web front end's user_error."""
    core.engine.telemetry.refused("web", "user_error")
    return _error(status, message)


def _ok(payload: dict) -> web.Response:
    return web.json_response(payload, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def parse_api_body(payload: object, core: BotCore) -> GenRequest:
    """The tutorial's JSON (`prompt` plus optional knobs, numbers or numeric strings, "" = default)."""
    if not isinstance(payload, dict):
        raise UserError('요청 본문은 JSON 객체여야 합니다. 예: {"prompt": "긍정 아 정말"} (body must be a JSON object)')
    fields = dict(payload)
    prompt = fields.pop("prompt", None)
    label_field = fields.pop("label", None)
    if not isinstance(prompt, str):
        raise UserError('"prompt"에 문자열을 넣어 주세요. 예: {"prompt": "긍정 아 정말"} ("prompt" must be a string)')
    knobs = validate_knobs(fields, core.engine.defaults, core.settings.limits)
    label = None
    if label_field not in (None, ""):
        label = normalise_label(label_field) if isinstance(label_field, str) else None
        if label is None:
            raise UserError('"label"은 "긍정" 또는 "부정"이어야 합니다. ("label" must be 긍정 or 부정)')
    # The bots' rules: a leading label word, no control characters, the length cap, not empty.
    request = request_from_text(prompt, knobs, core.settings.limits, label=label, origin="web")
    core.engine.encode_prompt(request)
    return request


async def api(request: web.Request) -> web.Response:
    core = request.app[CORE_KEY]
    try:
        raw = await request.read()
        payload = json.loads(raw.decode("utf-8"))
    except web.HTTPRequestEntityTooLarge:
        return _refused(core, 413, f"요청이 너무 큽니다 (최대 {MAX_BODY // 1024} KiB). (request body too large)")
    except UnicodeDecodeError:
        return _refused(core, 400, "요청 본문이 UTF-8이 아닙니다. (body is not UTF-8)")
    except (json.JSONDecodeError, RecursionError):
        return _refused(core, 400, '요청 본문이 올바른 JSON이 아닙니다. 예: {"prompt": "긍정 아 정말"} (malformed JSON)')
    try:
        gen_request = parse_api_body(payload, core)
    except UserError as exc:
        return _refused(core, 422, str(exc))
    try:
        result = await core.engine.generate(gen_request)  # the engine counts what happens from here on
    except BusyError as exc:
        return _error(429, str(exc))
    except (RequestTimeout, ShuttingDown) as exc:
        return _error(503, str(exc))
    except UserError as exc:
        return _error(422, str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("web /api failed")
        return _error(500, APOLOGY)
    texts = result.texts()
    return _ok({"result": texts[0], "results": list(texts), "seeds": list(result.seeds)})


async def healthz(request: web.Request) -> web.Response:
    core = request.app[CORE_KEY]
    return _ok({"status": "ok", "queue_depth": core.engine.queue_depth})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the series are documented in core/metrics.py."""
    body, content_type = request.app[CORE_KEY].engine.telemetry.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def page(request: web.Request) -> web.Response:
    core = request.app[CORE_KEY]
    html = resources.files("bot").joinpath("web_page.html").read_text(encoding="utf-8")
    config = {
        "defaults": core.engine.defaults.as_dict(),
        "knobs": {
            name: {"min": spec.low, "max": spec.high, "int": spec.kind is int, "range": spec.range_ko(), "help": spec.help_ko}
            for name, spec in knob_specs(core.settings.limits).items()
        },
    }
    # `</` cannot appear inside the JSON, so it cannot close the script element early.
    blob = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")
    return web.Response(text=html.replace("__CONFIG__", blob), content_type="text/html")


def create_app(core: BotCore) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[CORE_KEY] = core
    app.add_routes([web.get("/", page), web.post("/api", api), web.get("/healthz", healthz),
                    web.get("/metrics", metrics)])
    openai_api.add_routes(app, core)  # the engine-node API: /v1/completions, /v1/models
    return app


async def serve(core: BotCore, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    settings = core.settings.web
    runner = web.AppRunner(create_app(core), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("web page on http://%s:%d/", settings.host, settings.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
