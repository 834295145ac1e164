"""The command grammar every front end shares: `/gen [label] prompt [key=value …]`."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from core.errors import UserError
from core.knobs import Knobs, knob_specs, resolve_key, validate_knobs
from core.types import NEGATIVE, POSITIVE, GenRequest

if TYPE_CHECKING:
    from core.settings import LimitsSettings

LABEL_ALIASES: dict[str, tuple[str, ...]] = {
    POSITIVE: ("긍정", "긍", "pos", "positive", "good", "+", "👍", "😀", "😊"),
    NEGATIVE: ("부정", "부", "neg", "negative", "bad", "-", "👎", "😡", "😞"),
}
_LABEL_OF = {alias.casefold(): label for label, aliases in LABEL_ALIASES.items() for alias in aliases}

USAGE = "사용법: /gen [긍정|부정] 프롬프트 [key=value …] — 예: /gen 긍정 아 정말 top_p=0.9"

# `key=value` anywhere in the text; spaces and full-width ＝ around the sign are tolerated, and a full-width hyphen in
# the key (`ｔｏｐ－ｋ`) as the ASCII one (the key is NFKC-normalised when it is resolved).
_KNOB_RE = re.compile(r"(?<!\S)([^\W\d][\w\-－]*)(\s*)[=＝](\s*)(\S*)")
_COMMAND_RE = re.compile(r"^\s*[/!]?([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?=\s|$)", re.ASCII)


def split_command(text: str) -> tuple[str, str | None, str]:
    """`/gen@MyBot 긍정 …` → ("gen", "MyBot", "긍정 …"). Text without a command gives ("", None, text)."""
    match = _COMMAND_RE.match(text)
    if not match:
        return "", None, text.strip()
    return match.group(1).lower(), match.group(2), text[match.end():].strip()


def normalise_label(word: str) -> str | None:
    """`pos`, `positive`, `👍`, `[긍정]` … → `긍정`; None if `word` is not a label."""
    return _LABEL_OF.get(word.strip("[]():,.").casefold())


def extract_knobs(text: str, limits: LimitsSettings) -> tuple[str, list[tuple[str, str]]]:
    """Split `text` into the prose and its `key=value` pairs (keys as the user wrote them)."""
    specs = knob_specs(limits)
    pairs: list[tuple[str, str]] = []
    kept: list[str] = []
    last = 0
    for match in _KNOB_RE.finditer(text):
        key, space_before, space_after, value = match.groups()
        try:
            resolve_key(key, specs)
        except UserError:
            # `정말 =)` is prose; a tight `tmep=0.9` is a mistyped knob and deserves the hint.
            if space_before or space_after:
                continue
            raise
        if not value:
            raise UserError(f"'{key}=' 뒤에 값이 없습니다. 예: top_p=0.9 (missing value after '{key}=')")
        pairs.append((key, value))
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip(), pairs


BROKEN_TEXT = (
    "보낸 글에 깨진 문자(짝이 없는 서로게이트 U+{code:04X})가 있습니다. 이모지나 글자가 반쯤 잘렸을 수 있습니다. "
    "다시 입력해 보내 주세요. (the text contains invalid Unicode: a lone surrogate, e.g. half an emoji)"
)


def reject_broken_text(text: str) -> None:
    """Lone surrogates (half an emoji from a buggy client or forged JSON) cannot be encoded to UTF-8 for a reply."""
    bad = next((ch for ch in text if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise UserError(BROKEN_TEXT.format(code=ord(bad)))


def reject_control_chars(prompt: str) -> None:
    """Valid Unicode without control characters (newlines and tabs allowed), else a UserError naming the first."""
    reject_broken_text(prompt)
    bad = next((ch for ch in prompt if unicodedata.category(ch) == "Cc" and ch not in "\n\t"), None)
    if bad is not None:
        raise UserError(
            f"프롬프트에 제어 문자(U+{ord(bad):04X})가 들어 있습니다. 지우고 다시 보내 주세요. "
            f"(the prompt contains a control character)"
        )


def check_prompt(prompt: str, limits: LimitsSettings) -> str:
    """No control characters, at most `max_prompt_chars`; runs of spaces become one. Every front end uses it."""
    reject_control_chars(prompt)
    if len(prompt) > limits.max_prompt_chars:
        raise UserError(
            f"프롬프트가 너무 깁니다: {len(prompt)}자. 최대 {limits.max_prompt_chars}자까지 가능합니다. "
            f"(prompt too long: {len(prompt)} characters, at most {limits.max_prompt_chars})"
        )
    return re.sub(r"[ \t]+", " ", prompt).strip()


def request_from_text(text: str, knobs: Knobs, limits: LimitsSettings, label: str | None = None,
                      origin: str = "") -> GenRequest:
    """A request from prose: its first word is the label when it names one (unless `label` is given)."""
    if label is None:
        words = text.split(maxsplit=1)
        label = normalise_label(words[0]) if words else None
        if label:
            text = text.strip().removeprefix(words[0])
    prompt = check_prompt(text, limits)
    if not label and not prompt:
        raise UserError(f"프롬프트가 비어 있습니다. (the prompt is empty) {USAGE}")
    return GenRequest(label=label, prompt=prompt, knobs=knobs, origin=origin)


def parse_gen(text: str, defaults: Knobs, limits: LimitsSettings) -> GenRequest:
    """Parse the arguments of `/gen` (the text after the command)."""
    reject_broken_text(text)
    prose, raw = extract_knobs(text, limits)
    request = request_from_text(prose, validate_knobs(raw, defaults, limits), limits)
    check_best_of(request, {resolve_key(key, knob_specs(limits)) for key, _ in raw})
    return request


def check_best_of(request: GenRequest, given: set[str]) -> None:
    """best_of reranks toward the label: asked for without one, it is refused (a chat default just doesn't apply)."""
    if "best_of" in given and request.knobs.best_of > 1 and not request.label:
        raise UserError(
            "best_of는 라벨(긍정/부정)이 있을 때만 쓸 수 있습니다: 후보 중 라벨에 가장 맞는 것을 고르기 때문입니다. "
            "예: /gen 긍정 아 정말 best_of=4 (best_of needs a label: it picks the candidate that fits the label best)"
        )


def parse_settings_args(text: str, defaults: Knobs, limits: LimitsSettings) -> dict[str, object]:
    """`/set top_p=0.9 temp=0.8` → {"top_p": 0.9, "temperature": 0.8}, validated against `defaults`."""
    reject_broken_text(text)
    prose, raw = extract_knobs(text, limits)
    if prose:
        raise UserError(
            f"'{prose[:30]}'은(는) key=value 형식이 아닙니다. 예: /set top_p=0.9 temperature=0.8 "
            f"(expected key=value pairs)"
        )
    if not raw:
        raise UserError("바꿀 설정을 key=value로 적어 주세요. 예: /set top_p=0.9 (nothing to set)")
    knobs = validate_knobs(raw, defaults, limits)
    specs = knob_specs(limits)
    return {name: getattr(knobs, name) for name in (resolve_key(key, specs) for key, _ in raw)}
