"""A generation backend that sends requests to an OpenAI-compatible `/v1/completions` server, in vLLM's dialect.

It keeps the `core.backend.Backend` contract, so every front end works unchanged over vLLM or over another bot process
serving `/v1/completions` (an engine node).

Mapping: lengths count the prompt, as everywhere in the bot, so the prompt is tokenized here with the model's
tokenizer and sent as token ids; `max_length`/`min_length` become `max_tokens`/`min_tokens`; `top_p`, `top_k`,
`temperature`, `repetition_penalty` pass as they are. Each sampled row is its own request with `n = 1` and the seed
the local engine would give it (`core.backend.row_seeds`), so a candidate's reported seed reproduces it alone.

best_of: every candidate comes back with its tokens' log-probabilities (`logprobs: 0`, tokens as ids), which give the
asked label's side of the rerank score; one batched echo request scores each candidate after the other label's
prompt; `core.rerank.pick_best` picks, as in the local engine. A remote that returns no log-probabilities (found at
start-up) cannot rerank: best_of is refused by name, the chat default falls back to 1, and /help and /healthz say so.

`no_repeat_ngram_size` is sent only to a server that says it is a bot engine node (its `GET /v1/models` has
`owned_by = "kogpt2-sentiment-bot"`); vLLM has no such parameter, so a request that sets it is refused.

The remote's state comes from a probe in the background (`GET /v1/models`, and vLLM's `/health`), once every few
seconds, more often while requests are in flight: /healthz answers from it, and requests in flight are failed with
"restarting or unreachable" once two probes in a row find the server gone, rather than waiting out their timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import Counter, Histogram

from core import openai_wire as wire
from core import rerank_rule
from core.backend import BUSY, RESTARTING, base_seed, outcome_of, row_seeds, wait_pending
from core.errors import BusyError, EngineUnavailable, ModelLoadError, RequestTimeout, ShuttingDown, UserError
from core.hops import outgoing_headers
from core.knobs import Knobs, default_knobs
from core.prompt_rules import check_prompt_ids
from core.settings import Settings
from core.telemetry import Telemetry
from core.types import NEGATIVE, POSITIVE, Generation, GenRequest, PreparedRequest

log = logging.getLogger(__name__)

ENGINE_NODE_OWNER = "kogpt2-sentiment-bot"  # what our own /v1/models says in `owned_by`
REMOTE_BUSY = "생성 서버가 지금 너무 바쁩니다. 잠시 후 다시 시도해 주세요. (the generation server is busy, try again shortly)"
UNREACHABLE = (
    "생성 서버가 다시 시작하는 중이거나 연결할 수 없습니다. 잠시 후 다시 시도해 주세요. (the generation server is "
    "restarting or cannot be reached, try again shortly)"
)
KEY_REFUSED = "생성 서버가 API 키를 거절했습니다. 운영자에게 알려 주세요. (the server refused the API key)"
MALFORMED = (
    "생성 서버의 답을 읽을 수 없습니다. 잠시 후 다시 시도해 주세요. (the generation server sent an answer the bot "
    "cannot read)"
)
NO_BEST_OF = (
    "이 생성 서버는 로그 확률을 주지 않아 best_of(라벨에 맞는 후보 고르기)를 쓸 수 없습니다. best_of 없이 한 번만 "
    "뽑습니다. (best_of is unavailable: the generation server returns no log-probabilities)"
)
BACKOFF_S = 0.25  # first retry delay; doubled each retry
PROBE_IDLE_S, PROBE_BUSY_S = 5.0, 1.0  # how often the remote is probed, without and with requests in flight
PROBE_TIMEOUT_S = 5.0
FAILED_PROBES = 2  # probes in a row finding the server gone before requests in flight are failed


def remote_timeout(seconds: float) -> RequestTimeout:
    return RequestTimeout(
        f"생성 서버가 {seconds:g}초 안에 답하지 않았습니다. 서버가 바쁘거나 다시 시작하는 중일 수 있으니 잠시 후 다시 "
        f"시도해 주세요. (the generation server did not answer within {seconds:g} s: busy or restarting)"
    )


def not_served(model: str, served: Sequence[str]) -> str:
    names = ", ".join(served) or "(없음 none)"
    return (f"생성 서버에 모델 '{model}'이(가) 없습니다. 서버의 모델: {names} — engine.model을 고치세요. "
            f"(the generation server does not serve '{model}'; it serves: {names})")


class _Retryable(Exception):
    """A connection error or a 5xx: worth another attempt."""


def unsupported_knobs(knobs: Knobs, extensions: bool) -> list[str]:
    """Knobs set to a value the remote cannot honour (vLLM has no n-gram ban)."""
    return [] if extensions or knobs.no_repeat_ngram_size == 0 else ["no_repeat_ngram_size"]


@dataclass
class _Candidate:
    text: str
    token_ids: list[int] | None  # with the end-of-text token when the candidate stopped on it
    own_logprob: float | None
    count: int  # new tokens, the end-of-text token not counted (as in the local engine)


@dataclass(eq=False)
class _Flight:
    """One request in flight: the watcher fails it through `abort` when the remote is gone."""

    abort: asyncio.Future
    failed_probes: int = 0


@dataclass
class _State:
    """The last probe's finding."""

    ok: bool
    remote: str  # reachable, unreachable, draining, key refused, model not served
    error: str = ""  # the sentence a user or operator gets
    detail: str = ""
    at: float = field(default_factory=time.monotonic)


