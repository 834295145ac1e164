"""The neutral types every room shares: what a user asked for and what the model produced. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from core.knobs import Knobs

POSITIVE, NEGATIVE = "긍정", "부정"


@dataclass(frozen=True)
class GenRequest:
    label: str | None
    prompt: str
    knobs: Knobs
    # Where it came from ("telegram:123", "discord:456", "web"; "" = internal): metrics and logs count by it.
    origin: str = ""
    model: str = ""  # which configured model generates it (core.models); "" = the default
    # Who asked ("telegram:42", "web:203.0.113.7"; "" = internal): the engine shares its rows fairly by this key.
    user: str = ""
    # The engine node's log-probabilities (None: not asked): each sampled token's, with this many top alternatives;
    # and the prompt tokens', with this many alternatives.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def model_prompt(self) -> str:
        """What the model sees: `label + " " + prompt`, as in training."""
        return " ".join(part for part in (self.label, self.prompt) if part)

    @property
    def best_of(self) -> int:
        """Candidates sampled per result: a rerank needs a label to aim at, so without one it is 1."""
        return self.knobs.best_of if self.label else 1

    @property
    def rows(self) -> int:
        """Sequences sampled for this request: n results, each the best of `best_of`."""
        return self.knobs.n * self.best_of


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's own distribution (raw logits, before any sampling knob), its rank
    there (1 = most likely), and the `top` most likely tokens at that position as (id, log-probability)."""

    token: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    """What a request produced: one continuation per candidate, and the seeds that reproduce them."""

    request: GenRequest
    continuations: tuple[str, ...]
    seeds: tuple[int, ...]
    new_tokens: int
    done: bool = True
    # With a label: per result, how surely the model reads it as that label, P(label | text) from the rerank score.
    confidence: tuple[float, ...] | None = None
    # Per result: its new token ids (the end-of-text token not among them), and why it ended: "stop" (the model's
    # end-of-text token), "length" (max_length), None while still running.
    token_ids: tuple[tuple[int, ...], ...] = ()
    finish_reasons: tuple[str | None, ...] = ()
    # Only when the request asked: per result, one entry per sampled token (an ending end-of-text token included);
    # and the prompt's tokens from the second on.
    logprobs: tuple[tuple[TokenLogprob, ...], ...] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    def texts(self) -> tuple[str, ...]:
        """The model prompt followed by each continuation (the tutorial's `result`)."""
        return tuple(self.request.model_prompt + c for c in self.continuations)


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked against the limits and tokenized once; what a generation backend's generate/stream take."""

    request: GenRequest
    prompt_ids: tuple[int, ...]
    continuing: bool = False  # the prompt is the bot's own earlier output (held to max_length, not the prompt cap)
