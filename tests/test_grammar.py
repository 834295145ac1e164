"""The command grammar and knob rules: examples from the README, the tutorial's knobs, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.errors import UserError
from core.grammar import GenRequest, parse_gen, parse_settings_args, split_command
from core.knobs import Knobs, knob_specs, validate_knobs
from core.settings import GenerationSettings, LimitsSettings

LIMITS = LimitsSettings()
DEFAULTS = Knobs(**GenerationSettings().model_dump())


def gen(text: str) -> GenRequest:
    return parse_gen(text, DEFAULTS, LIMITS)


def test_readme_example():
    req = gen("긍정 아 정말 top_p=0.9")
    assert (req.label, req.prompt, req.knobs.top_p) == ("긍정", "아 정말", 0.9)
    assert req.model_prompt == "긍정 아 정말"
    assert req.knobs.top_k == 50 and req.knobs.max_length == 20  # the tutorial's defaults


@pytest.mark.parametrize("word, label", [
    ("긍정", "긍정"), ("긍", "긍정"), ("pos", "긍정"), ("Positive", "긍정"), ("GOOD", "긍정"), ("+", "긍정"), ("👍", "긍정"),
    ("😀", "긍정"), ("😊", "긍정"), ("(긍정):", "긍정"),
    ("부정", "부정"), ("부", "부정"), ("NEG", "부정"), ("negative", "부정"), ("bad", "부정"), ("-", "부정"), ("👎", "부정"),
    ("😡", "부정"), ("😞", "부정"), ("[부정]", "부정"), ("부정.", "부정"),
])
def test_label_aliases_normalise_to_training_words(word, label):
    req = gen(f"{word} 아 정말")
    assert req.label == label and req.model_prompt == f"{label} 아 정말"


def test_no_label_keeps_prompt_as_given():
    req = gen("아 정말 좋다")
    assert req.label is None and req.model_prompt == "아 정말 좋다"


def test_label_alone_writes_a_whole_review():
    assert gen("부정").model_prompt == "부정"


@pytest.mark.parametrize("text", ["p=0.5 k=3 t=0.7 긍정 아", "긍정 아 top_p ＝ 0.5 top_k= 3 temp =0.7",
                                  "긍정 아 TOP_P=0.5 Top-K=3 온도=0.7", "긍정 아 top_p=０.５ k=3 temperature=.7",
                                  "긍정 아 ｐ=0.5 ｔｏｐ－ｋ=3 ＴＥＭＰ＝0.7"])  # full-width keys, as some keyboards type them
def test_aliases_fullwidth_and_spaces(text):
    req = gen(text)
    assert (req.label, req.prompt) == ("긍정", "아")
    assert (req.knobs.top_p, req.knobs.top_k, req.knobs.temperature) == (0.5, 3, 0.7)


def test_every_knob_and_seed_and_n():
    req = gen("긍정 아 min_length=5 max_length=40 top_p=0.8 top_k=10 repetition_penalty=1.2 "
              "no_repeat_ngram_size=3 temperature=0.9 seed=42 n=3")
    assert req.knobs == Knobs(5, 40, 0.8, 10, 1.2, 3, 0.9, seed=42, n=3)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("긍정 아 top_p=1.5", "top_p"),
        ("긍정 아 top_p=0", "0 초과 1 이하"),
        ("긍정 아 top_p=-0", "top_p"),
        ("긍정 아 top_p=nan", "top_p"),
        ("긍정 아 top_p=inf", "top_p"),
        ("긍정 아 top_p=1e309", "top_p"),
        ("긍정 아 top_k=0x10", "top_k"),
        ("긍정 아 top_k=0", "1 이상"),
        ("긍정 아 top_k=2.5", "정수"),
        ("긍정 아 max_length=100000", "128 이하"),
        ("긍정 아 n=1000", "1 이상 3 이하"),
        ("긍정 아 seed=99999999999999999999999", "seed"),
        ("긍정 아 seed=" + "9" * 5000, "seed"),
        ("긍정 아 repetition_penalty=0.5", "1 이상 10 이하"),
        ("긍정 아 temperature=0", "0 초과"),
        ("긍정 아 no_repeat_ngram_size=-1", "0 이상"),
        ("긍정 아 min_length=30 max_length=20", "min_length"),
        ("긍정 아 top_p=0.9 p=0.8", "두 번"),
        ("긍정 아 top_p=0.9 top_p=0.8", "두 번"),
        ("긍정 아 tmep=0.9", "temperature"),
        ("긍정 아 foo=1", "알 수 없는 설정"),
        ("긍정 아 top_p=", "값이 없습니다"),
        ("", "비어 있습니다"),
        ("top_p=0.9", "비어 있습니다"),
        ("긍정 아\x00정말", "제어 문자"),
        ("긍정 " + "가" * 600, "너무 깁니다"),
    ],
)
def test_precise_errors(text, fragment):
    with pytest.raises(UserError) as info:
        gen(text)
    message = str(info.value)
    assert fragment in message
    assert "Traceback" not in message and len(message) < 400


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(UserError, match="혹시 'top_k'"):
        gen("긍정 아 topk2=3")


def test_prose_with_equals_sign_and_space_stays_prompt():
    assert gen("긍정 정말 =) 좋다").prompt == "정말 =) 좋다"


def test_split_command():
    assert split_command("/gen@MyBot 긍정 아") == ("gen", "MyBot", "긍정 아")
    assert split_command("/gen") == ("gen", None, "")
    assert split_command("!gen 긍정 아") == ("gen", None, "긍정 아")  # the prefix form, as typed out of habit
    assert split_command("그냥 말") == ("", None, "그냥 말")


def test_set_args():
    assert parse_settings_args("top_p=0.9 temp=0.8", DEFAULTS, LIMITS) == {"top_p": 0.9, "temperature": 0.8}
    with pytest.raises(UserError, match="key=value"):
        parse_settings_args("hello", DEFAULTS, LIMITS)
    with pytest.raises(UserError):
        parse_settings_args("", DEFAULTS, LIMITS)


def test_json_values_numeric_strings_and_empty_mean_default():
    knobs = validate_knobs({"top_p": "0.9", "top_k": 5, "max_length": "", "temperature": None, "min_length": 10.0},
                           DEFAULTS, LIMITS)
    assert (knobs.top_p, knobs.top_k, knobs.max_length, knobs.temperature, knobs.min_length) == (0.9, 5, 20, 1.0, 10)
    for bad in ({"top_k": True}, {"top_k": [1]}, {"top_p": float("nan")}, {"top_k": 1.5}):
        with pytest.raises(UserError):
            validate_knobs(bad, DEFAULTS, LIMITS)


# ---- fuzzing: anything a user can type gives a request within the caps, or a UserError -----------------------
_pieces = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["긍정", "부정", "pos", "neg", "👍", "=", "＝", " ", "\n", "top_p=", "k=", "n=", "seed=", "max_length=",
                     "0.5", "1e309", "nan", "-0", "0x10", "999999999999999999999", "\u202e", "e\u0301", "<b>", "&amp;"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from([s.name for s in knob_specs(LIMITS).values()] + ["temp", "p", "zz"]),
              st.one_of(st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True).map(str), st.text(max_size=5))),
)


@hsettings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=12).map(" ".join))
def test_fuzz_grammar_never_crashes_and_respects_caps(text):
    try:
        req = gen(text)
    except UserError as exc:
        assert str(exc)
        return
    k = req.knobs
    assert 1 <= k.min_length <= k.max_length <= LIMITS.max_length
    assert 0 < k.top_p <= 1 and k.top_k >= 1 and k.repetition_penalty >= 1 and k.temperature > 0
    assert 1 <= k.n <= LIMITS.max_candidates
    assert req.label in (None, "긍정", "부정")
    assert req.model_prompt and len(req.prompt) <= LIMITS.max_prompt_chars


def test_the_knob_table_is_built_once_per_set_of_limits():
    from core.knobs import knob_specs
    from core.settings import LimitsSettings

    limits = LimitsSettings()
    table = knob_specs(limits)
    assert knob_specs(limits) is table and knob_specs(LimitsSettings()) is table
    assert knob_specs(LimitsSettings(max_length=64)) is not table
    with pytest.raises(TypeError):
        table["top_p"] = None  # shared between calls, so read-only
