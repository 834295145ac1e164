"""A scripted generation backend and a collecting reply target: `Conversation` unit tests run without a model.

`FakeBackend` implements what the conversation uses of a backend (`prepare`, `stream`, `generate`, `defaults`,
`limits`, `telemetry`): one token per word, the real prompt-length rules, and a stream that writes one word per step
and moves a fake clock by `step_s`. `Collecting` is a `ReplyTarget` that records every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from core.chat_store import ChatStore
from core.conversation import Reply, Style
from core.followups import FollowUps
from core.knobs import default_knobs
from core.prompt_rules import check_prompt_ids
from core.rate_limit import UserRateLimiter
from core.service import BotCore
from core.settings import Settings
from core.telemetry import Telemetry
from core.types import Generation, GenRequest, PreparedRequest

WORDS = ("하나", "둘", "셋", "넷", "다섯", "여섯", "일곱", "여덟", "아홉", "열")


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeBackend:
    backend = "fake"

    def __init__(self, settings: Settings, clock: FakeClock, step_s: float = 0.25, words: tuple[str, ...] = WORDS):
        self.limits = settings.limits
        self.defaults = default_knobs(settings.generation)
        self.telemetry = Telemetry(lambda: 0)
        self.clock, self.step_s, self.words = clock, step_s, words
        self.error: BaseException | None = None  # raised by the stream before step `fail_at`
        self.fail_at = 0
        self.prepared: list[PreparedRequest] = []
        self.closed = 0  # streams closed (finished, failed or left early)
        # The stream waits for `hold` before step `hold_at`, having set `holding` (a read the reply loop waits on).
        self.hold_at = 0
        self.hold, self.holding = asyncio.Event(), asyncio.Event()
        self.final = True  # False: the stream ends without a finished state (a backend that breaks its contract)
        self.per_byte = False  # one token per byte of the prompt (the most tokens a text can have) instead of per word

    def prepare(self, request: GenRequest, continuing: bool = False) -> PreparedRequest:
        parts = request.model_prompt.encode() if self.per_byte else request.model_prompt.split()
        ids = [5 + i for i, _ in enumerate(parts)]
        prepared = PreparedRequest(request, tuple(check_prompt_ids(ids, request, self.limits, continuing)), continuing)
        self.prepared.append(prepared)
        return prepared

    def result(self, prepared: PreparedRequest, steps: int, done: bool) -> Generation:
        request = prepared.request
        text = "".join(" " + word for word in self.words[:steps])
        n = request.knobs.n
        return Generation(request, (text,) * n, tuple(range(100, 100 + n)), steps * n, done)

    async def stream(self, prepared: PreparedRequest) -> AsyncIterator[Generation]:
        try:
            for step in range(1, len(self.words) + 1):
                await asyncio.sleep(0)  # a real backend waits for its worker: other tasks (typing) run meanwhile
                if self.error is not None and step == self.fail_at:
                    raise self.error
                if step == self.hold_at:
                    self.holding.set()
                    await self.hold.wait()
                self.clock.advance(self.step_s)
                yield self.result(prepared, step, False)
            if self.final:
                yield self.result(prepared, len(self.words), True)
        finally:
            self.closed += 1

    async def generate(self, prepared: PreparedRequest) -> Generation:
        return self.result(prepared, len(self.words), True)


def fake_core(settings: Settings, clock: FakeClock, **backend: object) -> BotCore:
    """A BotCore over a FakeBackend, an in-memory store and a rate limiter on `clock`."""
    return BotCore(settings, FakeBackend(settings, clock, **backend), ChatStore(":memory:"),
                   UserRateLimiter(settings.limits.user_interval_s, clock=clock), FollowUps())


class Collecting:
    """A ReplyTarget that records what it is asked to show; `spare` answers from a function of the clock."""

    def __init__(self, edit_interval: float = 1.0, limit: int = 4096, spare: Callable[[], bool] = lambda: True):
        self.style = Style(limit, notice=lambda text: f"<{text}>")
        self.edit_interval = edit_interval
        self.calls: list[tuple[str, Reply]] = []
        self.typed = 0
        self._spare = spare
        self.fail_send: BaseException | None = None

    async def send(self, reply: Reply) -> None:
        if self.fail_send is not None:
            raise self.fail_send
        self.calls.append(("send", reply))

    async def edit(self, reply: Reply) -> None:
        self.calls.append(("edit", reply))

    async def typing(self) -> None:
        self.typed += 1

    def spare(self) -> bool:
        return self._spare()

    def shown(self) -> list[tuple[str, int | str]]:
        """Each call as (send/edit, the step it showed: its new-token count, or "error")."""
        return [(kind, "error" if reply.error else reply.generation.new_tokens) for kind, reply in self.calls]
