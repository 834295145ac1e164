"""A fake Telegram Bot API server on loopback (aiohttp): enough of the API for python-telegram-bot to run a bot.

It feeds queued updates through getUpdates (long polling, capped short), records every call with its parameters,
keeps sent messages so edits and button presses work, parses HTML like Telegram (rejecting bad markup and texts
over 4096 characters), and can inject faults into the next calls of a method: 429 `retry_after`, a 5xx, a dropped
connection (closed before any answer, so the call did not happen) or a slow answer.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

# Parameters PTB sends JSON-encoded inside a form field.
JSON_FIELDS = {
    "reply_markup", "reply_parameters", "commands", "allowed_updates", "entities", "link_preview_options", "scope",
    "results", "button",
}
BOOL_FIELDS = {"show_alert", "disable_notification", "protect_content", "drop_pending_updates", "is_disabled",
               "is_personal"}
INT_FIELDS = {"chat_id", "message_id", "offset", "limit", "timeout", "user_id", "cache_time"}
HTML_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "code", "pre", "a", "tg-spoiler", "span",
             "blockquote", "tg-emoji"}
_TAG_RE = re.compile(r"<(/?)([a-zA-Z][\w-]*)([^<>]*)>")
_BARE_AMP_RE = re.compile(r"&(?!(?:lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);)")


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


@dataclass
class Call:
    method: str
    params: dict
    status: int = 200
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Failure:
    method: str
    times: int
    retry_after: int
    chat_id: int | None
    status: int | None = 429  # None: no error (a slow answer only)
    drop: bool = False
    delay: float = 0.0
    hold: asyncio.Event | None = None  # answer only once the test sets it



def parse_html(text: str) -> tuple[str, list[dict]]:
    """Telegram's HTML parse mode: the visible text and its bold entities; malformed markup is an error."""
    visible: list[str] = []
    entities: list[dict] = []
    stack: list[tuple[str, int]] = []
    pos = 0
    for match in _TAG_RE.finditer(text):
        visible.append(_unescape_text(text[pos:match.start()]))
        closing, tag, _ = match.groups()
        tag = tag.lower()
        if tag not in HTML_TAGS:
            raise ApiError(400, f"Bad Request: can't parse entities: unsupported start tag \"{tag}\"")
        offset = len("".join(visible))
        if closing:
            if not stack or stack[-1][0] != tag:
                raise ApiError(400, f"Bad Request: can't parse entities: unexpected end tag \"{tag}\"")
            _, start = stack.pop()
            if tag in ("b", "strong"):
                entities.append({"type": "bold", "offset": start, "length": offset - start})
        else:
            stack.append((tag, offset))
        pos = match.end()
    visible.append(_unescape_text(text[pos:]))
    if stack:
        raise ApiError(400, f"Bad Request: can't parse entities: unclosed start tag \"{stack[-1][0]}\"")
    return "".join(visible), entities


def _unescape_text(chunk: str) -> str:
    if "<" in chunk or ">" in chunk:
        raise ApiError(400, "Bad Request: can't parse entities: unexpected '<' or '>'")
    if _BARE_AMP_RE.search(chunk):
        raise ApiError(400, "Bad Request: can't parse entities: '&' must be escaped")
    return html.unescape(chunk)


