"""A small fake of vLLM's OpenAI-compatible server on loopback: `GET /v1/models` and `POST /v1/completions`.

It checks each completion body against the fields and ranges vLLM's `CompletionRequest`/`SamplingParams` document
(vLLM logs and ignores unknown fields, so this fake rejects them: a test would otherwise miss a silently dropped
knob), answers plainly or as server-sent events (`data: {chunk}` … `data: [DONE]`), and can fail the next calls with
a status or a dropped connection, or never answer.

Given a tokenizer it also speaks vLLM's log-probabilities: each seed samples its own token ids (ending with the
end-of-text token when it stops early, which vLLM counts in `completion_tokens` and lists in `logprobs`), `logprobs: 0`
returns each token's log-probability from `logprob` below (a deterministic stand-in for a model, one that depends
on the prompt's first token, so the two labels score a text differently), `return_tokens_as_token_ids` names tokens
as `token_id:N`, and `echo` returns the prompt's tokens with theirs (the first is null). Without a tokenizer it
answers a request for log-probabilities with 400, as a server that has none.
"""

from __future__ import annotations

import asyncio
import json
import random

from aiohttp import web

# vLLM's completions fields this client may use (OpenAI's, plus vLLM's extra sampling parameters).
VLLM_FIELDS = {
    "model", "prompt", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "n",
    "stream", "best_of", "stream_options", "stop", "echo", "logprobs", "presence_penalty", "frequency_penalty",
    "min_p", "ignore_eos", "skip_special_tokens", "user", "return_tokens_as_token_ids",
}


def logprob(prefix: list[int], token: int) -> float:
    """The fake model's log p(token | prefix): depends on the first and the last token of the prefix."""
    return -(((prefix[0] * 7919 + prefix[-1] * 31 + token * 17) % 997) / 100 + 0.01)


def _ids_ok(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(type(t) is int for t in prompt)


def check_body(body: dict) -> list[str]:
    """What vLLM would refuse (or, for unknown fields, silently ignore) in a completion request."""
    problems = [f"unknown field {k}" for k in body if k not in VLLM_FIELDS]
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt)
    if not (isinstance(prompt, str) or _ids_ok(prompt) or (batch and all(map(_ids_ok, prompt)))):
        problems.append("prompt must be a string, a list of token ids, or a list of those")
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
    def __init__(self, model: str = "kogpt2", api_key: str | None = None, tokenizer: object = None):
        self.model, self.api_key, self.tokenizer = model, api_key, tokenizer
        self.health_status = 200  # vLLM's /health: 503 while its engine is dead or draining
        self.answer: object = None  # when set, every completion is answered with this JSON (a misbehaving server)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        # statuses, "drop" (close the connection), "hang" (never answer) or "flood" (an endless event stream)
        self.failures: list[int | str] = []
        self._closing = asyncio.Event()  # releases hanging handlers at close
        self.app = web.Application()
        self.app.add_routes([web.get("/v1/models", self._models), web.post("/v1/completions", self._completions),
                             web.get("/health", self._health)])
        self.model_gets = 0

    @property
    def samples(self) -> list[dict]:
        """The completion bodies that sampled (not the echo requests that score or probe)."""
        return [b for b in self.bodies if not b.get("echo")]

    async def start(self) -> FakeVLLM:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.site = site
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop_listening(self) -> None:
        """New connections are refused from now on; those open stay (as a server process going away)."""
        self.site._server.close()

    async def close(self) -> None:
        self._closing.set()
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        self.model_gets += 1
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
            if failure == "flood":  # an event stream far longer than max_tokens allows
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                chunk = json.dumps({"choices": [{"index": 0, "text": "가", "finish_reason": None}]})
                for _ in range(100_000):
                    await response.write(f"data: {chunk}\n\n".encode())
                return response
            return web.json_response({"error": {"message": f"fake failure {failure}"}}, status=int(failure))
        if not self._authorised(request):
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        problems = check_body(body)
        if (body.get("logprobs") is not None or body.get("echo")) and self.tokenizer is None:
            problems.append("this server returns no log-probabilities")
        if problems:
            return web.json_response({"error": {"message": "; ".join(problems), "type": "BadRequestError"}}, status=400)
        if self.answer is not None:
            return web.json_response(self.answer)
        if self.tokenizer is not None:
            return await self._sampled(request, body)
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

    # ---- with a tokenizer: token ids and log-probabilities --------------------------------------------------------
    def sample(self, prompt: list[int], seed: int, max_tokens: int) -> tuple[list[int], str]:
        """The seed's continuation: its token ids (the end-of-text token last when it stops early) and finish_reason."""
        rng = random.Random(seed)
        eos = self.tokenizer.eos_token_id
        length = rng.randint(1, max_tokens)
        ids = [rng.randrange(10, len(self.tokenizer)) for _ in range(length)]
        ids = [i if i != eos else i + 1 for i in ids]
        if length < max_tokens:
            return ids + [eos], "stop"
        return ids, "length"

    def _token_names(self, ids: list[int], as_ids: bool) -> list[str]:
        return [f"token_id:{i}" for i in ids] if as_ids else self.tokenizer.convert_ids_to_tokens(ids)

    def _logprobs(self, prompt: list[int], ids: list[int], as_ids: bool, echoed: int = 0) -> dict:
        values = [None if echoed and i == 0 else logprob(prompt + ids[:i] if not echoed else ids[:i], t)
                  for i, t in enumerate(ids)]
        return {"text_offset": [0] * len(ids), "token_logprobs": values, "tokens": self._token_names(ids, as_ids),
                "top_logprobs": [None] * len(ids)}

    async def _sampled(self, request: web.Request, body: dict) -> web.StreamResponse:
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        want = body.get("logprobs") is not None
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices, used = [], 0
        for index, prompt in enumerate(prompts):
            if body.get("echo"):
                ids, finish = prompt + [self.tokenizer.eos_token_id], "stop"
                logprobs = self._logprobs([], ids, as_ids, echoed=len(prompt))
            else:
                ids, finish = self.sample(prompt, body["seed"], body["max_tokens"])
                logprobs = self._logprobs(prompt, ids, as_ids)
            used += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            choices.append({"index": index, "text": text, "logprobs": logprobs if want else None,
                            "finish_reason": finish, "ids": ids})
        if not body.get("stream"):
            for choice in choices:
                choice.pop("ids")
            return web.json_response({
                "id": "cmpl-1", "object": "text_completion", "model": self.model, "choices": choices,
                "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": used,
                          "total_tokens": sum(map(len, prompts)) + used},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        prompt, ids = prompts[0], choices[0]["ids"]
        shown = ""
        for i, token in enumerate(ids):  # one event per token, its text the delta of the decoded whole
            text = self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            delta, shown = text[len(shown):], text
            part = self._logprobs(prompt + ids[:i], [token], as_ids) if want else None
            finish = choices[0]["finish_reason"] if i == len(ids) - 1 else None
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": self.model,
                     "choices": [{"index": 0, "text": delta, "logprobs": part, "finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
