"""A generation backend that sends requests to an OpenAI-compatible `/v1/completions` server, in vLLM's dialect.

It has the local engine's interface (prepare, generate, stream, defaults, limits, telemetry, queue_depth, drain, stop),
so every front end works unchanged over vLLM or over another bot process serving `/v1/completions` (an engine node).

Mapping: lengths count the prompt, as everywhere in the bot, so the prompt is tokenized here with the model's
tokenizer and sent as token ids (nothing is tokenized twice, differently); `max_length`/`min_length` become
`max_tokens`/`min_tokens`; `top_p`, `top_k`, `temperature`, `repetition_penalty` pass as they are. Each candidate is
its own request with `n = 1` and its own `seed` (base, base+1, ...), as in the local engine, so a candidate's reported
seed reproduces it alone. `no_repeat_ngram_size` is sent only to a server that says it is a bot engine node (its
`GET /v1/models` has `owned_by = "kogpt2-sentiment-bot"`); vLLM has no such parameter and would ignore it, so a
request that sets it is refused rather than silently answered without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import Counter, Histogram

from core.errors import (
    BusyError,
    EngineUnavailable,
    RequestTimeout,
    ShuttingDown,
    UserError,
)
from core.hops import outgoing_headers
from core.knobs import SEED_MAX, Knobs, default_knobs
from core.prompt_rules import check_prompt_ids
from core.settings import Settings
from core.telemetry import Telemetry
from core.types import Generation, GenRequest, PreparedRequest

log = logging.getLogger(__name__)

ENGINE_NODE_OWNER = "kogpt2-sentiment-bot"  # what our own /v1/models says in `owned_by`
RESTARTING = "봇이 다시 시작하는 중입니다. 잠시 후 다시 시도해 주세요. (the bot is restarting, try again shortly)"
BUSY = "생성 서버가 지금 너무 바쁩니다. 잠시 후 다시 시도해 주세요. (the generation server is busy, try again shortly)"
UNREACHABLE = (
    "생성 서버에 연결할 수 없습니다. 잠시 후 다시 시도해 주세요. (the generation server cannot be reached, try again "
    "shortly)"
)
BACKOFF_S = 0.25  # first retry delay; doubled each retry


class _Retryable(Exception):
    """A connection error or a 5xx: worth another attempt."""


def unsupported_knobs(knobs: Knobs, extensions: bool) -> list[str]:
    """Knobs set to a value the remote cannot honour (vLLM has no n-gram ban)."""
    return [] if extensions or knobs.no_repeat_ngram_size == 0 else ["no_repeat_ngram_size"]


def completion_body(model: str, prompt_ids: list[int], knobs: Knobs, seed: int, stream: bool, extensions: bool) -> dict:
    """One candidate's `/v1/completions` body in vLLM's fields (lengths there count new tokens only)."""
    body = {
        "model": model,
        "prompt": prompt_ids,
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
    return body


def _error_message(payload: object) -> str:
    """vLLM's `{"error": {"message": ...}}`, its older `{"message": ...}`, or our `{"error": "..."}`."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message", ""))
        return str(error)
    return ""


