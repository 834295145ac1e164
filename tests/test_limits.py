"""Boundary tables for every limit, written out by hand (not derived from core's tables), under the shipped
settings.toml and under a second set of limits (tests/test_shipped_defaults.py runs the shipped ones end to end)."""

from __future__ import annotations

import pytest

from core.errors import UserError
from core.grammar import check_prompt, parse_gen
from core.knobs import Knobs, knob_specs, parse_value, validate_knobs
from core.prompt_rules import check_prompt_ids
from core.settings import load_settings
from core.types import GenRequest

SEED_MAX = 2**53 - 1  # JavaScript's largest exact integer


def shipped():
    return load_settings(store={"path": ":memory:"})


def other():
    return load_settings(store={"path": ":memory:"}, generation={"max_length": 20, "best_of": 2},
                         limits={"max_length": 40, "max_candidates": 2, "max_best_of": 4, "max_rows_per_request": 6,
                                 "max_batch_size": 4, "max_prompt_tokens": 10, "max_prompt_chars": 50})


# knob: (lowest allowed, highest allowed, a value just below, a value just above), per settings
RANGES = {
    "shipped": {
        "min_length": (1, 128, 0, 129), "max_length": (1, 128, 0, 129), "top_p": (1e-9, 1, 0, 1.0000001),
        "top_k": (1, 51200, 0, 51201), "repetition_penalty": (1, 10, 0.999, 10.001),
        "no_repeat_ngram_size": (0, 20, -1, 21), "temperature": (1e-9, 10, 0, 10.001), "seed": (0, SEED_MAX, -1, SEED_MAX + 1),
        "n": (1, 3, 0, 4), "best_of": (1, 8, 0, 9),
    },
    "other": {
        "min_length": (1, 40, 0, 41), "max_length": (1, 40, 0, 41), "top_p": (1e-9, 1, 0, 1.0000001),
        "top_k": (1, 51200, 0, 51201), "repetition_penalty": (1, 10, 0.999, 10.001),
        "no_repeat_ngram_size": (0, 20, -1, 21), "temperature": (1e-9, 10, 0, 10.001), "seed": (0, SEED_MAX, -1, SEED_MAX + 1),
        "n": (1, 2, 0, 3), "best_of": (1, 4, 0, 5),
    },
}
SETTINGS = {"shipped": shipped, "other": other}


def neutral(limits) -> Knobs:
    """Knobs that let any single value through the cross-checks (lengths, rows)."""
    return Knobs(min_length=1, max_length=limits.max_length, top_p=1.0, top_k=50, repetition_penalty=1.0,
                 no_repeat_ngram_size=0, temperature=1.0, n=1, best_of=1)


@pytest.mark.parametrize("which", ["shipped", "other"])
def test_every_knob_is_held_to_its_range_at_both_edges(which):
    limits = SETTINGS[which]().limits
    assert set(RANGES[which]) == set(knob_specs(limits))  # every knob is in the table
    for name, (low, high, below, above) in RANGES[which].items():
        for value in (low, high):
            assert getattr(validate_knobs({name: value}, neutral(limits), limits), name) == value, (name, value)
            assert validate_knobs({name: str(value)}, neutral(limits), limits) == validate_knobs(
                {name: value}, neutral(limits), limits)
        for value in (below, above):
            with pytest.raises(UserError, match=name):
                validate_knobs({name: value}, neutral(limits), limits)


def test_the_value_error_says_what_is_wrong_in_korean_and_english():
    limits = shipped().limits
    specs = knob_specs(limits)
    cases = {
        ("top_p", "7"): "top_p 값 '7'이(가) 올바르지 않습니다. top_p은(는) 0 초과 1 이하의 실수여야 합니다. "
                        "(top_p must be a number > 0 and ≤ 1)",
        ("n", "4"): "n 값 '4'이(가) 올바르지 않습니다. n은(는) 1 이상 3 이하의 정수여야 합니다. "
                    "(n must be an integer ≥ 1 and ≤ 3)",
        ("top_k", "1.5"): "top_k 값 '1.5'이(가) 올바르지 않습니다. top_k은(는) 1 이상 51200 이하의 정수여야 합니다. "
                          "(top_k must be an integer ≥ 1 and ≤ 51200)",
    }
    for (name, raw), message in cases.items():
        with pytest.raises(UserError) as info:
            parse_value(specs[name], raw)
        assert str(info.value) == message
    with pytest.raises(UserError) as info:
        validate_knobs([("top_p", "0.5"), ("p", "0.6")], neutral(limits), limits)
    assert str(info.value) == "top_p이(가) 두 번 지정되었습니다. 한 번만 쓰세요. (top_p given twice)"
    with pytest.raises(UserError) as info:
        validate_knobs({"min_length": 30, "max_length": 20}, neutral(limits), limits)
    assert str(info.value) == "max_length(20)는 min_length(30) 이상이어야 합니다. (max_length must be ≥ min_length)"