class FakeBotAPI:
    def __init__(self, token: str, username: str = "ThisBot", poll_cap_s: float = 0.3):
        self.token = token
        self.username = username
        self.poll_cap_s = poll_cap_s
        self.bot_user = {"id": 424242, "is_bot": True, "first_name": "Test Bot", "username": username,
                         "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
        self.calls: list[Call] = []
        self.tokens_seen: set[str] = set()
        self.messages: dict[tuple[int, int], dict] = {}
        self.webhook: dict | None = None
        self._updates: list[dict] = []
        self.last_update_id = 0
        self.confirmed_update_id = 0  # the bot asked for the updates after this one: it has fetched up to here
        self.answering = 0  # calls being answered now, long polls left out
        # The bot's side of `settled`: returns once every fetched update's handler has returned (conftest's
        # telegram_running sets it to PTB's update queue's join).
        self.handlers_done: Callable[[], Awaitable[None]] | None = None
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count] = {}
        self._query_ids = itertools.count(1)
        self._new_update = asyncio.Event()
        self._failures: list[_Failure] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> FakeBotAPI:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # ---- test controls -----------------------------------------------------------------------------------------
    def fail_next(self, method: str, times: int = 1, retry_after: int = 1, chat_id: int | None = None, *,
                  status: int | None = 429, drop: bool = False, delay: float = 0.0,
                  hold: asyncio.Event | None = None) -> None:
        """Fault the next `times` calls of `method` (for `chat_id`, if given): wait `delay` s (and until `hold` is set)
        first, then drop the connection (`drop`), answer `status` (429 carries retry_after; 5xx a server error) or,
        with None, answer."""
        self._failures.append(_Failure(method, times, retry_after, chat_id, status, drop, delay, hold))

    def _next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    @staticmethod
    def chat(chat_id: int) -> dict:
        if chat_id > 0:
            return {"id": chat_id, "type": "private", "first_name": f"User{chat_id}"}
        return {"id": chat_id, "type": "supergroup", "title": f"Group{chat_id}"}

    @staticmethod
    def user(user_id: int) -> dict:
        return {"id": user_id, "is_bot": False, "first_name": f"User{user_id}", "language_code": "ko"}

    def _push(self, update: dict) -> dict:
        update = {"update_id": next(self._update_ids), **update}
        self.last_update_id = update["update_id"]
        self._updates.append(update)
        self._new_update.set()
        return update

    def user_message(self, chat_id: int, text: str, user_id: int | None = None, reply_to: dict | None = None) -> dict:
        """Queue a message from a user (a reply to `reply_to`, a message as stored now); commands get their
        bot_command entity, as Telegram sends them."""
        user_id = user_id or (chat_id if chat_id > 0 else 777)
        message = {
            "message_id": self._next_message_id(chat_id), "date": int(time.time()),
            "chat": self.chat(chat_id), "from": self.user(user_id), "text": text,
        }
        if reply_to is not None:
            message["reply_to_message"] = {k: v for k, v in reply_to.items() if k != "reply_to_message"}
        if text.startswith("/"):
            command = text.split()[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command.encode("utf-16-le")) // 2}]
        self.messages[(chat_id, message["message_id"])] = message
        self._push({"message": message})
        return message

    def edit_user_message(self, message: dict, text: str) -> dict:
        edited = {**message, "text": text, "edit_date": int(time.time())}
        self._push({"edited_message": edited})
        return edited

    def press(self, message: dict, data: str, user_id: int | None = None) -> str:
        """Queue a press on an inline button under the bot's `message`; returns the callback query id."""
        chat_id = message["chat"]["id"]
        query_id = str(next(self._query_ids))
        self._push({"callback_query": {
            "id": query_id, "from": self.user(user_id or (chat_id if chat_id > 0 else 777)),
            "chat_instance": f"ci{chat_id}", "data": data, "message": message,
        }})
        return query_id

    def inline_query(self, text: str, user_id: int = 31337) -> str:
        """Queue an inline query (`@bot text` typed in some chat); returns its id."""
        query_id = f"iq{next(self._query_ids)}"
        self._push({"inline_query": {"id": query_id, "from": self.user(user_id), "query": text, "offset": ""}})
        return query_id

    # ---- inspection --------------------------------------------------------------------------------------------
    def called(self, method: str, status: int | None = 200, **match: object) -> list[dict]:
        return [c.params for c in self.calls_of(method, status, **match)]

    def calls_of(self, method: str, status: int | None = 200, **match: object) -> list[Call]:
        return [
            c for c in self.calls
            if c.method == method and (status is None or c.status == status)
            and all(c.params.get(k) == v for k, v in match.items())
        ]

    def sent(self, chat_id: int) -> list[dict]:
        """The bot's messages in `chat_id`, in order, as they look now (after edits)."""
        return [m for (chat, _), m in sorted(self.messages.items()) if chat == chat_id and m["from"]["is_bot"]]

    def replies_to(self, message: dict) -> list[dict]:
        """The bot's messages that reply to the user's `message`."""
        chat, mid = message["chat"]["id"], message["message_id"]
        return [m for m in self.sent(chat) if m.get("reply_to_message", {}).get("message_id") == mid]

    async def settled(self, timeout: float = 30.0) -> None:
        """Every update queued so far was fetched and its handler has returned, and no call the bot made is still
        being answered: nothing more can come for those updates. A test that checks something did NOT happen waits
        for this, never for a while."""
        assert self.handlers_done is not None, "settled() needs the bot's side: run it with conftest's telegram_running"
        target = self.last_update_id
        await self.wait_for(lambda: self.confirmed_update_id >= target, timeout)
        await asyncio.wait_for(self.handlers_done(), timeout)
        await self.wait_for(lambda: self.answering == 0, timeout)

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; calls: {[(c.method, c.status) for c in self.calls]}")
            await asyncio.sleep(0.02)

    # ---- HTTP --------------------------------------------------------------------------------------------------
    async def _params(self, request: web.Request) -> dict:
        if request.content_type == "application/json":
            raw = await request.json()
            return raw if isinstance(raw, dict) else {}
        form = await request.post() if request.can_read_body else {}
        params: dict = {**request.query, **{k: v for k, v in form.items() if isinstance(v, str)}}
        for key, value in list(params.items()):
            if key in JSON_FIELDS:
                params[key] = json.loads(value)
            elif key in INT_FIELDS and re.fullmatch(r"-?\d+", value):
                params[key] = int(value)
            elif key in BOOL_FIELDS and value in ("true", "false"):
                params[key] = value == "true"
        return params

    async def _handle(self, request: web.Request) -> web.Response:
        token, method = request.match_info["token"], request.match_info["method"]
        self.tokens_seen.add(token)
        params = await self._params(request)
        call = Call(method, params)
        self.calls.append(call)
        polling = method == "getUpdates"
        self.answering += not polling
        try:
            if token != self.token:
                raise ApiError(401, "Unauthorized")
            failure = self._take_failure(method, params)
            if failure is not None:
                if failure.delay:
                    await asyncio.sleep(failure.delay)
                if failure.hold is not None:
                    await failure.hold.wait()
                if failure.drop:
                    call.status = 0
                    request.transport.close()  # the client sees the connection close without an answer
                    return web.Response(status=500)
                if failure.status == 429:
                    raise ApiError(429, f"Too Many Requests: retry after {failure.retry_after}",
                                   {"retry_after": failure.retry_after})
                if failure.status is not None:
                    raise ApiError(failure.status, "Internal Server Error" if failure.status == 500 else "Bad Gateway")
            handler = getattr(self, f"_api_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            result = await handler(params)
        except ApiError as exc:
            call.status = exc.code
            body = {"ok": False, "error_code": exc.code, "description": exc.description}
            if exc.parameters:
                body["parameters"] = exc.parameters
            return web.json_response(body, status=exc.code)
        finally:
            self.answering -= not polling
        return web.json_response({"ok": True, "result": result})

    def _take_failure(self, method: str, params: dict) -> _Failure | None:
        for failure in self._failures:
            if failure.method == method and failure.times > 0 and failure.chat_id in (None, params.get("chat_id")):
                failure.times -= 1
                return failure
        return None

    # ---- methods -----------------------------------------------------------------------------------------------
    async def _api_getMe(self, params: dict) -> dict:
        return self.bot_user

    async def _api_getUpdates(self, params: dict) -> list[dict]:
        offset = int(params.get("offset") or 0)
        self.confirmed_update_id = max(self.confirmed_update_id, offset - 1)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates:
            self._new_update.clear()
            timeout = min(float(params.get("timeout") or 0), self.poll_cap_s)
            try:
                await asyncio.wait_for(self._new_update.wait(), timeout)
            except TimeoutError:
                pass
        return self._updates[: int(params.get("limit") or 100)]

    async def _api_deleteWebhook(self, params: dict) -> bool:
        self.webhook = None
        return True

    async def _api_setWebhook(self, params: dict) -> bool:
        self.webhook = params
        return True

    async def _api_setMyCommands(self, params: dict) -> bool:
        return True

    async def _api_sendChatAction(self, params: dict) -> bool:
        return True

    async def _api_answerInlineQuery(self, params: dict) -> bool:
        results = params.get("results", [])
        if len(results) > 50 or len({r["id"] for r in results}) != len(results):
            raise ApiError(400, "Bad Request: RESULTS_TOO_MUCH or RESULT_ID_DUPLICATE")
        for result in results:
            content = result["input_message_content"]
            self._render_text({"text": content["message_text"], "parse_mode": content.get("parse_mode")})
            if len(result["id"].encode()) > 64 or not result.get("title"):
                raise ApiError(400, "Bad Request: RESULT_ID_INVALID or no title")
        return True

    async def _api_answerCallbackQuery(self, params: dict) -> bool:
        if len(params.get("text", "")) > 200:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        return True

    def _render_text(self, params: dict) -> tuple[str, list[dict]]:
        text = params.get("text", "")
        visible, entities = parse_html(text) if params.get("parse_mode") == "HTML" else (text, [])
        if not visible.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if len(visible) > 4096:
            raise ApiError(400, "Bad Request: message is too long")
        return visible, entities

    async def _api_sendMessage(self, params: dict) -> dict:
        chat_id = params["chat_id"]
        visible, entities = self._render_text(params)
        message = {
            "message_id": self._next_message_id(chat_id), "date": int(time.time()), "chat": self.chat(chat_id),
            "from": self.bot_user, "text": visible,
        }
        if entities:
            message["entities"] = entities
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        reply = params.get("reply_parameters")
        if reply and (chat_id, reply["message_id"]) in self.messages:
            message["reply_to_message"] = self.messages[(chat_id, reply["message_id"])]
        self.messages[(chat_id, message["message_id"])] = message
        return message

    def _stored(self, params: dict) -> dict:
        message = self.messages.get((params.get("chat_id"), params.get("message_id")))
        if message is None or not message["from"]["is_bot"]:
            raise ApiError(400, "Bad Request: message to edit not found")
        return message

    async def _api_editMessageText(self, params: dict) -> dict:
        message = self._stored(params)
        visible, entities = self._render_text(params)
        markup = params.get("reply_markup")
        if visible == message["text"] and markup == message.get("reply_markup"):
            raise ApiError(400, "Bad Request: message is not modified")
        message.update(text=visible, entities=entities, edit_date=int(time.time()))
        message.pop("reply_markup", None)
        if markup:
            message["reply_markup"] = markup
        return message

    async def _api_editMessageReplyMarkup(self, params: dict) -> dict:
        message = self._stored(params)
        message.pop("reply_markup", None)
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        return message


def finished(message: dict) -> bool:
    """A bot message that is a finished result: it carries its follow-up buttons (a reply still streaming carries
    only the stop button, and its text ends with the cursor)."""
    return "reply_markup" in message and not message.get("text", "").endswith("▌")
