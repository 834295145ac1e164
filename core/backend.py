"""The one contract every generation backend keeps, and what the backends share. No torch here.

`BotCore`, the conversation and the adapters use a backend only through `Backend`; the local engine
(`core/engine.py`) and the remote one (`core/remote_engine.py`, an OpenAI/vLLM server or another bot's engine node)
both implement it, and `tests/test_backend_contract.py` runs the same tests against each.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, Protocol, runtime_checkable

from core.errors import BusyError, EngineUnavailable, RequestTimeout, ShuttingDown, UserError
from core.knobs import SEED_MAX, Knobs
from core.settings import LimitsSettings
from core.telemetry import Telemetry
from core.types import Generation, GenRequest, PreparedRequest

RESTARTING = "봇이 다시 시작하는 중입니다. 잠시 후 다시 시도해 주세요. (the bot is restarting, try again shortly)"
BUSY = "지금 요청이 너무 많습니다. 잠시 후 다시 시도해 주세요. (busy: too many requests, try again shortly)"

# The golden-ratio constant: candidates' seeds spread apart.
SEED_STRIDE = 0x9E3779B97F4A7C15 % (SEED_MAX + 1)


@runtime_checkable
class Backend(Protocol):
    """What front ends may use of a generation backend."""

    backend: str  # "local" or "openai": /healthz and the logs name it
    source: str  # where the model comes from (a directory, a hub id, a server), for the start-up line
    sentiment: bool  # whether the label words steer the model (/help warns when not)
    defaults: Knobs  # the knobs a request starts from
    limits: LimitsSettings
    telemetry: Telemetry  # every request's end is counted and logged here
    tokenizer: Any  # the model's tokenizer (prompt lengths count its tokens)

    @property
    def notice(self) -> str:
        """"" or one sentence /help and /healthz show: something the backend cannot do here (e.g. best_of)."""
        ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def saturated(self) -> bool:
        """Whether a new request would now be refused as busy (/healthz says "saturated")."""
        ...

    def start(self) -> None: ...

    def prepare(self, request: GenRequest, continuing: bool = False) -> PreparedRequest:
        """Check against the limits and tokenize once; a UserError says what does not fit."""
        ...

    async def generate(self, prepared: PreparedRequest | GenRequest) -> Generation:
        """Every candidate; raises a UserError (BusyError, RequestTimeout, ShuttingDown, EngineUnavailable)."""
        ...

    def stream(self, prepared: PreparedRequest) -> AsyncIterator[Generation]:
        """The text so far (`done=False`) as it grows, then the final Generation (`done=True`)."""
        ...

    async def health(self) -> dict:
        """For /healthz: at least `backend` and `ok`; never slow (a remote answers from a cached probe)."""
        ...

    async def drain(self, grace: float) -> int:
        """Refuse new requests, let those in flight finish for `grace` s, fail the rest with RESTARTING; how many."""
        ...

    async def stop(self) -> None: ...


def base_seed(knobs: Knobs) -> int:
    """The request's seed, or a fresh random one (reported back, so the result can be reproduced)."""
    return knobs.seed if knobs.seed is not None else secrets.randbelow(SEED_MAX)


def row_seeds(base: int, n: int, best_of: int) -> list[int]:
    """The seed of every sampled row: result g's first candidate is `base + g` (what best_of=1 samples, so best_of
    only replaces replies the model reads as off-label), its other candidates lie far away on a fixed stride, so
    requests with neighbouring seeds (seed=1, seed=2 …) do not share candidates."""
    return [(base + g + j * SEED_STRIDE) % (SEED_MAX + 1) for g in range(n) for j in range(best_of)]


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label of bot_requests_total for how a request ended (None: it succeeded)."""
    if exc is None:
        return "ok"
    for kind, outcome in ((RequestTimeout, "timeout"), (ShuttingDown, "shutdown"), (BusyError, "busy"),
                          (EngineUnavailable, "error"), (UserError, "user_error"),
                          (asyncio.CancelledError, "cancelled"), (GeneratorExit, "cancelled")):
        if isinstance(exc, kind):
            return outcome
    return "error"


def timed_out(seconds: float) -> RequestTimeout:
    return RequestTimeout(
        f"생성이 {seconds:g}초 안에 끝나지 않았습니다. 더 짧게(max_length) 다시 시도해 주세요. (generation timed out)"
    )


async def wait_pending(pending: Iterable[Awaitable], grace: float) -> None:
    """The drain's wait: up to `grace` s for whatever is still in flight."""
    waiting = [asyncio.ensure_future(p) for p in pending]
    if waiting and grace > 0:
        await asyncio.wait(waiting, timeout=grace)
