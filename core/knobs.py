"""The sampling knobs: names, aliases, allowed ranges, and the one validator every front end uses."""

from __future__ import annotations

import difflib
import functools
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Protocol

from core.errors import UserError


class KnobLimits(Protocol):
    """What the knob ranges depend on (core.settings.LimitsSettings provides it; knobs must not import settings,
    which validates its defaults with the knobs)."""

    max_length: int
    max_candidates: int
    max_best_of: int
    max_rows_per_request: int
    max_batch_size: int


class KnobDefaults(Protocol):
    """The server's default knobs (core.settings.GenerationSettings)."""

    def model_dump(self) -> dict[str, object]: ...

SEED_MAX = 2**53 - 1  # JavaScript's largest exact integer: a seed survives JSON, the web page and Discord
VOCAB_TOP_K_MAX = 51200  # KoGPT2's vocabulary; larger is the same as "no top-k"


@dataclass(frozen=True)
class Knobs:
    min_length: int
    max_length: int
    top_p: float
    top_k: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    temperature: float
    seed: int | None = None
    n: int = 1
    best_of: int = 1

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class KnobSpec:
    name: str
    kind: type  # int or float
    low: float
    high: float
    low_open: bool = False  # True: the value must be > low, not >= low
    aliases: tuple[str, ...] = ()
    help_ko: str = ""

    def range_ko(self) -> str:
        word = "정수" if self.kind is int else "실수"
        low = f"{_fmt(self.low)} {'초과' if self.low_open else '이상'}"
        return f"{low} {_fmt(self.high)} 이하의 {word}"

    def range_en(self) -> str:
        word = "an integer" if self.kind is int else "a number"
        return f"{word} {'>' if self.low_open else '≥'} {_fmt(self.low)} and ≤ {_fmt(self.high)}"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def knob_specs(limits: KnobLimits) -> Mapping[str, KnobSpec]:
    """Every knob a user may set, in display order; ranges depend on the server's limits (built once per set of
    limits: every /gen consults the table several times)."""
    return _knob_table(limits.max_length, limits.max_candidates, limits.max_best_of)


@functools.lru_cache(maxsize=16)
def _knob_table(cap: int, max_candidates: int, max_best_of: int) -> Mapping[str, KnobSpec]:
    specs = [
        KnobSpec("min_length", int, 1, cap, aliases=("min", "minlen", "min_len", "최소길이", "최소"),
                 help_ko="최소 길이 (프롬프트 포함 토큰 수)"),
        KnobSpec("max_length", int, 1, cap, aliases=("max", "maxlen", "max_len", "len", "length", "길이", "최대길이", "최대"),
                 help_ko="최대 길이 (프롬프트 포함 토큰 수)"),
        KnobSpec("top_p", float, 0, 1, low_open=True, aliases=("p", "topp", "nucleus"),
                 help_ko="누적 확률 상위 p 안에서만 샘플링"),
        KnobSpec("top_k", int, 1, VOCAB_TOP_K_MAX, aliases=("k", "topk"),
                 help_ko="확률 상위 k개 토큰 안에서만 샘플링 (1이면 탐욕적)"),
        KnobSpec("repetition_penalty", float, 1, 10, aliases=("rp", "rep", "penalty", "repeat_penalty", "repetition", "반복패널티", "반복"),
                 help_ko="이미 나온 토큰에 주는 벌점 (1이면 없음)"),
        KnobSpec("no_repeat_ngram_size", int, 0, 20, aliases=("ngram", "no_repeat", "no_repeat_ngram", "nrns"),
                 help_ko="이 길이의 n-gram 반복 금지 (0이면 끔)"),
        KnobSpec("temperature", float, 0, 10, low_open=True, aliases=("t", "temp", "온도"),
                 help_ko="온도: 낮을수록 보수적, 높을수록 다양함"),
        KnobSpec("seed", int, 0, SEED_MAX, aliases=("s", "시드"),
                 help_ko="난수 시드: 같은 seed와 같은 설정이면 같은 결과 (후보 하나는 그 seed에 n=1, best_of=1)"),
        KnobSpec("n", int, 1, max_candidates, aliases=("num", "count", "candidates", "num_return_sequences", "개수"),
                 help_ko="후보 개수"),
        KnobSpec("best_of", int, 1, max_best_of, aliases=("best", "bo", "rerank", "최선"),
                 help_ko="후보 k개를 만들어 라벨에 가장 맞는 것을 고름 (라벨이 있을 때만)"),
    ]
    return MappingProxyType({spec.name: spec for spec in specs})  # shared between calls: read-only