@pytest.mark.parametrize(("which", "n", "best_of", "cap"), [
    ("shipped", 2, 8, None), ("shipped", 3, 5, None), ("shipped", 3, 6, 16),  # rows 16, batch 16
    ("other", 2, 2, None), ("other", 1, 4, None), ("other", 2, 3, 4), ("other", 2, 4, 4),  # rows 6, batch 4
])
def test_n_times_best_of_is_held_to_the_smaller_of_rows_per_request_and_batch_size(which, n, best_of, cap):
    limits = SETTINGS[which]().limits
    knobs = {"n": n, "best_of": best_of}
    if cap is None:
        assert validate_knobs(knobs, neutral(limits), limits).best_of == best_of
    else:
        with pytest.raises(UserError) as info:
            validate_knobs(knobs, neutral(limits), limits)
        assert str(info.value) == (f"n×best_of({n}×{best_of}={n * best_of})가 너무 큽니다. 최대 {cap}까지 가능합니다. "
                                   f"(n × best_of must be at most {cap})")


def test_rows_per_request_below_the_batch_size_is_the_cap():
    limits = load_settings(store={"path": ":memory:"}, limits={"max_rows_per_request": 6}).limits
    assert validate_knobs({"n": 3, "best_of": 2}, neutral(limits), limits).n == 3
    with pytest.raises(UserError, match="최대 6까지"):
        validate_knobs({"n": 1, "best_of": 7}, neutral(limits), limits)


@pytest.mark.parametrize("which", ["shipped", "other"])
def test_prompt_tokens_and_length_at_their_edges(which):
    limits = SETTINGS[which]().limits
    cap, most = limits.max_length, limits.max_prompt_tokens

    def request(max_length: int) -> GenRequest:
        return GenRequest("긍정", "아", Knobs(1, max_length, 1.0, 50, 1.0, 0, 1.0))

    assert check_prompt_ids(list(range(most)), request(cap), limits) == list(range(most))
    with pytest.raises(UserError, match=f"최대 {most}토큰까지"):
        check_prompt_ids(list(range(most + 1)), request(cap), limits)
    assert len(check_prompt_ids(list(range(most + 1)), request(cap), limits, continuing=True)) == most + 1
    for length in (5, 9):  # a prompt of exactly max_length tokens leaves no room; one less leaves one
        assert len(check_prompt_ids(list(range(length - 1)), request(length), limits)) == length - 1
        with pytest.raises(UserError) as info:
            check_prompt_ids(list(range(length)), request(length), limits)
        assert f"max_length를 {length + 1} 이상 {cap} 이하로" in str(info.value)
    with pytest.raises(UserError, match="비어 있습니다"):
        check_prompt_ids([], request(cap), limits)


@pytest.mark.parametrize("which", ["shipped", "other"])
def test_prompt_characters_at_their_edge(which):
    limits = SETTINGS[which]().limits
    most = limits.max_prompt_chars
    assert check_prompt("가" * most, limits) == "가" * most
    with pytest.raises(UserError) as info:
        check_prompt("가" * (most + 1), limits)
    assert f"{most + 1}자. 최대 {most}자까지" in str(info.value)


def test_shipped_knob_defaults_and_limits_are_what_the_readme_promises():
    settings = shipped()
    g, lim = settings.generation, settings.limits
    assert (g.min_length, g.max_length, g.top_p, g.top_k, g.best_of) == (10, 20, 1.0, 50, 4)
    assert (lim.max_length, lim.max_prompt_tokens, lim.max_candidates, lim.max_best_of) == (128, 64, 3, 8)
    assert (lim.max_rows_per_request, lim.max_batch_size, lim.user_interval_s) == (16, 16, 2.0)
    request = parse_gen("아 정말", Knobs(**g.model_dump()), lim)
    assert request.rows == 1 and request.knobs.best_of == 4  # the default does not apply without a label
