"""A small fake of vLLM's OpenAI-compatible server on loopback: `GET /v1/models` and `POST /v1/completions`.

It checks each completion body against the fields and ranges vLLM's `CompletionRequest`/`SamplingParams` document
(vLLM logs and ignores unknown fields, so this fake rejects them: a test would otherwise miss a silently dropped
knob), answers plainly or as server-sent events (`data: {chunk}` … `data: [DONE]`), and can fail the next calls with
a status or a dropped connection, or never answer.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

# vLLM's completions fields this client may use (OpenAI's, plus vLLM's extra sampling parameters).
VLLM_FIELDS = {
    "model", "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "n",
    "stream", "best_of", "stream_options", "stop", "echo", "logprobs", "presence_penalty", "frequency_penalty",
    "min_p", "ignore_eos", "skip_special_tokens", "user",
}


def check_body(body: dict) -> list[str]:
    """What vLLM would refuse (or, for unknown fields, silently ignore) in a completion request."""
    problems = [f"unknown field {k}" for k in body if k not in VLLM_FIELDS]
    prompt = body.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt))):
        problems.append("prompt must be a string or a list of token ids")
    def is_int(k: str) -> bool:
        return type(body.get(k)) is int
    if "max_tokens" in body and not (is_int("max_tokens") and body["max_tokens"] >= 1):
        problems.append("max_tokens must be an int >= 1")
    if "min_tokens" in body and not (is_int("min_tokens") and 0 <= body["min_tokens"] <= body.get("max_tokens", 16)):
        problems.append("min_tokens must be an int in [0, max_tokens]")
    if "temperature" in body and not body["temperature"] >= 0:
        problems.append("temperature must be >= 0")
    if "top_p" in body and not 0 < body["top_p"] <= 1:
        problems.append("top_p must be in (0, 1]")
    if "top_k" in body and not (is_int("top_k") and (body["top_k"] in (-1, 0) or body["top_k"] >= 1)):
        problems.append("top_k must be -1, 0 or >= 1")
    if "repetition_penalty" in body and not body["repetition_penalty"] > 0:
        problems.append("repetition_penalty must be > 0")
    if "seed" in body and not (is_int("seed") and -(2**63) <= body["seed"] < 2**63):
        problems.append("seed must be a 64-bit int")
    if "n" in body and not (is_int("n") and body["n"] >= 1):
        problems.append("n must be an int >= 1")
    if "stream" in body and type(body["stream"]) is not bool:
        problems.append("stream must be a boolean")
    return problems


class FakeVLLM:
    def __init__(self, model: str = "kogpt2", api_key: str | None = None):
        self.model, self.api_key = model, api_key
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.failures: list[int | str] = []  # statuses, "drop" (close the connection) or "hang" (never answer)
        self._closing = asyncio.Event()  # releases hanging handlers at close
        self.app = web.Application()
        self.app.add_routes([web.get("/v1/models", self._models), web.post("/v1/completions", self._completions)])

    async def start(self) -> FakeVLLM:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._closing.set()
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "vllm"}]})

    @staticmethod
    def text_for(body: dict) -> str:
        """A deterministic continuation that shows which seed made it."""
        return f" 재밌다 seed{body['seed']}"

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.failures:
            failure = self.failures.pop(0)
            if failure == "drop":
                request.transport.close()
                return web.Response()
            if failure == "hang":
                await self._closing.wait()
            return web.json_response({"error": {"message": f"fake failure {failure}"}}, status=int(failure))
        if not self._authorised(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        problems = check_body(body)
        if problems:
            return web.json_response({"error": {"message": "; ".join(problems), "type": "BadRequestError"}}, status=400)
        text = self.text_for(body)
        if not body.get("stream"):
            return web.json_response({
                "id": "cmpl-1", "object": "text_completion", "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3,
                          "total_tokens": len(body["prompt"]) + 3},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in text.split(" ")[1:]:
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": self.model,
                     "choices": [{"index": 0, "text": " " + piece, "logprobs": None, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