class RemoteEngine:
    backend = "openai"

    def __init__(self, settings: Settings, tokenizer: object):
        self.settings = settings
        self.limits = settings.limits
        self.defaults: Knobs = default_knobs(settings.generation)
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.config = settings.engine
        self.accept: float | None = rerank_rule.ACCEPT
        base = self.config.url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.root_url = self.base_url[: -len("/v1")]
        self.source = f"{urlsplit(self.base_url).netloc} (openai)"
        self.sentiment = True  # the remote model is the operator's choice; nothing here can tell
        self.model_name = self.config.model
        self.extensions: bool | None = None  # an engine node; known after the first GET /v1/models
        self.logprobs: bool | None = None  # whether the remote returns log-probabilities; known after a probe
        self._session: aiohttp.ClientSession | None = None
        self._flights: set[_Flight] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._state: _State | None = None
        self._watcher: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._probe_lock = asyncio.Lock()
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
        for outcome in ("ok", "retry", "busy", "refused", "error", "timeout", "malformed"):
            self._attempts.labels(self.backend, outcome)

    @property
    def notice(self) -> str:
        return NO_BEST_OF if self.logprobs is False else ""

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background probe (needs the running event loop)."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="remote-probe")

    async def connect(self) -> None:
        """The start-up probe: learn the model name and the remote's abilities. A remote that does not serve the
        configured model stops the start with one sentence naming what it serves; one that is down is not an error
        (it may come up later: /healthz says so meanwhile)."""
        await self._probe()
        if self._state is not None and self._state.remote == "model not served":
            await self.stop()
            raise ModelLoadError(self._state.error)
        if self._state is not None and not self._state.ok:
            log.warning("remote engine %s: %s", self.base_url, self._state.error)
        if self.logprobs is False:
            log.warning("%s", NO_BEST_OF)
        self.start()

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._watcher] if self._watcher else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._watcher] if self._watcher else []), return_exceptions=True)
        self._watcher = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self, grace: float) -> int:
        """Refuse new requests, let those in flight finish for up to `grace` s, then fail the rest with RESTARTING."""
        self._closing = True
        await wait_pending([t for t in self._tasks if not t.done()], grace)
        left = [flight for flight in self._flights if not flight.abort.done()]
        for flight in left:
            flight.abort.set_exception(ShuttingDown(RESTARTING))
        return len(left)

    @property
    def queue_depth(self) -> int:
        return len(self._flights)

    @property
    def saturated(self) -> bool:
        """Whether a new request would be refused as busy, as the local engine says it."""
        return len(self._flights) >= self.limits.queue_size

    async def health(self) -> dict:
        """The last probe's finding (a probe runs now only if none has yet): /healthz never calls the remote."""
        if self._state is None:
            await self._probe()
        state = self._state
        assert state is not None
        body = {"backend": self.backend, "ok": state.ok, "remote": state.remote, "queue_depth": self.queue_depth,
                "queue_size": self.limits.queue_size, "saturated": self.saturated,
                "checked_s_ago": round(time.monotonic() - state.at, 1), "best_of": self.logprobs is not False}
        if state.error:
            body["error"] = state.error
        if state.detail:
            body["detail"] = state.detail
        if self.notice:
            body["notice"] = self.notice
        return body

    # ---- public API ------------------------------------------------------------------------------------------
    def prepare(self, request: GenRequest, continuing: bool = False) -> PreparedRequest:
        """The request checked against the limits and tokenized once (UserError when it does not fit)."""
        if request.best_of > 1 and self.logprobs is False:
            raise UserError(NO_BEST_OF.replace("best_of 없이 한 번만 뽑습니다.", "best_of 없이 다시 시도해 주세요."))
        ids = self.tokenizer(request.model_prompt, add_special_tokens=False)["input_ids"] if request.model_prompt else []
        prepared = PreparedRequest(request, tuple(check_prompt_ids(ids, request, self.limits, continuing)), continuing)
        if self.extensions is not None:  # unknown until the remote is asked; checked again before sending
            self._refuse_unsupported(request.knobs)
        return prepared

    async def generate(self, prepared: PreparedRequest | GenRequest) -> Generation:
        final = None
        async for update in self._stream(prepared, updates=False):
            final = update
        assert final is not None
        return final

    def stream(self, prepared: PreparedRequest) -> AsyncIterator[Generation]:
        """The text so far as the remote streams it (`done=False`; best_of > 1 shows only the pick), then the final
        Generation (`done=True`)."""
        return self._stream(prepared, updates=True)

    async def _stream(self, prepared: PreparedRequest | GenRequest, updates: bool) -> AsyncIterator[Generation]:
        prepared = self._admit(prepared)
        request = prepared.request
        started = time.monotonic()
        deadline = started + self.limits.request_timeout_s
        seeds = row_seeds(base_seed(request.knobs), request.knobs.n, request.best_of)
        texts = [""] * request.knobs.n
        deltas: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        flight = _Flight(asyncio.get_running_loop().create_future())
        flight.abort.add_done_callback(_retrieve)
        self._flights.add(flight)
        if len(self._flights) == 1:
            self._wake.set()  # probe more often while requests are in flight
        task = self._spawn(self._run(prepared, seeds, deadline, deltas.put_nowait if updates else None))
        error: BaseException | None = None
        new_tokens, delivered = 0, False
        getter: asyncio.Future | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(deltas.get())
                done, _ = await asyncio.wait({getter, task, flight.abort}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    index, delta = getter.result()
                    texts[index] += delta
                    yield Generation(request, tuple(texts), tuple(seeds[:request.knobs.n]), 0, False)
                    continue
                getter.cancel()
                if flight.abort.done():
                    raise flight.abort.exception()
                if not done:
                    raise remote_timeout(self.limits.request_timeout_s)
            while not deltas.empty():  # every delta is shown, however fast the remote was
                index, delta = deltas.get_nowait()
                texts[index] += delta
                yield Generation(request, tuple(texts), tuple(seeds[:request.knobs.n]), 0, False)
            if task.cancelled():  # stopped under it (the bot is stopping)
                raise ShuttingDown(RESTARTING)
            final: Generation = task.result()
            new_tokens, delivered = final.new_tokens, True
            yield final
        except BaseException as exc:
            error = exc
            raise
        finally:
            task.cancel()
            if getter is not None:
                getter.cancel()  # the reader was cancelled while waiting: no task left pending
            self._flights.discard(flight)
            outcome = "ok" if delivered else outcome_of(error)  # closed after its final item: the normal end
            self.telemetry.finished(request, outcome, time.monotonic() - started, new_tokens)

    # ---- admission -------------------------------------------------------------------------------------------
    def _admit(self, request: PreparedRequest | GenRequest) -> PreparedRequest:
        """The local engine's admission: closing → restarting, queue_size requests in flight → busy."""
        bare = request.request if isinstance(request, PreparedRequest) else request
        if self._closing:
            self.telemetry.finished(bare, "shutdown")
            raise ShuttingDown(RESTARTING)
        if len(self._flights) >= self.limits.queue_size:
            self.telemetry.finished(bare, "busy")
            raise BusyError(BUSY)
        if isinstance(request, PreparedRequest):
            return request
        try:
            return self.prepare(request)
        except UserError:
            self.telemetry.finished(request, "user_error")
            raise

    def _spawn(self, coro) -> asyncio.Task:  # noqa: ANN001
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)  # nobody may be left to read it (a timeout, an abort)
        return task

    def _refuse_unsupported(self, knobs: Knobs) -> None:
        names = unsupported_knobs(knobs, bool(self.extensions))
        if names:
            listed = ", ".join(names)
            raise UserError(
                f"이 봇의 생성 서버(vLLM 등)는 {listed} 설정을 지원하지 않습니다. {listed}=0으로 두고 다시 시도해 주세요. "
                f"(the generation server cannot honour {listed}; leave it at 0)"
            )

    # ---- one request -----------------------------------------------------------------------------------------
    async def _run(self, prepared: PreparedRequest, seeds: list[int], deadline: float,
                   on_delta: Callable[[tuple[int, str]], None] | None) -> Generation:
        request = prepared.request
        rerank = request.best_of > 1
        if (not self.model_name or (request.knobs.no_repeat_ngram_size and self.extensions is None)
                or (rerank and self.logprobs is None)):
            await self._probe(logprobs=rerank)
            if self._state is not None and not self._state.ok:
                raise EngineUnavailable(self._state.error or UNREACHABLE)
        self._refuse_unsupported(request.knobs)
        if request.best_of > 1 and not self.logprobs:
            raise UserError(NO_BEST_OF)
        k = request.best_of
        candidates = await _all([
            self._candidate(prepared, row, seed, deadline, on_delta if k == 1 else None)
            for row, seed in enumerate(seeds)
        ])
        new_tokens = sum(c.count for c in candidates)
        if k == 1:
            return Generation(request, tuple(c.text for c in candidates), tuple(seeds), new_tokens, True)
        scores = await self._scores(prepared, candidates, deadline)
        chosen = rerank_rule.pick_best(scores, request.knobs.n, self.accept)
        return Generation(request, tuple(candidates[i].text for i in chosen), tuple(seeds[i] for i in chosen),
                          new_tokens, True, tuple(rerank_rule.confidence(scores[i]) for i in chosen))

    async def _scores(self, prepared: PreparedRequest, candidates: list[_Candidate], deadline: float) -> list[float]:
        """Each candidate's label score: its own log-probability (sampled with it) minus its log-probability after
        the other label's prompt, all of those from one echo request."""
        request = prepared.request
        other = replace(request, label=NEGATIVE if request.label == POSITIVE else POSITIVE).model_prompt
        other_ids = list(self.tokenizer(other, add_special_tokens=False)["input_ids"])
        sequences = [other_ids + (c.token_ids or []) for c in candidates]
        if any(c.token_ids is None or c.own_logprob is None for c in candidates):
            raise EngineUnavailable(MALFORMED)
        total = sum(map(len, sequences))
        payload = await self._attempts_of(
            wire.scoring_body(self.model_name, sequences), False, wire.answer_limit(total + 8),
            len(sequences) + 1, deadline, None)
        try:
            answer = wire.validated(wire.Completion, payload)
        except wire.WireError as exc:
            raise self._malformed(str(exc)) from None
        by_index = {choice.index: choice for choice in answer.choices}
        scores = []
        for i, (candidate, sequence) in enumerate(zip(candidates, sequences)):
            choice = by_index.get(i)
            values = choice.logprobs.token_logprobs if choice is not None and choice.logprobs else []
            part = values[len(other_ids):len(sequence)]
            if len(values) < len(sequence) or any(v is None for v in part):
                raise self._malformed(f"echo gave {len(values)} logprobs for {len(sequence)} tokens")
            scores.append(candidate.own_logprob - sum(part))
        return scores

    async def _candidate(self, prepared: PreparedRequest, row: int, seed: int, deadline: float,
                         on_delta: Callable[[tuple[int, str]], None] | None) -> _Candidate:
        """One sampled row, with retries (connection errors and 5xx, before any text arrived) and backoff."""
        knobs = prepared.request.knobs
        budget = knobs.max_length - len(prepared.prompt_ids)
        body = wire.completion_body(self.model_name, prepared.prompt_ids, knobs, seed, on_delta is not None,
                                    bool(self.extensions), bool(self.logprobs))
        if prepared.request.user:  # OpenAI's end-user field: a node behind a token keeps each person's fair share
            body["user"] = prepared.request.user
        sent: list[str] = []

        def shown(delta: str) -> None:
            sent.append(delta)
            on_delta((row, delta))

        result = await self._attempts_of(body, on_delta is not None, wire.answer_limit(budget), budget + wire.EXTRA_EVENTS,
                                         deadline, shown if on_delta else None, lambda: bool(sent))
        return self._read_candidate(result, budget)

    def _read_candidate(self, result: object, budget: int) -> _Candidate:
        try:
            return self._candidate_of(result, budget)
        except wire.WireError as exc:
            raise self._malformed(str(exc)) from None

    def _candidate_of(self, result: object, budget: int) -> _Candidate:
        if isinstance(result, _Streamed):
            choices = result.choices
            usage = result.usage
        else:
            answer = wire.validated(wire.Completion, result)
            choices, usage = answer.choices, answer.usage
        if not choices:
            raise self._malformed("no choices")
        text = "".join(c.text for c in choices)
        values: list[float | None] = []
        tokens: list[str] = []
        has_logprobs = any(c.logprobs is not None for c in choices)
        for choice in choices:
            if choice.logprobs is not None:
                values += choice.logprobs.token_logprobs
                tokens += choice.logprobs.tokens or []
        token_ids = self._token_ids(tokens) if has_logprobs and len(tokens) == len(values) else None
        if token_ids is not None:
            if len(token_ids) > budget + 1:
                raise self._malformed(f"{len(token_ids)} tokens for max_tokens {budget}")
            count = len(token_ids) - (1 if token_ids and token_ids[-1] == self.eos_id else 0)
            own = sum(v for v in values if v is not None) if all(v is not None for v in values) else None
            return _Candidate(text, token_ids, own, count)
        if self.logprobs and self.eos_id is not None:
            raise self._malformed("no token logprobs")
        count = usage.completion_tokens if usage is not None else len(
            self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        if count > budget + 1:
            raise self._malformed(f"completion_tokens {count} for max_tokens {budget}")
        return _Candidate(text, None, None, min(count, budget))

    def _token_ids(self, tokens: list[str]) -> list[int] | None:
        """`token_id:N` (vLLM's return_tokens_as_token_ids), else the tokenizer's own pieces; None if neither."""
        ids = []
        vocab = len(self.tokenizer)
        for token in tokens:
            if token.startswith("token_id:") and token[9:].isdigit():
                ids.append(int(token[9:]))
            else:
                found = self.tokenizer.convert_tokens_to_ids(token)
                if not isinstance(found, int) or self.tokenizer.convert_ids_to_tokens(found) != token:
                    return None
                ids.append(found)
        return ids if all(0 <= i < vocab for i in ids) else None

    def _malformed(self, why: str) -> EngineUnavailable:
        log.warning("remote engine sent a malformed answer: %s", why)
        self._attempts.labels(self.backend, "malformed").inc()
        return EngineUnavailable(MALFORMED)

    # ---- HTTP ------------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        key = self.config.secret()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers())
        return self._session

    async def _attempts_of(self, body: dict, stream: bool, limit: int, max_events: int, deadline: float,
                           on_delta: Callable[[str], None] | None,
                           shown: Callable[[], bool] = lambda: False) -> object:
        """POST /v1/completions with retries before any text was shown, within the request's deadline."""
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            left = deadline - time.monotonic()
            if left <= 0:
                raise remote_timeout(self.limits.request_timeout_s)
            started = time.monotonic()
            try:
                result = await self._post(body, stream, limit, max_events, min(self.config.timeout_s, left), on_delta)
            except _Retryable as exc:
                if shown():  # text already shown cannot be taken back: no retry mid-stream
                    self._attempts.labels(self.backend, "error").inc()
                    raise EngineUnavailable(UNREACHABLE) from None
                log.warning("remote engine attempt %d of %d failed: %s", attempt + 1, self.config.retries + 1, exc)
                self._attempts.labels(self.backend, "retry" if attempt < self.config.retries else "error").inc()
                continue
            except wire.WireError as exc:
                raise self._malformed(str(exc)) from None
            self._attempts.labels(self.backend, "ok").inc()
            self._seconds.labels(self.backend).observe(time.monotonic() - started)
            return result
        raise EngineUnavailable(UNREACHABLE)

    async def _post(self, body: dict, stream: bool, limit: int, max_events: int, timeout_s: float,
                    on_delta: Callable[[str], None] | None) -> object:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._http().post(self.base_url + "/completions", json=body, timeout=timeout,
                                         headers=outgoing_headers()) as resp:
                await self._check_status(resp)
                if not stream:
                    return await wire.read_json(resp, limit)
                return await _read_stream(resp, max_events, on_delta)
        except TimeoutError:
            self._attempts.labels(self.backend, "timeout").inc()
            raise remote_timeout(timeout_s) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    async def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status == 200:
            return
        if resp.status >= 500:
            raise _Retryable(f"HTTP {resp.status}")
        if resp.status == 429:
            self._attempts.labels(self.backend, "busy").inc()
            raise BusyError(REMOTE_BUSY)
        message = wire.error_message(await _json_or_none(resp))
        self._attempts.labels(self.backend, "refused").inc()
        if resp.status in (400, 422):
            raise UserError(f"생성 서버가 요청을 거절했습니다: {message} (the generation server refused the request)")
        if resp.status in (401, 403):
            self._state = _State(False, "key refused", KEY_REFUSED, f"HTTP {resp.status}")
            log.error("remote engine refused the API key (HTTP %d)", resp.status)
            raise EngineUnavailable(KEY_REFUSED)
        if resp.status == 404:
            self._state = None  # the next look at it asks the server what it serves
            log.error("remote engine answered 404: %s", message[:200])
            raise EngineUnavailable(UNREACHABLE)
        log.error("remote engine answered HTTP %d: %s", resp.status, message[:200])
        raise EngineUnavailable(UNREACHABLE)

    # ---- the probe -------------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PROBE_BUSY_S if self._flights else PROBE_IDLE_S)
            if self._wake.is_set():  # the first request after a quiet spell: look again PROBE_BUSY_S from now
                continue
            try:
                await self._probe()
            except Exception:
                log.exception("remote engine probe failed")
            self._judge_flights()

    def _judge_flights(self) -> None:
        """Fail requests in flight once the remote has been found gone FAILED_PROBES times in a row."""
        state = self._state
        if state is None:
            return
        for flight in list(self._flights):
            flight.failed_probes = 0 if state.ok else flight.failed_probes + 1
            needed = 1 if state.remote in ("key refused", "model not served") else FAILED_PROBES
            if flight.failed_probes >= needed and not flight.abort.done():
                flight.abort.set_exception(EngineUnavailable(state.error or UNREACHABLE))

    async def _probe(self, logprobs: bool = True) -> None:
        """One probe at a time; a caller that waited for another's takes its finding. `logprobs`: also ask whether
        the remote returns log-probabilities, while that is unknown (a request to it: not while serving one that
        does not need it, which a node relaying to itself would see as one more request)."""
        seen = self._state
        async with self._probe_lock:
            if self._state is seen or self._state is None:
                await self._probe_now(logprobs)

    async def _probe_now(self, logprobs: bool) -> None:
        """GET /v1/models (the key, the model, an engine node?) and vLLM's /health (draining or dead engine: 503);
        the first time the remote answers, whether it returns log-probabilities."""
        timeout = aiohttp.ClientTimeout(total=min(PROBE_TIMEOUT_S, self.config.timeout_s))
        try:
            state = await self._probe_models(timeout)
            if state.ok:
                async with self._http().get(self.root_url + "/health", timeout=timeout) as resp:
                    if resp.status >= 500:
                        state = _State(False, "draining", UNREACHABLE, f"/health answered {resp.status}")
            if state.ok and self.logprobs is None and logprobs:
                self.logprobs = await self._probe_logprobs(timeout)
                if self.logprobs is False:
                    self.defaults = replace(self.defaults, best_of=1)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            state = _State(False, "unreachable", UNREACHABLE, type(exc).__name__)
        except wire.WireError as exc:
            state = _State(False, "unreachable", MALFORMED, str(exc))
        self._state = state

    async def _probe_models(self, timeout: aiohttp.ClientTimeout) -> _State:
        async with self._http().get(self.base_url + "/models", timeout=timeout) as resp:
            if resp.status in (401, 403):
                return _State(False, "key refused", KEY_REFUSED, f"HTTP {resp.status}")
            if resp.status >= 500:
                return _State(False, "draining", UNREACHABLE, f"/v1/models answered {resp.status}")
            if resp.status != 200:
                return _State(False, "unreachable", UNREACHABLE, f"/v1/models answered {resp.status}")
            models = wire.validated(wire.ModelList, await wire.read_json(resp, wire.BASE_BYTES)).data
        served = [m.id for m in models]
        entry = next((m for m in models if m.id == self.model_name), None if self.model_name else
                     (models[0] if models else None))
        if entry is None:
            error = not_served(self.model_name or "?", served)
            return _State(False, "model not served", error, "")
        self.model_name = entry.id
        self.extensions = entry.owned_by == ENGINE_NODE_OWNER
        return _State(True, "reachable")

    async def _probe_logprobs(self, timeout: aiohttp.ClientTimeout) -> bool | None:
        """One echo request of two tokens: the remote returns their log-probabilities (and tokens this client can
        map back to ids), or it cannot rerank. None: unknown yet (it failed for another reason)."""
        ids = list(self.tokenizer(POSITIVE, add_special_tokens=False)["input_ids"]) or [0]
        body = wire.scoring_body(self.model_name, [ids])
        async with self._http().post(self.base_url + "/completions", json=body, timeout=timeout,
                                     headers=outgoing_headers()) as resp:
            if resp.status in (400, 422):
                return False
            if resp.status != 200:
                return None
            payload = await wire.read_json(resp, wire.answer_limit(len(ids) + 1))
        choices = wire.validated(wire.Completion, payload).choices
        logprobs = choices[0].logprobs if choices else None
        if logprobs is None or len(logprobs.token_logprobs) < len(ids) + 1:
            return False
        echoed = self._token_ids((logprobs.tokens or [])[:len(ids)])
        return echoed == ids


@dataclass
class _Streamed:
    choices: list[wire.Choice]
    usage: wire.Usage | None


async def _read_stream(resp: aiohttp.ClientResponse, max_events: int,
                       on_delta: Callable[[str], None] | None) -> _Streamed:
    choices: list[wire.Choice] = []
    usage = None
    async for payload in wire.events(resp, max_events):
        if "error" in payload:
            raise _Retryable(f"stream error: {wire.error_message(payload)}")
        chunk = wire.validated(wire.StreamChunk, payload)
        for choice in chunk.choices:
            choices.append(choice)
            if choice.text and on_delta is not None:
                on_delta(choice.text)
        usage = chunk.usage or usage
    return _Streamed(choices, usage)


async def _json_or_none(resp: aiohttp.ClientResponse) -> object:
    with contextlib.suppress(wire.WireError, aiohttp.ClientError):
        return await wire.read_json(resp, wire.BASE_BYTES)
    return None


async def _all(coros: list) -> list:
    """Every row's result; when one fails, the others are cancelled (not left running against the remote)."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's exception as seen: its reader may be gone (timed out, aborted, cancelled)."""
    if not future.cancelled():
        future.exception()
