"""The bearer token guards every generation route (issue 19, item 3), and is read once at start (item 9)."""

from __future__ import annotations

import os

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import make_settings, running_core

from bot.web import create_app

TOKEN = "s3cret-token"
ROUTES = [("POST", "/api", {"prompt": "긍정 아"}), ("POST", "/api/stream", {"prompt": "긍정 아"}),
          ("POST", "/v1/completions", {"prompt": "아 정말", "max_tokens": 2}), ("GET", "/v1/models", None)]


@pytest.fixture
async def guarded(tiny_dir, tmp_path, request):
    token_file = tmp_path / "api_token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    settings = make_settings(tiny_dir, tmp_path, web={"api_token_file": str(token_file), **getattr(request, "param", {})})
    async with running_core(settings) as core, TestClient(TestServer(create_app(core))) as client:
        yield client, token_file


async def _call(client, method: str, path: str, body, token: str | None = None, scheme: str = "Bearer"):
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return await client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
async def test_every_generation_route_needs_the_token(guarded, method, path, body):
    client, _ = guarded
    for token in (None, "wrong", TOKEN[:-1]):
        response = await _call(client, method, path, body, token)
        assert response.status == 401, (path, token)
        assert "token" in (await response.text())
    response = await _call(client, method, path, body, TOKEN)
    assert response.status == 200, await response.text()
    assert (await _call(client, method, path, body, TOKEN, scheme="bearer")).status == 200  # the scheme's case


async def test_the_page_is_guarded_unless_the_operator_makes_it_public(guarded):
    client, _ = guarded
    assert (await client.get("/")).status == 401
    assert (await client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
    for open_path in ("/healthz", "/metrics"):  # health checks and scrapers carry no token
        assert (await client.get(open_path)).status == 200, open_path


@pytest.mark.parametrize("guarded", [{"public_page": True}], indirect=True)
async def test_a_public_page_leaves_the_api_guarded(guarded):
    client, _ = guarded
    page = await client.get("/")
    assert page.status == 200 and "api_token" in await page.text()  # the page asks for the token on a 401
    assert (await _call(client, "POST", "/api", {"prompt": "긍정 아"})).status == 401


async def test_the_token_file_is_read_once_at_start(guarded, tmp_path):
    """Regression: the file was read on every request; once gone every request answered 500, a FIFO froze them."""
    client, token_file = guarded
    token_file.unlink()
    os.mkfifo(token_file)  # a reader would block here forever
    assert (await _call(client, "POST", "/api", {"prompt": "긍정 아"})).status == 401
    assert (await _call(client, "POST", "/api", {"prompt": "긍정 아"}, TOKEN)).status == 200
    assert (await _call(client, "GET", "/v1/models", None, TOKEN)).status == 200
