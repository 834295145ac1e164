"""aiohttp's server with bounds for slow or idle clients (slowloris) and JSON for the errors it gives itself.

A request's headers must be complete within HEADER_TIMEOUT_S of connecting, an idle keep-alive connection closes after
KEEPALIVE_TIMEOUT_S, and beyond MAX_CONNECTIONS the oldest connection still sending its headers is closed, so a flood
of half-sent requests cannot use up the file descriptors and `/healthz` stays answerable.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

from aiohttp import web, web_protocol, web_server

from core.conversation import error_text

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # a request's headers must be complete this long after the connection opens
KEEPALIVE_TIMEOUT_S = 15.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 512  # beyond this, the oldest connection still sending its headers or body is closed
LOW_LEVEL_TEXT = {  # errors aiohttp's parser finds before any handler runs
    400: "요청을 이해할 수 없습니다. (bad request)",
    413: "요청이 너무 큽니다. (request too large)",
    431: "요청 헤더가 너무 큽니다. (request headers too large)",
}


def dumps(payload: object) -> str:
    """JSON text for a response; a lone surrogate quoted back from a request is escaped rather than failing."""
    text = json.dumps(payload, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload)
    return text


def client_left(request: web.Request, route: str) -> None:
    """A client closing its stream early is normal: one INFO line, no traceback."""
    log.info("client %s left %s before the end", request.remote or "?", route)


@contextlib.contextmanager
def reading_body(request: web.Request) -> Iterator[None]:
    """While a handler waits for the request's body, its connection counts as still sending (the first to be closed
    past MAX_CONNECTIONS), so half-sent bodies cannot hold every file descriptor until their deadline."""
    handler = request.protocol
    guarded = isinstance(handler, _GuardedHandler)
    if guarded:
        handler.body_pending = True
    try:
        yield
    finally:
        if guarded:
            handler.body_pending = False


class _GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with a deadline for the request's headers and JSON for its own errors."""

    body_pending = False  # a handler is waiting for this request's body (reading_body)

    def connection_made(self, transport) -> None:  # noqa: ANN001
        super().connection_made(transport)
        self.headers_due = self._loop.call_later(HEADER_TIMEOUT_S, self._too_slow)
        self._manager.opened(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.headers_due is not None and (self._messages or self._current_request is not None):
            self.headers_due.cancel()
            self.headers_due = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.headers_due is not None:
            self.headers_due.cancel()
            self.headers_due = None
        manager = self._manager
        super().connection_lost(exc)
        if isinstance(manager, _GuardedServer):
            manager.closed(self)

    def _too_slow(self) -> None:
        self.headers_due = None
        if self.transport is not None:
            self.transport.close()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,  # noqa: ANN001
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs, and refuses when a response was already sent
        text = LOW_LEVEL_TEXT.get(status) or (error_text(exc or RuntimeError(message), "web connection") if status >= 500 else str(status))
        response = web.Response(status=status, text=dumps({"error": text}), content_type="application/json")
        response.force_close()
        return response


class _GuardedServer(web_server.Server):
    """Hands out _GuardedHandler and caps open connections by closing the oldest one still sending headers."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._waiting: dict[_GuardedHandler, None] = {}  # insertion-ordered: oldest first
        self._open = 0

    def __call__(self) -> _GuardedHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    def opened(self, handler: _GuardedHandler) -> None:
        self._open += 1
        self._waiting[handler] = None
        if self._open > MAX_CONNECTIONS:
            stale = next((h for h in self._waiting
                          if h is not handler and (h.headers_due is not None or h.body_pending)), None)
            if stale is not None and stale.transport is not None:
                stale.transport.close()

    def closed(self, handler: _GuardedHandler) -> None:
        self._open -= 1
        self._waiting.pop(handler, None)


class GuardedRunner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        kwargs = {**server._kwargs, "keepalive_timeout": KEEPALIVE_TIMEOUT_S}  # noqa: SLF001
        # A client that goes away cancels its handler, so the engine stops generating what nobody will read.
        return _GuardedServer(server.request_handler, request_factory=server.request_factory, loop=server._loop,  # noqa: SLF001
                              handler_cancellation=True, **kwargs)
