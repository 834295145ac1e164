"""Prometheus series for the generation service, in a registry owned by one engine (no process-wide globals).

Every request that reaches the core is counted once, by front end and outcome:

- ok, timeout, error, cancelled: the engine accepted it; counted when it finishes, with its latency and tokens;
- busy: the engine's queue was full;
- user_error: refused before generating (bad knob, empty or too long prompt, malformed web body): it never
  reaches the model, so it has no latency and no tokens;
- rate_limited: the per-user spacing of the chat bots refused it;
- quota: the user's daily request quota (`limits.daily_requests_per_user`) is used up;
- not_allowed: outside the allowlists (counted for generation requests);
- shutdown: refused, or cut off after the grace period, because the bot is stopping.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("ok", "user_error", "rate_limited", "quota", "not_allowed", "busy", "timeout", "error", "cancelled", "shutdown")
FRONT_ENDS = ("web", "telegram", "discord", "openai", "internal")  # openai: the engine-node API (/v1)
# CPU generation of up to 128 tokens: tens of milliseconds to about a minute (the default request timeout).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def front_end_of(origin: str) -> str:
    """`telegram:123` → `telegram`; anything unknown is `internal`, so a label can never grow without bound."""
    name = origin.partition(":")[0]
    return name if name in FRONT_ENDS else "internal"


class Metrics:
    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bot_requests", "Generation requests by front end and outcome", ("frontend", "outcome"), registry=self.registry
        )
        self.latency = Histogram(
            "bot_generation_seconds", "Time from admission to the last token, for requests the engine accepted",
            ("frontend",), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter("bot_generated_tokens", "New tokens generated", ("frontend",), registry=self.registry)
        self.batch = Histogram(
            "bot_batch_size", "Rows decoded together per engine step", buckets=BATCH_BUCKETS, registry=self.registry
        )
        queue = Gauge("bot_queue_depth", "Requests waiting for the engine", registry=self.registry)
        queue.set_function(queue_depth)  # read at scrape time, so it is never stale
        # Pre-create every series at 0: dashboards and rate() see them before the first request of each kind.
        for front in FRONT_ENDS:
            self.tokens.labels(front)
            self.latency.labels(front)
            for outcome in OUTCOMES:
                self.requests.labels(front, outcome)

    def observe(self, origin: str, outcome: str, seconds: float | None = None, tokens: int = 0) -> None:
        front = front_end_of(origin)
        self.requests.labels(front, outcome).inc()
        if seconds is not None:
            self.latency.labels(front).observe(seconds)
        if tokens:
            self.tokens.labels(front).inc(tokens)

    def observe_batch(self, rows: int) -> None:
        self.batch.observe(rows)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
