"""Reading a rendered result back (reply to continue): render → parse gives the text the model saw and wrote."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from core.knobs import Knobs
from core.replies import APOLOGY, STOPPED, help_text, parse_result, render_generation
from core.settings import load_settings
from core.types import Generation, GenRequest

KNOBS = Knobs(min_length=0, max_length=20, top_p=1.0, top_k=50, repetition_penalty=1.0, no_repeat_ngram_size=0,
              temperature=1.0)
# Model output: Hangul, spaces, punctuation, line breaks (digits and Latin too, short of spelling a seed line).
TEXT = st.text(st.sampled_from(list("아정말좋다별로영화배우 \n.,!?…") + ["1", "2", "a", "@"]), max_size=40)


@st.composite
def generations(draw) -> tuple[Generation, bool]:
    label = draw(st.sampled_from([None, "긍정", "부정"]))
    prompt = draw(TEXT).strip()
    if not label and not prompt:
        prompt = "아"
    n = draw(st.integers(1, 3))
    # Several candidates are told apart by "\n\n2. …": a candidate with a blank line of its own could be read
    # either way (the rendering is not one-to-one there), so those stay single.
    continuations = tuple(draw(TEXT.filter(lambda c: n == 1 or "\n\n" not in c)) for _ in range(n))
    seeds = tuple(draw(st.integers(0, 2**63 - 1)) for _ in range(n))
    stopped = draw(st.booleans())
    confidence = tuple(draw(st.floats(0, 1)) for _ in range(n)) if label and not stopped and draw(st.booleans()) else None
    gen = Generation(GenRequest(label, prompt, KNOBS), continuations, seeds, 5, done=not stopped, confidence=confidence)
    return gen, stopped


@given(generations())
@example((Generation(GenRequest("긍정", "", KNOBS), (" ",), (0,), 5), False))  # hypothesis found it: a label, spaces
def test_render_then_parse_gives_back_the_first_candidates_text(case):
    gen, stopped = case
    text = render_generation(gen, 100_000, stopped=stopped)
    shown = parse_result(text)
    assert shown is not None, text
    assert shown.model_prompt == gen.request.model_prompt + gen.continuations[0]
    if gen.request.label and gen.request.prompt:
        assert shown.label == gen.request.label  # the label is kept as the label


def test_decorations_are_removed():
    gen = Generation(GenRequest("부정", "배우들 연기가", KNOBS), (" 별로", " 최악"), (7, 9), 4, confidence=(0.9, 0.8))
    text = render_generation(gen, 4096)
    assert text == "1. 부정 배우들 연기가 별로\n\n2. 부정 배우들 연기가 최악\n\nseed=7, 9 · 부정 90%, 80%"
    shown = parse_result(text)
    assert (shown.label, shown.text) == ("부정", "배우들 연기가 별로")
    stopped = Generation(GenRequest("긍정", "아", KNOBS), (" 정말",), (3,), 1, done=False)
    assert render_generation(stopped, 4096, stopped=True) == f"긍정 아 정말\n\nseed=3 · {STOPPED}"
    assert parse_result(render_generation(stopped, 4096, stopped=True)).text == "아 정말"


def test_other_messages_are_not_results():
    settings = load_settings(model={"pretrained": "x"})
    streaming = Generation(GenRequest("긍정", "아", KNOBS), (" 정말",), (3,), 1, done=False)
    for text in (APOLOGY, help_text(KNOBS, settings.limits), render_generation(streaming, 4096), "seed=1", "",
                 "긍정 아 정말\n\nseed=1, 2"):  # several seeds but no numbered candidates: not our rendering
        assert parse_result(text) is None, text


def test_the_first_candidate_ends_at_the_first_separator_whatever_the_others_hold():
    gen = Generation(GenRequest("긍정", "아", KNOBS), (" 좋다", " 별로\n\n2. 최악", " 음"), (1, 2, 3), 4)
    assert parse_result(render_generation(gen, 4096)).text == "아 좋다"


def test_a_result_that_finished_is_not_marked_stopped():
    done = Generation(GenRequest("긍정", "아", KNOBS), (" 정말",), (3,), 1, done=True, confidence=(0.93,))
    assert render_generation(done, 4096, stopped=True) == render_generation(done, 4096) == "긍정 아 정말\n\nseed=3 · 긍정 93%"
