"""Where a request's end is recorded: the Prometheus series and the per-request log line, always together."""

from __future__ import annotations

from collections.abc import Callable

from core.grammar import GenRequest
from core.metrics import Metrics
from core.request_log import log_request


class Telemetry:
    def __init__(self, queue_depth: Callable[[], int]):
        self.metrics = Metrics(queue_depth)

    def finished(self, request: GenRequest, outcome: str, seconds: float | None = None, new_tokens: int = 0) -> None:
        """A request the engine saw: ok, busy, timeout, error, cancelled, or a prompt the engine refused."""
        self.metrics.observe(request.origin, outcome, seconds, new_tokens)
        log_request(request.origin, outcome, request.knobs, seconds, new_tokens, request.model_prompt)

    def refused(self, origin: str, outcome: str) -> None:
        """A request turned away before it became a GenRequest (bad input, rate limit): no knobs, no latency."""
        self.metrics.observe(origin, outcome)
        log_request(origin, outcome)

    def batch(self, rows: int) -> None:
        self.metrics.observe_batch(rows)
