"""Reading a JSON request body, the same for every route (`/api`, `/api/stream`, `/v1/completions`): within a
deadline, within the size cap, through a Content-Encoding that may be broken, as UTF-8, as JSON whose integers stay
within Python's digit limit, and with every string valid Unicode. Each refusal is one sentence and its status."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from bot.web_server import reading_body
from core.grammar import reject_broken_text

MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 10.0  # a body must be complete this long after its headers
TOO_SLOW = "요청 본문이 제때 도착하지 않았습니다. (request body too slow)"
TOO_LARGE = f"요청이 너무 큽니다 (최대 {MAX_BODY // 1024} KiB). (request body too large)"
MALFORMED = '요청 본문이 올바른 JSON이 아닙니다. (malformed JSON)'


class BodyRefused(Exception):
    """The body cannot be used: `status` and `message` are the answer; `close`: the connection must close after it
    (the rest of the body was never read)."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close

    def response(self, render) -> web.Response:  # noqa: ANN001 (the route's own JSON error shape)
        response = render(self.status, self.message)
        if self.close:
            response.force_close()
        return response


async def read_json(request: web.Request, example: str = "") -> object:
    """The body as JSON; BodyRefused when it cannot be read, decoded or parsed."""
    try:
        with reading_body(request):
            async with asyncio.timeout(BODY_TIMEOUT_S):
                raw = await request.read()
        payload = json.loads(raw.decode("utf-8"))
    except web.HTTPRequestEntityTooLarge:
        raise BodyRefused(413, TOO_LARGE) from None
    except TimeoutError:
        request.content.feed_eof()  # no lingering for the rest of a body that does not come
        raise BodyRefused(408, TOO_SLOW, close=True) from None
    except RequestPayloadError:
        # The rest of the body cannot be read either: mark it finished, or aiohttp drops the connection (and this
        # answer) trying to drain it.
        request.content.feed_eof()
        raise BodyRefused(400, "요청 본문을 풀 수 없습니다 (Content-Encoding이 맞지 않음). (cannot decode the body)",
                          close=True) from None
    except UnicodeDecodeError:
        raise BodyRefused(400, "요청 본문이 UTF-8이 아닙니다. (body is not UTF-8)") from None
    except (ValueError, RecursionError):  # malformed JSON, or an integer past Python's digit limit
        text = MALFORMED if not example else f"요청 본문이 올바른 JSON이 아닙니다. 예: {example} (malformed JSON)"
        raise BodyRefused(400, text) from None
    return payload


def check_text(value: object) -> None:
    """Every string in the body, keys included, is valid Unicode (JSON's `\\ud800` escapes can make one that is not);
    a UserError says which character is not."""
    if isinstance(value, str):
        reject_broken_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            check_text(item)
    elif isinstance(value, list):
        for item in value:
            check_text(item)