class RemoteEngine:
    backend = "openai"

    def __init__(self, settings: Settings, tokenizer: object):
        self.settings = settings
        self.limits = settings.limits
        # best_of's rerank reads the model's own probabilities, which only the local engine has: a chat default
        # best_of does not apply here, and one asked for is refused (prepare).
        self.defaults: Knobs = replace(default_knobs(settings.generation), best_of=1)
        if settings.generation.best_of > 1:
            log.info("generation.best_of=%d applies to the local engine only; the remote backend samples once",
                     settings.generation.best_of)
        self.tokenizer = tokenizer
        self.config = settings.engine
        base = self.config.url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.source = f"{urlsplit(self.base_url).netloc} (openai)"
        self.sentiment = True  # the remote model is the operator's choice; nothing here can tell
        self.model_name = self.config.model
        self.extensions: bool | None = None  # known after the first GET /v1/models
        self._session: aiohttp.ClientSession | None = None
        self._inflight: set[asyncio.Task] = set()
        self._closing = False
        self.telemetry = Telemetry(lambda: self.queue_depth)
        registry = self.telemetry.metrics.registry
        self._attempts = Counter(
            "bot_remote_attempts", "HTTP attempts to the remote engine by backend and outcome",
            ("backend", "outcome"), registry=registry,
        )
        self._seconds = Histogram(
            "bot_remote_request_seconds", "Time of successful remote generation requests", ("backend",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), registry=registry,
        )
        for outcome in ("ok", "retry", "busy", "refused", "error", "timeout"):
            self._attempts.labels(self.backend, outcome)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start: the HTTP session is opened on first use, inside the event loop."""

    async def stop(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self, grace: float) -> int:
        """Refuse new requests, let those in flight finish for up to `grace` s, then fail the rest with RESTARTING."""
        self._closing = True
        pending = [t for t in self._inflight if not t.done()]
        if pending and grace > 0:
            await asyncio.wait(pending, timeout=grace)
        left = [t for t in self._inflight if not t.done()]
        for task in left:
            task.cancel(RESTARTING)
        return len(left)

    @property
    def queue_depth(self) -> int:
        return len(self._inflight)

    async def health(self) -> dict:
        """Whether the remote answers `GET /v1/models` (for /healthz)."""
        try:
            await self._models(timeout=min(5.0, self.config.timeout_s))
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            return {"backend": self.backend, "ok": False, "remote": "unreachable", "detail": type(exc).__name__}
        return {"backend": self.backend, "ok": True, "remote": "reachable", "queue_depth": self.queue_depth}

    # ---- public API ------------------------------------------------------------------------------------------
    def encode_prompt(self, request: GenRequest, continuing: bool = False) -> list[int]:
        ids = self.tokenizer(request.model_prompt, add_special_tokens=False)["input_ids"] if request.model_prompt else []
        return check_prompt_ids(ids, request, self.limits, continuing)

    def prepare(self, request: GenRequest, continuing: bool = False) -> PreparedRequest:
        """The request checked against the limits and tokenized once (UserError when it does not fit)."""
        if request.best_of > 1:
            raise UserError(
                "best_of는 이 봇이 모델을 직접 돌릴 때만 쓸 수 있습니다 (지금은 원격 생성 서버를 씁니다). best_of 없이 다시 "
                "시도해 주세요. (best_of needs the local engine: its rerank reads the model's own probabilities)"
            )
        prepared = PreparedRequest(request, tuple(self.encode_prompt(request, continuing)), continuing)
        if self.extensions is not None:  # unknown until the remote is asked; checked again before sending
            self._refuse_unsupported(request.knobs)
        return prepared

    async def generate(self, request: GenRequest | PreparedRequest, continuing: bool = False) -> Generation:
        final = None
        async for update in self.stream(request, continuing, _updates=False):
            final = update
        assert final is not None
        return final

    async def stream(
        self, request: GenRequest | PreparedRequest, continuing: bool = False, _updates: bool = True
    ) -> AsyncIterator[Generation]:
        """Yield the text so far as the remote streams it (`done=False`), then the final Generation (`done=True`)."""
        prepared = self._prepared(request, continuing)
        request = prepared.request
        started = time.monotonic()
        texts = [""] * request.knobs.n
        tokens = [0] * request.knobs.n
        updates: asyncio.Queue[tuple[int, str, int | None]] = asyncio.Queue()
        outcome, task = "error", None
        try:
            await self._check_extensions(request.knobs)
            base = request.knobs.seed if request.knobs.seed is not None else secrets.randbelow(SEED_MAX)
            seeds = tuple((base + i) % (SEED_MAX + 1) for i in range(request.knobs.n))
            task = asyncio.ensure_future(self._candidates(prepared, seeds, _updates, updates.put_nowait))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            deadline = started + self.limits.request_timeout_s
            while not task.done():
                getter = asyncio.ensure_future(updates.get())
                done, _ = await asyncio.wait({getter, task}, timeout=deadline - time.monotonic(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    getter.cancel()
                    raise RequestTimeout(
                        f"생성이 {self.limits.request_timeout_s:g}초 안에 끝나지 않았습니다. 더 짧게(max_length) 다시 "
                        f"시도해 주세요. (generation timed out)"
                    )
                if getter.done():
                    index, delta, _ = getter.result()
                    texts[index] += delta
                    yield Generation(request, tuple(texts), seeds, sum(tokens), False)
                else:
                    getter.cancel()
            while not updates.empty():  # every delta is shown, however fast the remote was
                index, delta, _ = updates.get_nowait()
                texts[index] += delta
                yield Generation(request, tuple(texts), seeds, sum(tokens), False)
            try:
                finals = task.result()
            except asyncio.CancelledError:
                raise ShuttingDown(RESTARTING) from None
            texts = [text for text, _ in finals]
            tokens = [count for _, count in finals]
            outcome = "ok"
            yield Generation(request, tuple(texts), seeds, sum(tokens), True)
        except RequestTimeout:
            outcome = "timeout"
            raise
        except ShuttingDown:
            outcome = "shutdown"
            raise
        except BusyError:
            outcome = "busy"
            raise
        except EngineUnavailable:
            outcome = "error"
            raise
        except UserError:
            outcome = "user_error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "ok":  # closing the generator after its final item is the normal end
                outcome = "cancelled"
            raise
        finally:
            if task is not None and not task.done():
                task.cancel()
            self.telemetry.finished(request, outcome, time.monotonic() - started, sum(tokens))

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def _prepared(self, request: GenRequest | PreparedRequest, continuing: bool) -> PreparedRequest:
        if self._closing:
            raise ShuttingDown(RESTARTING)
        if isinstance(request, PreparedRequest):
            return request
        try:
            return self.prepare(request, continuing)
        except UserError:
            self.telemetry.finished(request, "user_error")
            raise

    def _refuse_unsupported(self, knobs: Knobs) -> None:
        names = unsupported_knobs(knobs, bool(self.extensions))
        if names:
            listed = ", ".join(names)
            raise UserError(
                f"이 봇의 생성 서버(vLLM 등)는 {listed} 설정을 지원하지 않습니다. {listed}=0으로 두고 다시 시도해 주세요. "
                f"(the generation server cannot honour {listed}; leave it at 0)"
            )

    async def _check_extensions(self, knobs: Knobs) -> None:
        if knobs.no_repeat_ngram_size and self.extensions is None:
            try:
                await self._models(timeout=self.config.timeout_s)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                raise EngineUnavailable(UNREACHABLE) from None
        self._refuse_unsupported(knobs)

    def _headers(self) -> dict[str, str]:
        key = self.config.secret()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers())
        return self._session

    async def _models(self, timeout: float) -> list[dict]:
        """GET /v1/models; learns the model name (when not configured) and whether the remote is an engine node."""
        async with self._http().get(self.base_url + "/models", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise ValueError(f"GET /v1/models answered {resp.status}")
            models = (await resp.json()).get("data") or []
        entry = next((m for m in models if m.get("id") == self.model_name), models[0] if models else None)
        if entry is None:
            raise ValueError("the remote serves no model")
        if not self.model_name:
            self.model_name = str(entry["id"])
        self.extensions = entry.get("owned_by") == ENGINE_NODE_OWNER
        return models

    async def _candidates(
        self, prepared: PreparedRequest, seeds: tuple[int, ...], stream: bool,
        on_delta: Callable[[tuple[int, str, int | None]], None],
    ) -> list[tuple[str, int]]:
        if not self.model_name:
            try:
                await self._models(timeout=self.config.timeout_s)
            except (TimeoutError, aiohttp.ClientError, ValueError):
                self._attempts.labels(self.backend, "error").inc()
                raise EngineUnavailable(UNREACHABLE) from None
        return list(await asyncio.gather(*(
            self._one(prepared, index, seed, stream, on_delta) for index, seed in enumerate(seeds)
        )))

    async def _one(
        self, prepared: PreparedRequest, index: int, seed: int, stream: bool,
        on_delta: Callable[[tuple[int, str, int | None]], None],
    ) -> tuple[str, int]:
        """One candidate, with retries (connection errors and 5xx, before any text arrived) and backoff."""
        body = completion_body(self.model_name, list(prepared.prompt_ids), prepared.request.knobs, seed, stream,
                               bool(self.extensions))
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            started = time.monotonic()
            sent: list[str] = []

            def shown(delta: str, sent: list[str] = sent) -> None:
                sent.append(delta)
                on_delta((index, delta, None))

            try:
                text, tokens = await self._post(body, stream, shown)
            except _Retryable as exc:
                if sent:  # text already shown cannot be taken back: no retry mid-stream
                    self._attempts.labels(self.backend, "error").inc()
                    raise EngineUnavailable(UNREACHABLE) from None
                log.warning("remote engine attempt %d of %d failed: %s", attempt + 1, self.config.retries + 1, exc)
                self._attempts.labels(self.backend, "retry" if attempt < self.config.retries else "error").inc()
                continue
            self._attempts.labels(self.backend, "ok").inc()
            self._seconds.labels(self.backend).observe(time.monotonic() - started)
            if tokens is None:
                tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            return text, tokens
        raise EngineUnavailable(UNREACHABLE)

    async def _post(self, body: dict, stream: bool, on_delta: Callable[[str], object]) -> tuple[str, int | None]:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self._http().post(self.base_url + "/completions", json=body, timeout=timeout,
                                         headers=outgoing_headers()) as resp:
                if resp.status >= 500:
                    raise _Retryable(f"HTTP {resp.status}")
                if resp.status == 429:
                    self._attempts.labels(self.backend, "busy").inc()
                    raise BusyError(BUSY)
                if resp.status != 200:
                    message = _error_message(await _json_or_none(resp))
                    self._attempts.labels(self.backend, "refused").inc()
                    if resp.status in (400, 422):
                        raise UserError(f"생성 서버가 요청을 거절했습니다: {message} (the generation server refused "
                                        f"the request)")
                    log.error("remote engine answered HTTP %d: %s", resp.status, message[:200])
                    raise EngineUnavailable(UNREACHABLE)
                if not stream:
                    payload = await resp.json()
                    choice = payload["choices"][0]
                    usage = payload.get("usage") or {}
                    return str(choice.get("text", "")), usage.get("completion_tokens")
                return await _read_sse(resp, on_delta)
        except TimeoutError:
            self._attempts.labels(self.backend, "timeout").inc()
            raise RequestTimeout(
                f"생성 서버가 {self.config.timeout_s:g}초 안에 답하지 않았습니다. 더 짧게(max_length) 다시 시도해 "
                f"주세요. (the generation server timed out)"
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None


async def _json_or_none(resp: aiohttp.ClientResponse) -> object:
    with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
        return await resp.json(content_type=None)
    return None


async def _read_sse(resp: aiohttp.ClientResponse, on_delta: Callable[[str], object]) -> tuple[str, int | None]:
    """The server-sent events of a streamed completion: `data: {json}` chunks, then `data: [DONE]`."""
    text, tokens = "", None
    async for raw in resp.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return text, tokens
        chunk = json.loads(data)
        if "error" in chunk:
            raise _Retryable(f"stream error: {_error_message(chunk)}")
        for choice in chunk.get("choices") or []:
            delta = str(choice.get("text") or "")
            if delta:
                text += delta
                on_delta(delta)
        if chunk.get("usage"):
            tokens = chunk["usage"].get("completion_tokens", tokens)
    raise _Retryable("the stream ended without [DONE]")
