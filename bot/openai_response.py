"""The engine node's answer: choices, `logprobs` and `usage` in vLLM's fields, from the engine's own record of each
generation (its token ids, why each candidate ended, and its log-probabilities)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.openai_request import Completion
from core.service import BotCore
from core.types import Generation, PreparedRequest, TokenLogprob

LOGPROB_FLOOR = -9999.0  # what vLLM sends for -inf (JSON has no infinity)


def _floor(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class Tokens:
    """Token ids → the strings `logprobs.tokens` shows (the token decoded, or `token_id:N` when asked)."""

    def __init__(self, core: BotCore, as_ids: bool):
        self.tokenizer, self.as_ids = core.engine.tokenizer, as_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.as_ids else self.tokenizer.decode([token])


def logprobs_block(positions: Sequence[tuple[int, TokenLogprob | None]], top: int, text: Callable[[int], str],
                   offset: int = 0) -> dict:
    """OpenAI's `logprobs` object for these (token, entry) positions: each token, its log-probability (None for a
    prompt's first token), its `top` alternatives with the token itself first, and where its text starts."""
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token, entry in positions:
        shown = text(token)
        out["text_offset"].append(offset)
        out["tokens"].append(shown)
        offset += len(shown)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_floor(entry.logprob))
        alternatives = {shown: _floor(entry.logprob)}
        for other, value in entry.top[:top]:
            alternatives.setdefault(text(other), _floor(value))
        out["top_logprobs"].append(alternatives)
    return out


def _prompt_logprobs(entries: Sequence[TokenLogprob], top: int, text: Callable[[int], str]) -> list:
    """vLLM's `prompt_logprobs`: None for the first token, then {token id: {logprob, rank, decoded_token}} with the
    prompt's own token and its `top` alternatives."""
    out: list = [None]
    for entry in entries:
        position = {entry.token: {"logprob": _floor(entry.logprob), "rank": entry.rank, "decoded_token": text(entry.token)}}
        for rank, (other, value) in enumerate(entry.top[:top], 1):
            position.setdefault(other, {"logprob": _floor(value), "rank": rank, "decoded_token": text(other)})
        out.append({str(token): value for token, value in position.items()})
    return out


def prompt_positions(prepared: PreparedRequest, gen: Generation) -> list[tuple[int, TokenLogprob | None]]:
    ids = prepared.prompt_ids
    return [(ids[0], None), *((e.token, e) for e in (gen.prompt_logprobs or ()))]


def sampled_positions(gen: Generation, i: int) -> list[tuple[int, TokenLogprob | None]]:
    return [(e.token, e) for e in (gen.logprobs[i] if gen.logprobs else ())]


def choices(completion: Completion, gens: Sequence[Generation], core: BotCore) -> tuple[list[dict], int]:
    """The non-streamed choices (prompt p's i-th completion at index p × n + i) and the completion tokens."""
    text = Tokens(core, completion.as_ids)
    out, counted = [], 0
    for prepared, prompt_text, gen in zip(completion.prepared, completion.texts, gens):
        counted += 0 if completion.scoring_only else new_tokens(gen)
        for i, continuation in enumerate(gen.continuations):
            tokens = () if completion.scoring_only or not gen.token_ids else gen.token_ids[i]
            choice = {"index": len(out), "text": continuation, "logprobs": None,
                      "finish_reason": "length" if completion.scoring_only else finish_reason(gen, i),
                      "stop_reason": None}
            positions = [] if completion.scoring_only else sampled_positions(gen, i)
            if completion.echo:
                choice["text"] = prompt_text + ("" if completion.scoring_only else continuation)
                positions = prompt_positions(prepared, gen) + positions
            if completion.logprobs is not None:
                choice["logprobs"] = logprobs_block(positions, completion.logprobs, text)
            if completion.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _prompt_logprobs(gen.prompt_logprobs or (), completion.prompt_logprobs, text)
            if completion.token_ids:
                choice["prompt_token_ids"] = list(prepared.prompt_ids)
                ended = finish_reason(gen, i) == "stop" and not completion.scoring_only
                choice["token_ids"] = [*tokens, *((core.engine.eos_id,) if ended else ())]
            out.append(choice)
    return out, counted


def finish_reason(gen: Generation, i: int) -> str | None:
    """Why result i ended, as the backend says ("stop" or "length"); None where a backend does not say."""
    return gen.finish_reasons[i] if i < len(gen.finish_reasons) else None


def new_tokens(gen: Generation) -> int:
    """The results' new tokens, the end-of-text token not counted (the engine's count where it gives no ids)."""
    return sum(map(len, gen.token_ids)) if gen.token_ids else gen.new_tokens


def usage(prompt_tokens: int, new_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens, "total_tokens": prompt_tokens + new_tokens}
