"""The web server's bearer token (`web.api_token` / `api_token_file`, read once at start): when set, it guards every
generation route (`/api`, `/api/stream`, `/v1/*`) and the page, unless `web.public_page` lets the page be seen
without it. `/healthz` and `/metrics` stay open (health checks and scrapers carry no token)."""

from __future__ import annotations

import hmac

from aiohttp import web

TOKEN_KEY = web.AppKey("api_token", object)  # str | None: the token, None = open


def authorised(request: web.Request) -> bool:
    """Whether the request carries the app's bearer token (always, when none is set)."""
    token = request.app.get(TOKEN_KEY)
    if token is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Header bytes that are not UTF-8 reach here as lone surrogates: compared as the bytes they were, never a 500.
    offered = given.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(offered, token.encode("utf-8"))


def guarded(request: web.Request, public_page: bool) -> bool:
    """Whether this route needs the token: the generation routes, and the page unless it is public."""
    path = request.path
    return path in ("/api", "/api/stream") or path.startswith("/v1/") or (path == "/" and not public_page)
