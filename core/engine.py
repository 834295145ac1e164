"""The one generation engine every front end shares.

Requests wait in a bounded queue, one per user served in turn (core/scheduler.py); a single worker thread owns the
model and decodes every admitted row together (continuous batching): requests that arrive together are prefilled
together and join the running batch at the next step, each row samples with its own knobs and its own seeded
generator, and a row that ends (eos or its max_length) is answered at once and leaves the batch. The event loop never
runs model code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from core import logprobs, rerank
from core.backend import BUSY, RESTARTING, base_seed, outcome_of, row_seeds, timed_out, wait_pending
from core.cpus import usable_cpus
from core.devices import device_of
from core.errors import BusyError, ShuttingDown, UserError
from core.gpt2_decode import DecodeBatch, decode_batch
from core.gpt2_model import as_transformers
from core.knobs import Knobs, default_knobs
from core.memory import return_freed_memory
from core.model_loading import LoadedModel
from core.prompt_rules import check_prompt_ids
from core.sampling import History, next_tokens
from core.scheduler import FairQueue, QueueFull, UserQueueFull
from core.settings import Settings
from core.telemetry import Telemetry
from core.thread_tuner import ThreadTuner, candidates_for
from core.types import NEGATIVE, POSITIVE, Generation, GenRequest, PreparedRequest, TokenLogprob

if TYPE_CHECKING:
    from transformers import Cache  # the cache of transformers' forward (_Batch), imported only where that runs

log = logging.getLogger(__name__)
# An idle engine stops waiting for company once no request came for this long (core.scheduler.FairQueue.gather):
# a burst's requests reach it about a millisecond apart here, so a lone request waits 3 ms, not the whole window.
QUIET_S = 0.003
__all__ = ["RESTARTING", "Engine", "row_seeds", "start_engine"]  # the shared names stay importable from here


@dataclass(eq=False)
class _Job:
    request: GenRequest
    prompt_ids: list[int]
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    changed: asyncio.Event | None  # set when the caller streams: new tokens since the stream last looked
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)  # for the latency metric
    generated: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)  # ended with the end-of-text token (scored with it)
    # best_of > 1: each candidate's log p(tokens | own label's prompt), summed from the decoding logits as it goes
    own_logprobs: list[float] = field(default_factory=list)
    picks: tuple[list[int], tuple[float, ...]] | None = None  # the rerank's choice and confidences, once done
    prompt_text: str | None = None  # the prompt decoded, cached for cutting it off each continuation
    # Only when the request asks (the engine node): each candidate's sampled tokens' and the prompt's log-probabilities
    token_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(eq=False)
class _Row:
    job: _Job
    candidate: int
    tokens: list[int]
    generator: torch.Generator
    history: History  # what the penalties read, kept up to date with `tokens`


class Engine:
    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.sentiment = loaded.sentiment  # whether the label words steer the model (/help warns when not)
        self.accept: float | None = rerank.ACCEPT  # best_of's acceptance threshold (None: always the arg-max)
        self.settings = settings
        self.limits = settings.limits
        self.defaults: Knobs = default_knobs(settings.generation)
        self.eos_id = int(self.tokenizer.eos_token_id)
        positions = int(self.model.config.n_positions)
        if self.limits.max_length > positions:
            raise UserError(
                f"limits.max_length({self.limits.max_length})가 모델의 위치 수({positions})보다 큽니다. "
                f"(limits.max_length exceeds the model's {positions} positions)"
            )
        self._queue: FairQueue[_Job] = FairQueue(self.limits.queue_size, self.limits.max_queued_rows_per_user)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._jobs: set[_Job] = set()  # submitted and not yet answered (event-loop side)
        self._closing = False
        self._worked = False  # whether the worker has run anything since it last gave freed memory back
        # Every request ends here (or in _submit), so every front end is counted and logged in one place.
        self.telemetry = Telemetry(lambda: self.queue_depth)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def drain(self, grace: float) -> int:
        """Refuse new requests, let those in flight finish for up to `grace` s, then fail the rest with RESTARTING.

        Returns how many were still unfinished after the grace (each was told the bot is restarting)."""
        self._closing = True
        await wait_pending([job.future for job in self._jobs if not job.future.done()], grace)
        left = [job for job in self._jobs if not job.future.done()]
        for job in left:
            job.cancelled = True  # the worker drops its rows at the next step
            self._queue.remove(job)
            _set_exception(job.future, ShuttingDown(RESTARTING))
        return len(left)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def saturated(self) -> bool:
        """Whether a new request would be refused as busy: the queue is full."""
        return len(self._queue) >= self.limits.queue_size

    backend = "local"
    notice = ""  # nothing this backend cannot do

    async def health(self) -> dict:
        """For /healthz: whether the worker thread that owns the model is alive."""
        alive = self._thread is not None and self._thread.is_alive()
        return {"backend": self.backend, "ok": alive, "queue_depth": self.queue_depth, "queue_size": self.limits.queue_size,
                "saturated": self.saturated, "device": str(device_of(self.model))}

    # ---- public API ------------------------------------------------------------------------------------------
    def prepare(self, request: GenRequest, continuing: bool = False) -> PreparedRequest:
        """Check `request` against the limits and tokenize it (once); a UserError says what does not fit.

        `continuing`: the prompt is the bot's own earlier output, held to max_length only, not the prompt cap.
        """
        ids = self.tokenizer(request.model_prompt, add_special_tokens=False)["input_ids"] if request.model_prompt else []
        return PreparedRequest(request, tuple(check_prompt_ids(ids, request, self.limits, continuing)), continuing)

    async def generate(self, prepared: PreparedRequest | GenRequest) -> Generation:
        """Generate every candidate; raises UserError (BusyError, RequestTimeout, ShuttingDown) on refusal.

        A bare GenRequest is prepared first (a convenience for scripts and tests; serving code prepares once itself)."""
        if isinstance(prepared, GenRequest):
            try:
                prepared = self.prepare(prepared)
            except UserError:
                self.telemetry.finished(prepared, "user_error")
                raise
        job = self._submit(prepared, streaming=False)
        return await self._await(job)

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[Generation]:
        """Yield the text so far (`done=False`) whenever new tokens came since the last yield, then the final
        Generation (`done=True`). Steps the consumer did not wait for are never decoded."""
        job = self._submit(prepared, streaming=True)
        result = asyncio.ensure_future(self._await(job))
        try:
            while not result.done():
                changed = asyncio.ensure_future(job.changed.wait())
                await asyncio.wait({changed, result}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if result.done():
                    break
                job.changed.clear()
                yield self._result(job, False)
            yield result.result()
        finally:
            if not result.done():
                job.cancelled = True
                result.cancel()
                # Let the cancellation land (rows dropped, outcome counted) before the closer goes on: a reader that
                # stops a stream sees it counted as cancelled, not one loop turn later.
                await asyncio.wait({result})

    # ---- event-loop side -------------------------------------------------------------------------------------
    def _submit(self, prepared: PreparedRequest, streaming: bool) -> _Job:
        request = prepared.request
        seeds = row_seeds(base_seed(request.knobs), request.knobs.n, request.best_of)
        loop = asyncio.get_running_loop()
        job = _Job(request, list(prepared.prompt_ids), seeds, loop, loop.create_future(),
                   asyncio.Event() if streaming else None)
        if self._thread is None:
            raise RuntimeError("engine not started")
        if self._closing:
            self.telemetry.finished(request, "shutdown")
            raise ShuttingDown(RESTARTING)
        try:
            # Fair shares by who asked (the adapters' user key). Requests nobody is named for are the operator's own
            # (evaluation, --check, scripts): they share one queue, held to queue_size only.
            self._queue.put(request.user or "internal", job, request.rows, request.knobs.max_length - len(job.prompt_ids),
                            capped=bool(request.user))
        except (QueueFull, UserQueueFull) as exc:
            self.telemetry.finished(request, "busy")
            raise busy_error(exc) from None
        self._jobs.add(job)
        job.future.add_done_callback(lambda _: self._jobs.discard(job))
        return job

    async def _await(self, job: _Job) -> Generation:
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), self.limits.request_timeout_s)
        except TimeoutError:
            self._abandon(job)
            self._finished(job, "timeout")
            raise timed_out(self.limits.request_timeout_s) from None
        except asyncio.CancelledError:
            self._abandon(job)
            self._finished(job, "cancelled")
            raise
        except Exception as exc:
            self._finished(job, outcome_of(exc))
            raise
        self._finished(job, "ok")
        return result

    def _abandon(self, job: _Job) -> None:
        """Nobody waits for `job` any more: the worker drops its rows, and it no longer counts as in flight (a drain
        would wait for it, and an error set on its future later would be logged as never retrieved)."""
        job.cancelled = True
        job.future.cancel()
        self._jobs.discard(job)
        self._queue.remove(job)  # a waiting job leaves the queue (and its user's share) at once

    def _finished(self, job: _Job, outcome: str) -> None:
        # Tokens of a timed-out or cancelled job were computed too; the worker only appends, so reading is safe.
        tokens = sum(map(len, job.generated))
        self.telemetry.finished(job.request, outcome, time.monotonic() - job.started, tokens)

    # ---- worker thread ---------------------------------------------------------------------------------------
    def _result(self, job: _Job, done: bool) -> Generation:
        chosen, confidence = job.picks if done and job.picks else (list(range(len(job.generated))), None)
        generated = [list(job.generated[i]) for i in chosen]  # a snapshot: the worker may be appending
        if done:
            texts: Sequence[str] = tuple(self._continuation(job, ids) for ids in generated)
        else:  # a partial: most are dropped by the reader's throttle, so decode only the ones it reads
            texts = _Decoded(lambda: tuple(self._continuation(job, ids) for ids in generated), len(generated))
        seeds = tuple(job.seeds[i] for i in chosen)  # each pick's own seed reproduces it with best_of=1
        ends = tuple(("stop" if job.stopped[i] else "length") if job.finished[i] else None for i in chosen)
        scored = None
        if job.request.logprobs is not None:
            scored = tuple(tuple(job.token_logprobs[i][: len(generated[k]) + (ends[k] == "stop")])
                           for k, i in enumerate(chosen))
        return Generation(job.request, texts, seeds, sum(map(len, job.generated)), done, confidence,
                          tuple(map(tuple, generated)), ends, scored, job.prompt_logprobs)

    def _rerank(self, jobs: list[_Job]) -> None:
        """Pick the best of each group of `best_of` rows by the label score, for every job that finished this step:
        one batched forward pass scores every candidate after the other label's prompt (its own label's side was
        summed while decoding)."""
        contexts, continuations = [], []
        for job in jobs:
            request = job.request
            other = replace(request, label=NEGATIVE if request.label == POSITIVE else POSITIVE).model_prompt
            other_ids = self.tokenizer(other, add_special_tokens=False)["input_ids"]
            for ids, stop in zip(job.generated, job.stopped):
                contexts.append(other_ids)
                continuations.append(ids + [self.eos_id] * stop)
        others = iter(rerank.continuation_logprobs(self.model, contexts, continuations))
        for job in jobs:
            scores = [own - next(others) for own in job.own_logprobs]
            chosen = rerank.pick_best(scores, job.request.knobs.n, self.accept)
            job.picks = chosen, tuple(rerank.confidence(scores[i]) for i in chosen)

    def _continuation(self, job: _Job, new_ids: list[int]) -> str:
        # Decode with the prompt so subword joins and spaces come out right, then cut the prompt off.
        if job.prompt_text is None:
            job.prompt_text = self.tokenizer.decode(job.prompt_ids, skip_special_tokens=True)
        full = self.tokenizer.decode(job.prompt_ids + new_ids, skip_special_tokens=True)
        if full.startswith(job.prompt_text):
            return full[len(job.prompt_text):]
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def _publish(self, job: _Job, done: bool) -> None:
        # Only the final result is decoded here; a stream decodes a partial when its reader asks for one.
        if done:
            job.loop.call_soon_threadsafe(_set_result, job.future, self._result(job, True))
        elif job.changed is not None:
            job.loop.call_soon_threadsafe(job.changed.set)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        job.loop.call_soon_threadsafe(_set_exception, job.future, exc)

    def _run(self) -> None:
        # OpenMP's thread count is per calling thread: set it where the model runs. threads = 0 on a CPU: measured.
        threads = self.settings.model.threads
        if threads or device_of(self.model).type != "cpu":
            candidates: tuple[int, ...] = (threads or usable_cpus(),)
        else:
            candidates = candidates_for(usable_cpus())
        torch.set_num_threads(candidates[0])
        tuner = ThreadTuner(candidates, torch.set_num_threads)
        batch = self._new_batch()
        rows: list[_Row] = []
        while not (self._stopping.is_set() and not rows and not len(self._queue)):
            try:
                new_jobs = self._admit(rows)
                if new_jobs:
                    tuner.settle(len(rows) + sum(job.request.rows for job in new_jobs))
                    rows.extend(self._prefill_jobs(new_jobs, batch, len(rows)))
                rows = self._retire(rows, batch)
                if not rows:
                    continue
                self.telemetry.batch(len(rows))
                saved = batch.snapshot()
                try:
                    logits = tuner.run(len(rows), batch.step, [row.tokens[-1] for row in rows])
                except Exception as exc:  # noqa: BLE001
                    batch.restore(saved)
                    rows = self._fail_culprits(rows, batch, exc)
                    continue
                self._advance(rows, logits)
                rows = self._retire(rows, batch)
            except Exception as exc:  # a failure no single request is to blame for fails those in flight, never the worker
                log.exception("generation failed for %d rows", len(rows))
                for job in {row.job for row in rows}:
                    self._fail(job, exc)
                rows = []
                batch = self._new_batch()

    def _new_batch(self) -> Batch:
        """The running batch: GPT-2 on a CPU through the engine's own decode path (core/gpt2_decode.py), anything
        else (another device, a wrapped or different model) through transformers' forward."""
        return decode_batch(self.model, self.limits.max_batch_size) or _Batch(self.model)

    def _prefill_jobs(self, jobs: list[_Job], batch: Batch, active: int) -> list[_Row]:
        """Prefill the newly admitted jobs in one forward pass; if that fails, one by one so only the culprit fails."""
        # Rows of one length side by side: each run of them shares one attention call (core.speedups, per-row keys).
        jobs = sorted(jobs, key=lambda job: len(job.prompt_ids))
        if len(jobs) > 1:
            try:
                logits = batch.prefill([job.prompt_ids for job in jobs], [job.request.rows for job in jobs])
            except Exception:  # noqa: BLE001 (retried one by one below, where the error is reported)
                log.warning("batched prefill of %d requests failed; prefilling one by one", len(jobs))
            else:
                return self._start(jobs, logits)
        rows: list[_Row] = []
        for job in jobs:
            rows.extend(self._prefill_alone(job, batch, active + len(rows)))
        return rows

    def _prefill_alone(self, job: _Job, batch: Batch, active: int) -> list[_Row]:
        """Prefill one job; if that fails, only this job fails and the batch is left as it was."""
        try:
            return self._prefill(job, batch)
        except Exception as exc:
            log.exception("prefill failed for one request (%d prompt tokens)", len(job.prompt_ids))
            if len(batch.positions) > active:
                batch.select(list(range(active)))
            self._fail(job, exc)
            return []

    def _fail_culprits(self, rows: list[_Row], batch: Batch, exc: Exception) -> list[_Row]:
        """A batched step failed: step each job's rows alone on a throw-away copy and fail only the jobs that fail
        alone. When every job passes alone, the batch as a whole is to blame and the error goes up."""
        jobs = list(dict.fromkeys(row.job for row in rows))
        culprits = []
        for job in jobs:
            index = [i for i, row in enumerate(rows) if row.job is job]
            probe = batch.copy()
            try:
                probe.select(index)
                probe.step([rows[i].tokens[-1] for i in index])
            except Exception:  # noqa: BLE001 (whatever it is, it is this job's)
                culprits.append(job)
        if not culprits:
            raise exc
        log.error("generation step failed for %d of %d requests, the others go on: %r", len(culprits), len(jobs), exc)
        for job in culprits:
            self._fail(job, exc)
            job.cancelled = True
        return self._retire(rows, batch)

    def _admit(self, rows: list[_Row]) -> list[_Job]:
        """Take waiting jobs that fit the batch, fairly across users; wait a short window for company when idle."""
        if not rows:
            if not self._queue.wait(0.1):
                if self._worked:  # idle after work: what it freed goes back to the OS (~100 MB after a burst)
                    return_freed_memory()
                    self._worked = False
                return []
            self._queue.gather(self.limits.batch_window_ms / 1000, QUIET_S, self.limits.max_batch_size)
        remaining = [row.job.request.knobs.max_length - len(row.tokens) for row in rows]
        jobs = self._queue.take(self.limits.max_batch_size - len(rows), remaining)
        self._worked = self._worked or bool(jobs)
        return [job for job in jobs if not job.cancelled]

    def _prefill(self, job: _Job, batch: Batch) -> list[_Row]:
        return self._start([job], batch.prefill([job.prompt_ids], [job.request.rows]))

    def _start(self, jobs: list[_Job], logits: torch.Tensor) -> list[_Row]:
        """One row per candidate, each with its own seeded generator, and their first tokens from `logits`."""
        rows = []
        for job in jobs:
            n = job.request.rows
            job.generated = [[] for _ in range(n)]
            job.finished = [False] * n
            job.stopped = [False] * n
            job.own_logprobs = [0.0] * n
            job.token_logprobs = [[] for _ in range(n)]
            if job.request.prompt_logprobs is not None:
                try:
                    job.prompt_logprobs = logprobs.prompt_logprobs(self.model, job.prompt_ids,
                                                                   job.request.prompt_logprobs)
                except Exception as exc:  # this job alone fails; the others start
                    log.exception("scoring a prompt of %d tokens failed", len(job.prompt_ids))
                    self._fail(job, exc)
                    job.cancelled = True
            for candidate, seed in enumerate(job.seeds):
                rows.append(_Row(job, candidate, list(job.prompt_ids), torch.Generator().manual_seed(seed),
                                 History(job.prompt_ids, job.request.knobs.no_repeat_ngram_size)))
        self._advance(rows, logits)
        return rows

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Apply each row's rules to its next-token logits, sample, and record the token; rerank and answer every
        job this step finished."""
        knobs = [row.job.request.knobs for row in rows]
        tokens = next_tokens([row.history for row in rows], logits, knobs, [row.generator for row in rows], self.eos_id)
        self._add_own_logprobs(rows, logits, tokens)
        if wanted := [i for i, row in enumerate(rows) if row.job.request.logprobs is not None]:
            rows_logits = logits if len(wanted) == len(rows) else logits[torch.tensor(wanted)]
            scored = logprobs.token_logprobs(rows_logits, [tokens[i] for i in wanted],
                                             [rows[i].job.request.logprobs for i in wanted])
            for i, entry in zip(wanted, scored):
                rows[i].job.token_logprobs[rows[i].candidate].append(entry)
        touched: dict[_Job, None] = {}
        for row, token in zip(rows, tokens):
            job = row.job
            touched[job] = None
            if token == self.eos_id:
                job.finished[row.candidate] = True
                job.stopped[row.candidate] = True
                continue
            row.tokens.append(token)
            row.history.append(token)
            job.generated[row.candidate].append(token)
            if len(row.tokens) >= job.request.knobs.max_length:
                job.finished[row.candidate] = True
        done = {job for job in touched if all(job.finished) and not job.cancelled}
        if reranked := [job for job in touched if job in done and job.request.best_of > 1]:
            try:
                self._rerank(reranked)  # the worker's call: the model is its own
            except Exception as exc:  # only the jobs being scored fail; the batch goes on
                log.exception("scoring %d finished requests for best_of failed", len(reranked))
                for job in reranked:
                    self._fail(job, exc)
                    job.cancelled = True
        for job in touched:
            # A rerank's pick is known only at the end, so best_of > 1 publishes no partial text.
            if not job.cancelled and (job in done or job.request.best_of == 1):
                self._publish(job, job in done)

    def _add_own_logprobs(self, rows: list[_Row], logits: torch.Tensor, tokens: list[int]) -> None:
        """Add log p(token) under the model's own (unwarped) distribution to each reranked row's running total."""
        scored = [i for i, row in enumerate(rows) if row.job.request.best_of > 1]
        if not scored:
            return
        chosen = torch.tensor([tokens[i] for i in scored])[:, None]
        picked = (logits if len(scored) == len(rows) else logits[torch.tensor(scored)]).float()  # every row: no copy
        values = (picked.gather(1, chosen)[:, 0] - picked.logsumexp(dim=-1)).tolist()
        for i, value in zip(scored, values):
            rows[i].job.own_logprobs[rows[i].candidate] += value

    def _retire(self, rows: list[_Row], batch: Batch) -> list[_Row]:
        keep = [i for i, row in enumerate(rows) if not row.job.finished[row.candidate] and not row.job.cancelled]
        if len(keep) != len(rows):
            batch.select(keep)
        return [rows[i] for i in keep]


def busy_error(exc: QueueFull | UserQueueFull) -> BusyError:
    """The refusal's sentence: the whole queue is full, or this user's own share of it."""
    if isinstance(exc, UserQueueFull):
        return BusyError(
            f"이미 기다리는 요청이 너무 많습니다 (사용자당 대기 {exc.cap}줄까지). 앞의 요청이 끝난 뒤 다시 시도해 주세요. "
            f"(busy: at most {exc.cap} rows per user may wait; try again when your earlier requests are done)"
        )
    return BusyError(BUSY)



async def start_engine(settings: Settings) -> Engine:
    """Load the model off the event loop's thread and start the engine: how every program should get one.

    The event loop's thread is kept to one OpenMP thread: it does no tensor work, and an OpenMP team on the process's
    initial thread slowed the engine's own team by about a third here (9 vs 14 ms per int8 token on 2 cores).
    """
    from core.model_loading import load_model

    torch.set_num_threads(1)
    loaded = await asyncio.to_thread(load_model, settings.model)
    engine = Engine(loaded, settings)
    engine.start()
    return engine


class _Batch:
    """The running batch's KV cache, left-padded to a common length, with each row's attention mask and position.

    Tensors live on the model's device; logits come back as float32 on the CPU, where every row's processors and
    seeded generator run, so a seed gives the same choice of token whatever the device's batch looked like."""

    def __init__(self, model: torch.nn.Module):
        self.model = as_transformers(model)  # core.gpt2_model's tree, wrapped: transformers' forward and cache
        self.device = device_of(model)
        self.cache_arg = _cache_argument()
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.positions: list[int] = []
        # The cache steps write into, built from `layers` at the first step after they were replaced (prefill, select,
        # restore); between those, each step only adds a column to it and `layers` views its buffers.
        self.cache: Cache | None = None

    def _forward(self, cache: Cache | None, **inputs: object) -> tuple[torch.Tensor, Cache]:
        out = self.model(**inputs, **({self.cache_arg: cache} if cache is not None else {}), use_cache=True)
        return out.logits[:, -1], out[self.cache_arg]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], copies: list[int]) -> torch.Tensor:
        """Run new prompts together (left-padded) and append each `copies` times; returns their next-token logits."""
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits, cache = self._forward(
            None,
            input_ids=ids,
            attention_mask=None if bool(mask.all()) else mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            logits_to_keep=1,
        )
        counts = torch.tensor(copies, device=self.device)
        self._append(
            [(k.repeat_interleave(counts, 0), v.repeat_interleave(counts, 0)) for k, v in _layers_of(cache)],
            mask.repeat_interleave(counts, 0),
        )
        self.positions.extend(len(prompt) for prompt, n in zip(prompts, copies) for _ in range(n))
        return logits.repeat_interleave(counts, 0).float().cpu()

    def snapshot(self) -> tuple:
        """The state `step` replaces, to undo a failed step: a step writes only past the columns these views show."""
        return list(self.layers), self.mask, list(self.positions)

    def restore(self, saved: tuple) -> None:
        self.layers, self.mask, self.positions = list(saved[0]), saved[1], list(saved[2])
        self.cache = None

    def copy(self) -> _Batch:
        other = _Batch(self.model)
        other.restore(self.snapshot())
        return other

    def _append(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        self.cache = None
        if not self.layers:
            self.layers, self.mask = [(k.contiguous(), v.contiguous()) for k, v in layers], mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.layers = [
            (torch.cat([_pad_left(k0, width), _pad_left(k1, width)]), torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
            for (k0, v0), (k1, v1) in zip(self.layers, layers)
        ]
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])

    @torch.inference_mode()
    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed each row its last token; returns next-token logits, one row each."""
        if self.cache is None:
            from core.kv_cache import growing_cache

            self.cache = growing_cache(self.layers)
        self.mask = torch.cat([self.mask, torch.ones(len(last_tokens), 1, dtype=torch.long, device=self.device)], dim=1)
        logits, _ = self._forward(
            self.cache,
            input_ids=torch.tensor(last_tokens, device=self.device)[:, None],
            # Without padding no mask is needed, and attention takes its faster unmasked path.
            attention_mask=None if bool(self.mask.all()) else self.mask,
            position_ids=torch.tensor(self.positions, device=self.device)[:, None],
        )
        self.layers = _layers_of(self.cache)
        self.positions = [p + 1 for p in self.positions]
        return logits.float().cpu()

    def select(self, keep: list[int]) -> None:
        """Drop finished rows, then the left columns that are padding for every row still running."""
        if not keep:
            self.__init__(self.model)
            return
        index = torch.tensor(keep, device=self.device)
        self.cache = None
        self.mask = self.mask.index_select(0, index)
        self.positions = [self.positions[i] for i in keep]
        start = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, start:]
        self.layers = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.layers]


Batch = DecodeBatch | _Batch  # the running batch: prefill, step, select, snapshot/restore, copy, positions


def _cache_argument() -> str:
    """The KV cache's name in GPT-2's forward and outputs: `past_key_values` up to transformers 5.2x, `cache` after
    (where `past_key_values` still works, with a deprecation warning). Both are public API in their versions. Read
    from the installed transformers' GPT-2 class, so a model wrapped in another module gets the same answer (imported
    here: only a batch over transformers' forward needs it)."""
    from transformers import GPT2LMHeadModel

    return "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


def _layers_of(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values, as the public `Cache.layers` (every 5.x release) holds them."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence axis (dim 2 of a KV tensor, dim 1 of a mask) with zeros to `width`."""
    axis = 2 if t.dim() == 4 else 1
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


class _Decoded(Sequence[str]):
    """A partial Generation's continuations, decoded when first read (by the reply that shows it)."""

    def __init__(self, decode: Callable[[], tuple[str, ...]], count: int):
        self._decode, self._count, self._texts = decode, count, None

    def _get(self) -> tuple[str, ...]:
        if self._texts is None:
            self._texts = self._decode()
        return self._texts

    def __getitem__(self, index):  # noqa: ANN001
        return self._get()[index]

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    __hash__ = None


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