def _key_form(key: str) -> str:
    return unicodedata.normalize("NFKC", key).strip().lower().replace("-", "_")


def resolve_key(key: str, specs: Mapping[str, KnobSpec]) -> str:
    """The canonical knob name for `key` or an alias; an unknown key gets a "did you mean" error."""
    form = _key_form(key)
    for spec in specs.values():
        if form == spec.name or form in spec.aliases:
            return spec.name
    known = [name for spec in specs.values() for name in (spec.name, *spec.aliases)]
    close = difflib.get_close_matches(form, known, n=1, cutoff=0.6)
    names = ", ".join(specs)
    hint = ""
    if close:
        target = next(s.name for s in specs.values() if close[0] in (s.name, *s.aliases))
        hint = f" 혹시 '{target}'을(를) 말씀하셨나요? (did you mean '{target}'?)"
    raise UserError(
        f"알 수 없는 설정 '{_clip(key)}'입니다.{hint} 사용할 수 있는 설정: {names}. (unknown setting '{_clip(key)}')"
    )


_INT_RE = re.compile(r"[+-]?\d{1,40}", re.ASCII)
_FLOAT_RE = re.compile(r"[+-]?(?:\d{1,40}(?:\.\d{0,40})?|\.\d{1,40})(?:[eE][+-]?\d{1,4})?", re.ASCII)


def _clip(text: str, limit: int = 30) -> str:
    text = "".join(ch if ch.isprintable() else "�" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _invalid(spec: KnobSpec, shown: str) -> UserError:
    return UserError(
        f"{spec.name} 값 '{_clip(shown)}'이(가) 올바르지 않습니다. {spec.name}은(는) {spec.range_ko()}여야 합니다. "
        f"({spec.name} must be {spec.range_en()})"
    )


def parse_value(spec: KnobSpec, raw: object) -> int | float:
    """One knob value from text or JSON, checked against its range."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise _invalid(spec, repr(raw))
    if isinstance(raw, str):
        text = unicodedata.normalize("NFKC", raw).strip()
        pattern = _INT_RE if spec.kind is int else _FLOAT_RE
        if not pattern.fullmatch(text):
            raise _invalid(spec, raw)
        number: int | float = int(text) if spec.kind is int else float(text)
    else:
        number = raw
    if isinstance(number, float):
        if not math.isfinite(number):
            raise _invalid(spec, str(raw))
        if spec.kind is int:
            if not number.is_integer():
                raise _invalid(spec, str(raw))
            number = int(number)
    value = spec.kind(number)
    if not spec.contains(value):
        raise _invalid(spec, str(raw))
    return value


def validate_knobs(raw: Mapping[str, object] | Iterable[tuple[str, object]], base: Knobs, limits: KnobLimits) -> Knobs:
    """`base` with the user's values applied. Keys may be aliases; "" or None means "keep the default"."""
    specs = knob_specs(limits)
    values: dict[str, object] = {}
    for key, value in (raw.items() if isinstance(raw, Mapping) else raw):
        name = resolve_key(key, specs)
        if name in values:
            raise UserError(f"{name}이(가) 두 번 지정되었습니다. 한 번만 쓰세요. ({name} given twice)")
        values[name] = value
    parsed = {
        name: parse_value(specs[name], value)
        for name, value in values.items()
        if not (value is None or (isinstance(value, str) and not value.strip()))
    }
    knobs = replace(base, **parsed)
    if knobs.max_length < knobs.min_length:
        raise UserError(
            f"max_length({knobs.max_length})는 min_length({knobs.min_length}) 이상이어야 합니다. "
            f"(max_length must be ≥ min_length)"
        )
    rows, cap = knobs.n * knobs.best_of, min(limits.max_rows_per_request, limits.max_batch_size)
    if rows > cap:  # a request's rows are decoded in one batch
        raise UserError(
            f"n×best_of({knobs.n}×{knobs.best_of}={rows})가 너무 큽니다. 최대 {cap}까지 가능합니다. "
            f"(n × best_of must be at most {cap})"
        )
    # Saved per-chat defaults may predate a lowered cap: hold them to today's ranges too.
    for spec in specs.values():
        value = getattr(knobs, spec.name)
        if value is not None and not spec.contains(value):
            raise _invalid(spec, str(value))
    return knobs


def default_knobs(generation: KnobDefaults) -> Knobs:
    return Knobs(**generation.model_dump())


def check_defaults(generation: KnobDefaults, limits: KnobLimits) -> None:
    """Raise UserError if the configured defaults break the rules users are held to."""
    validate_knobs({}, default_knobs(generation), limits)
