"""The OpenAI completions dialect as vLLM speaks it, from the client's side: request bodies, and the server's answer
read within bounds set by the request's own token budget and validated before anything of it is used."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.knobs import Knobs

# An answer may hold per token its text and a logprobs entry; vLLM's are well under 200 bytes a token.
BASE_BYTES = 64 * 1024
BYTES_PER_TOKEN = 2 * 1024
PARSE_IN_THREAD_BYTES = 256 * 1024  # larger bodies are parsed off the event loop
EXTRA_EVENTS = 16  # a stream's events beyond one per token: role, finish and usage chunks


class WireError(Exception):
    """The remote's answer is malformed or past its bounds; the message says which, for the log."""


LogProb = Annotated[float, Field(le=1e-3, ge=-1e9, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=1_000_000)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # servers add fields (vLLM: stop_reason, prompt_logprobs …)


class Logprobs(_Lenient):
    tokens: list[str] | None = None
    token_logprobs: list[LogProb | None] = []


class Choice(_Lenient):
    index: Count = 0
    text: str
    finish_reason: str | None = None
    logprobs: Logprobs | None = None


class Usage(_Lenient):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class Completion(_Lenient):
    choices: list[Choice]
    usage: Usage | None = None


class StreamChunk(_Lenient):
    choices: list[Choice] = []
    usage: Usage | None = None


class ModelEntry(_Lenient):
    id: str
    owned_by: str = ""


class ModelList(_Lenient):
    data: list[ModelEntry]


def validated(model: type[BaseModel], payload: object) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "answer"
        raise WireError(f"{model.__name__}: {where}: {first['msg']}") from None


def completion_body(model: str, prompt_ids: Sequence[int], knobs: Knobs, seed: int, stream: bool, extensions: bool,
                    logprobs: bool) -> dict:
    """One candidate's body in vLLM's fields (lengths there count new tokens only). `logprobs`: also each sampled
    token's log-probability under the model's own distribution (vLLM's default raw logprobs), and the tokens as
    `token_id:N` (`return_tokens_as_token_ids`, which vLLM and the engine node both take), so they can be scored
    again exactly."""
    body = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": knobs.max_length - len(prompt_ids),
        "min_tokens": max(0, knobs.min_length - len(prompt_ids)),
        "temperature": knobs.temperature,
        "top_p": knobs.top_p,
        "top_k": knobs.top_k,
        "repetition_penalty": knobs.repetition_penalty,
        "seed": seed,
        "n": 1,
        "stream": stream,
    }
    if extensions and knobs.no_repeat_ngram_size:
        body["no_repeat_ngram_size"] = knobs.no_repeat_ngram_size
    if logprobs:
        body["logprobs"] = 0
        body["return_tokens_as_token_ids"] = True
    return body


def scoring_body(model: str, sequences: Sequence[Sequence[int]]) -> dict:
    """Log-probabilities of given token sequences, all in one request: echo each prompt with its logprobs (one
    token is generated and ignored; vLLM needs max_tokens >= 1 outside its echo-only special case)."""
    return {"model": model, "prompt": [list(s) for s in sequences], "max_tokens": 1, "n": 1, "echo": True,
            "logprobs": 0, "return_tokens_as_token_ids": True, "stream": False}


def answer_limit(tokens: int) -> int:
    """The most bytes an answer covering `tokens` tokens may take."""
    return BASE_BYTES + BYTES_PER_TOKEN * max(0, tokens)


async def read_json(resp: aiohttp.ClientResponse, limit: int) -> object:
    """The body as JSON, refused past `limit` bytes (before reading it, when Content-Length says so)."""
    if (resp.content_length or 0) > limit:
        raise WireError(f"answer of {resp.content_length} bytes, over the {limit} allowed")
    data = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise WireError(f"answer over the {limit} bytes allowed")
    return await parse_json(bytes(data))


async def parse_json(data: bytes) -> object:
    try:
        if len(data) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(json.loads, data)
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"answer is not JSON: {exc}") from None


async def events(resp: aiohttp.ClientResponse, max_events: int) -> AsyncIterator[dict]:
    """A server-sent event stream's `data: {json}` payloads, up to `[DONE]`; at most `max_events` events (each line
    is bounded by aiohttp's reader), or a WireError."""
    seen = lines = 0
    while True:
        try:
            raw = await resp.content.readline()
        except ValueError as exc:  # aiohttp: a line past its buffer limit
            raise WireError(f"stream line too long: {exc}") from None
        if not raw:
            raise WireError("the stream ended without [DONE]")
        lines += 1
        if lines > 2 * max_events + 8:  # blank separators and comments count too
            raise WireError(f"stream of more than {max_events} events")
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        seen += 1
        if seen > max_events:
            raise WireError(f"stream of more than {max_events} events")
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        payload = await parse_json(data.encode())
        if not isinstance(payload, dict):
            raise WireError("stream event is not a JSON object")
        yield payload


def error_message(payload: object) -> str:
    """vLLM's `{"error": {"message": ...}}`, its older `{"message": ...}`, or our `{"error": "..."}`."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message", ""))[:500]
        return str(error)[:500]
    return ""
