"""Reply texts every front end sends: one layout, with the platform's escaping and emphasis plugged in."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from core.knobs import Knobs, knob_specs
from core.settings import LimitsSettings
from core.types import NEGATIVE, POSITIVE, Generation

APOLOGY = "죄송합니다, 생성 중에 문제가 생겼습니다. 잠시 후 다시 시도해 주세요. (sorry, something went wrong)"
CURSOR = " ▌"
STOPPED = "⏹ 중지됨 (stopped)"


def _plain(text: str) -> str:
    return text


def render_generation(
    gen: Generation,
    limit: int,
    escape: Callable[[str], str] = _plain,
    emphasize: Callable[[str], str] = _plain,
    stopped: bool = False,
) -> str:
    """Prompt (emphasized) then each continuation; the seed line lets users reproduce a result.

    `limit` is the platform's message length; continuations are shortened (never the markup) to fit. `stopped`: the
    user stopped it; the text so far is final and says so. `parse_result` reads the plain rendering back.
    """
    head = emphasize(escape(gen.request.model_prompt))
    final = gen.done or stopped
    cursor = "" if final else CURSOR
    many = len(gen.continuations) > 1
    seeds = ", ".join(str(s) for s in gen.seeds)
    sure = ""
    if gen.confidence is not None and gen.request.label:  # best_of > 1: the model's own reading of its pick, "긍정 93%"
        sure = f" · {gen.request.label} " + ", ".join(f"{c:.0%}" for c in gen.confidence)
    if stopped and not gen.done:
        sure = f" · {STOPPED}"
    footer = f"\n\nseed={seeds}{sure}" if final else ""
    lines = []
    budget = max(0, limit - len(head) * len(gen.continuations) - len(footer) - 16 * len(gen.continuations))
    share = budget // max(1, len(gen.continuations))
    for i, cont in enumerate(gen.continuations, 1):
        body = escape(shorten(cont, share))
        prefix = f"{i}. " if many else ""
        lines.append(f"{prefix}{head}{body}{cursor}")
    return shorten("\n\n".join(lines) + footer, limit)


# The footer of a finished (or stopped) result: its seeds, then anything after " · " (confidence, the stop mark).
_FOOTER_RE = re.compile(r"\n\nseed=([0-9]+(?:, [0-9]+)*)(?: · [^\n]*)?\Z")


@dataclass(frozen=True)
class Shown:
    """A result read back from its message: the label, and the text after it (the prompt and the first candidate)."""

    label: str | None
    text: str

    @property
    def model_prompt(self) -> str:
        return " ".join(part for part in (self.label, self.text) if part)


def parse_result(text: str) -> Shown | None:
    """The inverse of `render_generation` (plain style) for a finished or stopped result: the first candidate's
    whole text without the decorations (numbering, seed line, confidence, stop mark), its label split off. None
    when `text` is not such a result (a help text, an error, a reply still streaming). A continuation cut to fit
    the message stays cut: the message is all there is after a restart."""
    footer = _FOOTER_RE.search(text)
    if footer is None:
        return None
    body = text[: footer.start()]
    if len(footer.group(1).split(", ")) > 1:  # several candidates: "1. …\n\n2. …"; the first is continued
        if not body.startswith("1. "):
            return None
        body = body[3:].split("\n\n2. ", 1)[0]
    for label in (POSITIVE, NEGATIVE):
        rest = body[len(label) + 1:]
        if body == label or (body.startswith(label + " ") and rest.strip()):
            return Shown(label, rest)
    return Shown(None, body)  # a label word with only spaces after it stays text: the model saw exactly that


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, with "…" marking a cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def render_knobs(knobs: Knobs, escape: Callable[[str], str] = _plain) -> str:
    values = knobs.as_dict()
    return "\n".join(escape(f"{name} = {'(무작위)' if value is None else value}") for name, value in values.items())


UNSTEERED = ("⚠️ 지금 모델은 감정 라벨로 학습되지 않아 긍정/부정이 내용의 감정을 바꾸지 않습니다 (관리자: core.train으로 "
             "학습한 모델이나 내장 모델을 쓰세요). (this model was not trained with the label words: they will not "
             "steer it)")


def help_text(defaults: Knobs, limits: LimitsSettings, command: str = "/gen", escape: Callable[[str], str] = _plain,
              steered: bool = True, model: str = "", notice: str = "") -> str:
    """The grammar, every knob with its range and default, and examples for both labels; a warning first when the
    served model never learned the label words (`steered` False); the backend's `notice` (what it cannot do); the
    chat's `model` when there is a choice."""
    lines = [UNSTEERED, ""] if not steered else []
    lines += [notice, ""] if notice else []
    if model:
        lines += [f"모델 (model): {model} — 목록·바꾸기는 {command.replace('gen', 'model')}, 한 요청만 model=이름", ""]
    lines += [
        f"{command} [긍정|부정] 프롬프트 [key=value …]",
        "라벨: 긍정(pos, positive, 👍) / 부정(neg, negative, 👎) — 생략하면 프롬프트 그대로 이어 씁니다.",
        "길이는 프롬프트를 포함한 토큰 수입니다.",
        "",
        "설정 (이름 · 별칭 · 범위 · 기본값):",
    ]
    values = defaults.as_dict()
    for spec in knob_specs(limits).values():
        aliases = ", ".join(spec.aliases[:3])
        default = values[spec.name]
        shown = "무작위" if default is None else default
        lines.append(f"• {spec.name} ({aliases}): {spec.range_ko()}, 기본 {shown} — {spec.help_ko}")
    lines += [
        "",
        "예시:",
        f"{command} 긍정 아 정말 top_p=0.9",
        f"{command} 부정 이 영화는 temperature=0.8 max_length=40",
        f"{command} pos 배우들 연기가 n=3 seed=42",
        f"{command} 부정 배우들 연기가 best_of=8",
        "",
        "best_of=k: 후보 k개 중 모델 스스로 라벨에 가장 맞다고 읽는 것을 고르고, 그 확신도(예: 긍정 93%)를 보여 줍니다.",
    ]
    return escape("\n".join(lines))
