"""The bad-input battery every front end runs: one list of hand-written cases.

Each case is what a user types after `/gen` (`text`, for Telegram and Discord) and the matching `/api` JSON body
(`body`; by default the text as the prompt). `expect` is "ok" (a valid result) or a fragment of the precise error.
Web-only cases (malformed JSON, wrong types, bytes that are not UTF-8) are in WEB_ONLY.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OK = "ok"
P = "긍정 아 정말"  # a good prompt the knob cases hang on


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    body: dict | list | str | int | None = field(default=None)
    expect: str = OK
    web_expect: str | None = None  # when `/api` answers differently (its JSON has no `key=value` grammar)

    def web_outcome(self) -> str:
        return self.expect if self.web_expect is None else self.web_expect

    def web_body(self) -> object:
        return {"prompt": self.text} if self.body is None else self.body


CASES: list[Case] = [
    Case("empty", "", {"prompt": ""}, "비어"),
    Case("only-spaces", "   \t ", {"prompt": "   \t "}, "비어"),
    Case("only-label", "긍정", {"prompt": "긍정"}),
    Case("only-label-alias", "👎", {"prompt": "👎"}),
    Case("only-knobs", "top_p=0.9 temperature=0.8", {"prompt": "", "top_p": 0.9, "temperature": 0.8}, "비어"),
    Case("unknown-key", f"{P} temprature=0.8", {"prompt": P, "temprature": 0.8}, "temperature"),
    Case("unknown-key-far", f"{P} foo=1", {"prompt": P, "foo": 1}, "foo"),
    Case("duplicate-key", f"{P} top_p=0.9 p=0.8", {"prompt": P, "top_p": 0.9, "p": 0.8}, "top_p"),
    Case("top_p-nan", f"{P} top_p=nan", {"prompt": P, "top_p": "nan"}, "top_p"),
    Case("top_p-inf", f"{P} top_p=inf", {"prompt": P, "top_p": "inf"}, "top_p"),
    Case("top_p-minus-inf", f"{P} top_p=-inf", {"prompt": P, "top_p": "-inf"}, "top_p"),
    Case("top_p-minus-zero", f"{P} top_p=-0", {"prompt": P, "top_p": -0.0}, "top_p"),
    Case("top_p-1e309", f"{P} top_p=1e309", {"prompt": P, "top_p": "1e309"}, "top_p"),
    Case("top_p-hex", f"{P} top_p=0x10", {"prompt": P, "top_p": "0x10"}, "top_p"),
    Case("top_p-empty-value", f"{P} top_p=", {"prompt": P, "top_p": ""}, "top_p", web_expect=OK),  # "" = default
    Case("temperature-zero", f"{P} temperature=0", {"prompt": P, "temperature": 0}, "temperature"),
    Case("top_k-huge", f"{P} top_k={10**40}", {"prompt": P, "top_k": 10**40}, "top_k"),
    Case("seed-huge", f"{P} seed={2**64}", {"prompt": P, "seed": 2**64}, "seed"),
    Case("seed-negative", f"{P} seed=-1", {"prompt": P, "seed": -1}, "seed"),
    Case("seed-max", f"{P} seed={2**53 - 1}", {"prompt": P, "seed": 2**53 - 1}),
    Case("seed-past-javascript", f"{P} seed={2**53}", {"prompt": P, "seed": 2**53}, "seed"),
    Case("max_length-100000", f"{P} max_length=100000", {"prompt": P, "max_length": 100000}, "max_length"),
    Case("max_length-float", f"{P} max_length=20.5", {"prompt": P, "max_length": 20.5}, "max_length"),
    Case("min-over-max", f"{P} min_length=50 max_length=20", {"prompt": P, "min_length": 50, "max_length": 20}, "min_length"),
    Case("n-1000", f"{P} n=1000", {"prompt": P, "n": 1000}, "n"),
    Case("n-zero", f"{P} n=0", {"prompt": P, "n": 0}, "n"),
    Case("n-max", f"{P} n=3 max_length=16", {"prompt": P, "n": 3, "max_length": 16}),
    Case("prompt-4096", "가" * 4096, None, "너무 깁니다"),
    Case("prompt-too-many-tokens", "긍정 " + "아 " * 100, None, "너무 깁니다"),
    Case("emoji", "긍정 🎬🍿 영화 👍🏽👨‍👩‍👧", None),
    Case("combining", "긍정 e\u0301 한\u1100\u1161\u11a8 글", None),
    Case("control-chars", "긍정 아\x00 정\x07말\x1b[31m", None, "제어 문자"),
    Case("rtl-marks", "긍정 \u202e아 정말\u200f \u061c", None),
    Case("zero-width", "긍정 \u200b\u200d\ufeff 좋다", None),
    Case("html", '긍정 <b>굵게</b> <script>alert("x")</script> &amp; </i> max_length=128',
         {"prompt": '긍정 <b>굵게</b> <script>alert("x")</script> &amp; </i>', "max_length": 128}),
    Case("markdown", "긍정 **굵게** __밑줄__ `코드` ||스포|| [링크](http://x) @everyone #general max_length=128",
         {"prompt": "긍정 **굵게** __밑줄__ `코드` ||스포|| [링크](http://x) @everyone #general", "max_length": 128}),
    Case("fullwidth-equals", f"{P} top_p＝0.9", {"prompt": P, "top_p": "0.9"}),
    Case("spaces-around-equals", f"{P} top_p = 0.9", {"prompt": P, "top_p": " 0.9 "}),
    Case("only-prompt-no-label", "아 정말", None),
    Case("label-only-en", "negative", {"prompt": "negative"}),
    Case("prompt-too-long-for-max", f"{P} 그리고 배우들 연기가 min_length=1 max_length=3",
         {"prompt": f"{P} 그리고 배우들 연기가", "min_length": 1, "max_length": 3},
         "max_length"),
    Case("newlines-tabs", "긍정 아\n정말\t좋다", None),
    # Issue 12.1: a lone surrogate (half an emoji) got a 500 on the web and the generic apology on the chat bots.
    Case("lone-surrogate", "긍정 아\ud800 정말", None, "서로게이트"),
    Case("half-emoji-in-knob", f"{P} top_p=\ud83d", {"prompt": P, "top_p": "\ud83d"}, "서로게이트"),
]

# What only `/api` can receive: raw bytes and JSON of the wrong shape. (raw body, expected status, error fragment)
WEB_ONLY: list[tuple[str, bytes, int, str]] = [
    ("malformed-json", b'{"prompt": "a"', 400, "JSON"),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("empty-body", b"", 400, "JSON"),
    ("json-array", b'["prompt"]', 422, "JSON"),
    ("json-string", b'"prompt"', 422, "JSON"),
    ("json-null", b"null", 422, "JSON"),
    ("prompt-number", b'{"prompt": 5}', 422, "prompt"),
    ("prompt-list", b'{"prompt": ["a"]}', 422, "prompt"),
    ("knob-object", '{"prompt": "긍정 아", "top_p": {"x": 1}}'.encode(), 422, "top_p"),
    ("knob-bool", '{"prompt": "긍정 아", "top_k": true}'.encode(), 422, "top_k"),
    ("label-number", '{"prompt": "아", "label": 1}'.encode(), 422, "label"),
    ("deep-nesting", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 413, "KiB"),
    ("nested-deep-small", b"[" * 5000 + b"]" * 5000, 400, "JSON"),
    ("nan-literal", b'{"prompt": "a", "top_p": NaN}', 422, "top_p"),
    # Issue 12.1: these answered HTTP 500 text/plain.
    ("lone-surrogate-escape", b'{"prompt": "\\ud800 a"}', 422, "서로게이트"),
    ("surrogate-in-key", b'{"prompt": "a", "\\udc00": 1}', 422, "서로게이트"),
    ("int-past-digit-limit", b'{"prompt": "a", "top_k": ' + b"1" * 5000 + b"}", 400, "JSON"),
    ("int-past-digit-limit-nested", b'{"prompt": "a", "x": [' + b"9" * 4400 + b"]}", 400, "JSON"),
]
